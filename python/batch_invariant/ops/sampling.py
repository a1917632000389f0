"""Sampling-side ops: the top-k/top-p mask and token logprobs with vLLM's logprob semantics.

Both the engine (vLLM plugin) and the trainer call these, so the kept set and the logprobs agree
bit for bit. Semantics (contract.LOGPROB_MODES):
  raw:       log_softmax(fp32 logits)[token]             (temperature, top-k, top-p ignored)
  processed: z = fp32 logits / T (T < SAMPLING_EPS counts as 1.0), z = top_k_top_p_mask(z),
             log_softmax(z)[token]                         (renormalised over the kept set)
The mask follows vLLM's apply_top_k_top_p: stable ascending sort; top-k removes entries below the
k-th largest value (ties kept); top-p removes the sorted prefix whose cumulative probability is
<= 1 - p, never the largest entry. Removed entries become -inf.
"""
from __future__ import annotations

import torch

from .. import backends
from ..contract import LOGPROB_MODES, SAMPLING_EPS
from ._common import call, check_same_device, check_tensor, define, describe
from .softmax import log_softmax


def _check_mask(logits, top_k, top_p):
    check_tensor("logits", logits, dtypes=(torch.float32,), ndim=2)
    rows = logits.size(0)
    if top_k is not None:
        check_tensor("top_k", top_k, dtypes=(torch.int64,), ndim=1)
        if top_k.size(0) != rows:
            raise ValueError(f"top_k ({describe(top_k)}) needs one entry per row of logits ({rows})")
    if top_p is not None:
        check_tensor("top_p", top_p, dtypes=(torch.float32,), ndim=1)
        if top_p.size(0) != rows:
            raise ValueError(f"top_p ({describe(top_p)}) needs one entry per row of logits ({rows})")
    check_same_device(logits=logits, top_k=top_k, top_p=top_p)


def _mask_impl(logits, top_k=None, top_p=None):
    _check_mask(logits, top_k, top_p)
    rows = logits.size(0)
    k = top_k if top_k is not None else logits.new_zeros(rows, dtype=torch.int64)
    p = top_p if top_p is not None else logits.new_ones(rows, dtype=torch.float32)
    return backends.kernel("top_k_top_p_mask", logits.device)(logits.contiguous(), k.contiguous(), p.contiguous())


def _mask_fake(logits, top_k=None, top_p=None):
    _check_mask(logits, top_k, top_p)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


define("top_k_top_p_mask(Tensor logits, Tensor? top_k=None, Tensor? top_p=None) -> Tensor", _mask_impl, _mask_fake)


def _per_row(value, rows, dtype, device, name):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(rows)
        if value.dim() != 1 or value.size(0) != rows:
            raise ValueError(f"{name} must be a scalar or have one entry per row ({rows}), got {describe(value)}")
        return value.to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    return torch.full((rows,), value, dtype=dtype, device=device)


def top_k_top_p_mask(logits: torch.Tensor, top_k=None, top_p=None) -> torch.Tensor:
    """vLLM's top-k/top-p filter, deterministic: removed logits become -inf (fp32 ``[T, V]``).

    ``top_k``: int or per-row int64 tensor (<= 0 or >= V: off); ``top_p``: float or per-row fp32
    tensor (>= 1: off).
    """
    check_tensor("logits", logits, dtypes=(torch.float32,), ndim=2)
    rows = logits.size(0)
    k = _per_row(top_k, rows, torch.int64, logits.device, "top_k")
    p = _per_row(top_p, rows, torch.float32, logits.device, "top_p")
    if p is not None and bool(((p <= 0) | torch.isnan(p)).any()):
        raise ValueError("top_p must be in (0, 1]")
    return call(torch.ops.batch_invariant.top_k_top_p_mask, logits, k, p)


def apply_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """fp32 logits / temperature per row; temperature < SAMPLING_EPS counts as 1.0 (vLLM greedy)."""
    z = logits.float()
    temp = _per_row(temperature, z.size(0), torch.float32, z.device, "temperature")
    if bool((temp < 0).any()) or bool(torch.isnan(temp).any()):
        raise ValueError("temperature must be >= 0")
    temp = torch.where(temp < SAMPLING_EPS, torch.ones_like(temp), temp)
    return z / temp.unsqueeze(1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature=1.0, top_k=-1,
                   top_p=1.0, mode: str = "raw") -> torch.Tensor:
    """fp32 logprob of ``token_ids[t]`` under row ``t`` of ``logits [T, V]``, vLLM semantics.

    ``mode="raw"`` is vLLM's ``raw_logprobs`` (sampling parameters ignored); ``"processed"`` is
    ``processed_logprobs``: temperature, then the top-k/top-p mask, renormalised over the kept
    set. A token outside the kept set has logprob -inf.
    """
    if mode not in LOGPROB_MODES:
        raise ValueError(f"mode must be one of {LOGPROB_MODES}, got {mode!r}")
    check_tensor("logits", logits, ndim=2)
    check_tensor("token_ids", token_ids, dtypes=(torch.int32, torch.int64), ndim=1)
    check_same_device(logits=logits, token_ids=token_ids)
    if token_ids.size(0) != logits.size(0):
        raise ValueError(f"token_ids ({describe(token_ids)}) needs one id per row of logits ({describe(logits)})")
    vocab = logits.size(1)
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}); got min {int(token_ids.min())}, max {int(token_ids.max())}")
    if mode == "raw":
        lp = log_softmax(logits)
    else:
        lp = log_softmax(top_k_top_p_mask(apply_temperature(logits, temperature), top_k, top_p))
    return lp.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)


def top_k_top_p_mask_ref(logits, top_k=None, top_p=None):
    """Plain torch version of vLLM's algorithm (float64 softmax/cumsum), for tests."""
    out = logits.clone()
    for r in range(logits.size(0)):
        row = logits[r].double()
        vals, idx = torch.sort(row, stable=True)
        v = vals.clone()
        if top_k is not None and 0 < int(top_k[r]) < row.numel():
            v[v < vals[row.numel() - int(top_k[r])]] = float("-inf")
        if top_p is not None and float(top_p[r]) < 1.0:
            cum = torch.cumsum(torch.softmax(v, 0), 0)
            drop = cum <= 1 - float(top_p[r])
            drop[-1] = False
            v[drop] = float("-inf")
        out[r, idx] = v.to(logits.dtype)
    return out


def _register_cpu():
    backends.register_kernel("cpu", "top_k_top_p_mask", backends.cpu_extension().top_k_top_p_mask)


def _mask_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _mask_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return torch.where(torch.isinf(out) & (out < 0), torch.zeros_like(grad), grad), None, None


torch.library.register_autograd("batch_invariant::top_k_top_p_mask", _mask_backward, setup_context=_mask_setup)
