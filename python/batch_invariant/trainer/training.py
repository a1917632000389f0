"""Training utilities: a deterministic AdamW step with gradient clipping and a policy-gradient
loss on token logprobs."""
from __future__ import annotations

import torch


def make_optimizer(model: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with the single-tensor (for-loop) implementation: elementwise, hence deterministic."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=False, fused=False)


def policy_gradient_loss(logprobs: list[torch.Tensor], advantages, *, normalize: bool = True) -> torch.Tensor:
    """REINFORCE / GRPO-style loss: -sum_t A_i * logprob_{i,t}, averaged over tokens (or sequences)."""
    if len(logprobs) != len(advantages):
        raise ValueError(f"{len(logprobs)} logprob sequences but {len(advantages)} advantages")
    terms = [-(float(a) * lp).sum() for lp, a in zip(logprobs, advantages)]
    total = torch.stack(terms).sum()
    count = sum(lp.numel() for lp in logprobs) if normalize else len(logprobs)
    return total / max(count, 1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
               max_grad_norm: float | None = 1.0) -> float:
    """Backward, clip, step, zero: returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=False)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
    optimizer.step()
    return float(norm)
