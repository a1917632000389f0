"""Token logprobs of completions with the engine's semantics (bi.token_logprobs)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

import batch_invariant as bi

if TYPE_CHECKING:
    from .model import CausalLM


def _per_sequence(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} sequences")
        return list(value)
    return [value] * n


def pack(model: "CausalLM", sequences: Sequence, prompt_lens: Sequence[int]):
    """Validate and pack: returns (token_ids [T], lengths, rows, targets) where rows are the pack
    positions whose logits predict the completion tokens `targets`."""
    if len(sequences) != len(prompt_lens):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt_lens")
    if not sequences:
        raise ValueError("no sequences given")
    device = model.model.norm.weight.device
    vocab = model.config.vocab_size
    ids, lengths, rows, targets, start = [], [], [], [], 0
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        t = torch.as_tensor(seq, dtype=torch.int64).flatten()
        n = t.numel()
        if n == 0:
            raise ValueError(f"sequence {i} is empty")
        if not 1 <= int(p) <= n:
            raise ValueError(f"sequence {i}: prompt_len {p} must be in [1, {n}] (the sequence length)")
        if int(t.min()) < 0 or int(t.max()) >= vocab:
            raise ValueError(f"sequence {i}: token ids must be in [0, {vocab}), got min {int(t.min())}, max {int(t.max())}")
        if n > model.config.max_position_embeddings:
            raise ValueError(f"sequence {i} has {n} tokens > max_position_embeddings {model.config.max_position_embeddings}")
        ids.append(t)
        lengths.append(n)
        rows.append(torch.arange(start + int(p) - 1, start + n - 1))
        targets.append(t[int(p):])
        start += n
    return torch.cat(ids).to(device), lengths, torch.cat(rows).to(device), torch.cat(targets).to(device)


def completion_logprobs(model: "CausalLM", sequences: Sequence, prompt_lens: Sequence[int], temperature=1.0, top_k=-1,
                        top_p=1.0, mode: str = "raw") -> list[torch.Tensor]:
    """One fp32 tensor per sequence: the logprob of each completion token (differentiable)."""
    ids, lengths, rows, targets = pack(model, sequences, prompt_lens)
    n_comp = [n - int(p) for n, p in zip(lengths, prompt_lens)]
    hidden = model(ids, lengths)
    logits = model.logits(hidden.index_select(0, rows))
    expand = lambda vals, dtype: torch.tensor(  # noqa: E731
        [v for v, c in zip(vals, n_comp) for _ in range(c)], dtype=dtype, device=ids.device)
    n = len(lengths)
    temps = expand(_per_sequence(temperature, n, "temperature"), torch.float32)
    ks = expand(_per_sequence(top_k, n, "top_k"), torch.int64)
    ps = expand(_per_sequence(top_p, n, "top_p"), torch.float32)
    lp = bi.token_logprobs(logits, targets, temperature=temps, top_k=ks, top_p=ps, mode=mode)
    return list(lp.split(n_comp))
