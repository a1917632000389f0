"""Sampler pieces for vLLM 0.32: logprobs through bi.log_softmax and the top-k/top-p mask from bi,
so the engine's logprobs (raw and processed) and its kept set are the trainer's."""
from __future__ import annotations

import torch

_ops = torch.ops.batch_invariant


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Replaces Sampler.compute_logprobs (raw logprobs, prompt logprobs, greedy processed)."""
    return _ops.log_softmax(logits, torch.float32)


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Replaces vLLM's apply_top_k_top_p: removed entries become -inf (our deterministic mask).
    vLLM stores a disabled top-k as the vocab size, which our mask also treats as off."""
    if k is None and p is None:
        return logits
    rows = logits.size(0)
    k64 = None if k is None else k.to(torch.int64).expand(rows).contiguous()
    p32 = None if p is None else p.to(torch.float32).expand(rows).contiguous()
    return _ops.top_k_top_p_mask(logits.float(), k64, p32)


def make_forward_cpu(original):
    """TopKTopPSampler.forward_cpu with our mask and our processed logprobs; the random draw
    (per-request seeded generators) stays vLLM's, applied to our masked logits."""

    def forward_cpu(self, logits, generators, k, p):
        masked = apply_top_k_top_p(logits, k, p)
        sampled, _ = original(self, masked, generators, None, None)
        if self.logprobs_mode == "processed_logprobs":
            return sampled, compute_logprobs(masked)
        if self.logprobs_mode == "processed_logits":
            return sampled, masked
        return sampled, None

    return forward_cpu
