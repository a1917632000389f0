"""Rotary position embedding and the builder of its fp32 cos/sin table.

Contract: the cos/sin table is computed in float64 on the CPU and rounded once to fp32 (identical
on every device); the rotation is fp32: x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin (no fma),
one rounding to the input dtype. Dims past rot_dim pass through unchanged.
"""
from __future__ import annotations

import math

import torch

from .. import backends
from ._common import call, check_same_device, check_tensor, define, describe


def _check(positions, q, k, head_size, cos_sin_cache, is_neox):
    check_tensor("positions", positions, dtypes=(torch.int64,), ndim=1)
    check_tensor("q", q, min_ndim=2)
    check_tensor("k", k, min_ndim=2)
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=(torch.float32,), ndim=2)
    check_same_device(q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    if q.dtype != k.dtype:
        raise TypeError(f"q ({describe(q)}) and k ({describe(k)}) must share a dtype")
    if not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size must be a positive int, got {head_size!r}")
    for name, t in (("q", q), ("k", k)):
        if t.size(0) != positions.size(0):
            raise ValueError(f"{name} ({describe(t)}) needs one row per position ({positions.size(0)})")
        width = t.size(-1) if t.dim() == 2 else t.size(-1) * (t.size(-2) if t.dim() == 3 else -1)
        if t.dim() > 3 or width % head_size != 0 or (t.dim() == 3 and t.size(-1) != head_size):
            raise ValueError(f"{name} must be [T, heads*{head_size}] or [T, heads, {head_size}], got {describe(t)}")
    rot_dim = cos_sin_cache.size(1)
    if rot_dim % 2 != 0 or rot_dim > head_size:
        raise ValueError(f"cos_sin_cache ({describe(cos_sin_cache)}) must have an even rot_dim <= head_size ({head_size})")


def _impl(positions, q, k, head_size, cos_sin_cache, is_neox):
    _check(positions, q, k, head_size, cos_sin_cache, is_neox)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.size(0)):
        raise ValueError(f"positions must be in [0, {cos_sin_cache.size(0)}) (the cos/sin table's length); "
                         f"got min {int(positions.min())}, max {int(positions.max())}")
    fn = backends.kernel("rotary_embedding", q.device)
    return fn(positions.contiguous(), q.contiguous(), k.contiguous(), head_size, cos_sin_cache.contiguous(), is_neox)


def _fake(positions, q, k, head_size, cos_sin_cache, is_neox):
    _check(positions, q, k, head_size, cos_sin_cache, is_neox)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


define("rotary_embedding(Tensor positions, Tensor q, Tensor k, int head_size, Tensor cos_sin_cache, "
       "bool is_neox) -> (Tensor, Tensor)", _impl, _fake)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, Hq*head_size]`` and ``k`` by ``positions``; returns new tensors.

    ``cos_sin_cache``: fp32 ``[max_position, rot_dim]`` from :func:`rope_cos_sin_cache`.
    ``is_neox``: rotate halves (Llama/Qwen/Mistral) instead of interleaved pairs (GPT-J).
    """
    return call(torch.ops.batch_invariant.rotary_embedding, positions, q, k, int(head_size), cos_sin_cache, bool(is_neox))


# ------------------------------------------------------------------------------------------
# cos/sin table

def _inv_freq(rot_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))


def _llama3_inv_freq(inv_freq, scaling):
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(rot_dim, base, scaling):
    factor = float(scaling["factor"])
    orig = int(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast", 32))
    beta_slow = float(scaling.get("beta_slow", 1))
    extrapolation = float(scaling.get("extrapolation_factor", 1.0))

    def corr_dim(num_rot):
        return (rot_dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    mask = (1 - ramp) * extrapolation
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - mask) + (1.0 / pos_freqs) * mask
    attn = scaling.get("attention_factor")
    if attn is None:  # YaRN's default attention scaling, folded into cos/sin as vLLM and HF do
        attn = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attn)


def rope_cos_sin_cache(rot_dim: int, max_position: int, base: float = 10000.0,
                       rope_scaling: dict | None = None) -> torch.Tensor:
    """fp32 ``[max_position, rot_dim]`` table ``[cos | sin]`` (CPU; move it to the device).

    ``rope_scaling`` is the Hugging Face config entry: ``None``/``default``, ``linear``,
    ``llama3`` (Llama 3.x) and ``yarn`` (Qwen long context). Other types raise ValueError.
    """
    if not isinstance(rot_dim, int) or rot_dim <= 0 or rot_dim % 2:
        raise ValueError(f"rot_dim must be a positive even int, got {rot_dim!r}")
    if not isinstance(max_position, int) or max_position <= 0:
        raise ValueError(f"max_position must be a positive int, got {max_position!r}")
    kind = "default" if not rope_scaling else rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    positions = torch.arange(max_position, dtype=torch.float64)
    mscale = 1.0
    if kind == "default":
        inv_freq = _inv_freq(rot_dim, base)
    elif kind == "linear":
        inv_freq = _inv_freq(rot_dim, base)
        positions = positions / float(rope_scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(_inv_freq(rot_dim, base), rope_scaling)
    elif kind == "yarn":
        inv_freq, mscale = _yarn(rot_dim, base, rope_scaling)
    else:
        raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3, yarn); "
                         "dynamic NTK scaling depends on the sequence length and cannot be batch-invariant")
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], dim=-1).to(torch.float32)


def rotary_embedding_ref(positions, q, k, head_size, cos_sin_cache, is_neox=True):
    def rot(x):
        shape = x.shape
        x = x.double().reshape(x.size(0), -1, head_size)
        rot_dim = cos_sin_cache.size(1)
        cos, sin = cos_sin_cache.double()[positions].chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        xr, rest = x[..., :rot_dim], x[..., rot_dim:]
        if is_neox:
            x1, x2 = xr.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        return torch.cat([out, rest], dim=-1).reshape(shape)
    return rot(q).to(q.dtype), rot(k).to(k.dtype)


def _register_cpu():
    backends.register_kernel("cpu", "rotary_embedding", backends.cpu_extension().rotary_embedding)


# ------------------------------------------------------------------------------------------
# Autograd: the rotation is orthogonal, so the gradient is the rotation by -theta: the same op
# with the sin half of the table negated (rows gathered for the positions used).

def _setup(ctx, inputs, output):
    positions, q, k, head_size, cache, is_neox = inputs
    ctx.save_for_backward(positions, cache)
    ctx.head_size, ctx.is_neox = head_size, is_neox
    ctx.shapes = (q.shape, q.dtype, k.shape)


def _backward(ctx, grad_q, grad_k):
    positions, cache = ctx.saved_tensors
    rows = cache.index_select(0, positions)
    cos, sin = rows.chunk(2, dim=-1)
    inverse = torch.cat([cos, -sin], dim=-1)
    local = torch.arange(positions.numel(), device=positions.device)
    q_shape, dtype, k_shape = ctx.shapes
    gq = grad_q if grad_q is not None else torch.zeros(q_shape, dtype=dtype, device=positions.device)
    gk = grad_k if grad_k is not None else torch.zeros(k_shape, dtype=dtype, device=positions.device)
    dq, dk = rotary_embedding(local, gq, gk, ctx.head_size, inverse, ctx.is_neox)
    return None, dq, dk, None, None, None


torch.library.register_autograd("batch_invariant::rotary_embedding", _backward, setup_context=_setup)
