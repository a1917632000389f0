"""Elementwise Triton kernels: silu_and_mul, rotary_embedding, write_kv_cache.

No reduction happens here, so any tiling gives the same bits; what fixes the bits is the per-element
operation sequence, spelled out in each kernel and protected from the compiler:

* every launch passes ``enable_fp_fusion=False``: Triton otherwise lets LLVM/ptxas contract
  ``a * b + c`` into an fma (one rounding instead of two), which would change rope's
  ``x1*cos - x2*sin`` and make the bits depend on what the compiler saw fit. Where an fma *is* the
  contract (rms_norm's sum of squares) the kernels say so with ``tl.fma``.
* divisions and square roots that the contract names use ``tl.div_rn`` / ``tl.sqrt_rn`` (IEEE);
  a plain ``/`` is ``div.full.f32`` (approximate) on NVIDIA GPUs.
* exp is ``tl.exp`` (NVIDIA: ``ex2.approx.f32(x * log2(e))``, a fixed formula per architecture;
  the interpreter: numpy). It is not the CPU backend's polynomial ``exp_f32``, so silu_and_mul and
  the softmax family differ from the CPU backend in the last bits -- allowed: bits may differ
  between backends, never within one.

* loads are widened with ``.to(tl.float32)`` (exact) and results rounded once with
  ``.to(dtype)`` (round to nearest even). The interpreter runs this same code: its bf16 casts are
  wrong on their own (truncation, subnormals), so bf16 launches on CPU tensors require the test
  patch that fixes them (interpreter.exact_dot; _launch.require_exact_bf16_casts fails closed).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _launch

# ------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _silu_and_mul_kernel(x_ptr, x_row_stride, out_ptr, out_row_stride, D,
                         BLOCK: tl.constexpr):
    # Program (row, column block): out = round(a / (1 + exp(-a)) * b), a = x[:D], b = x[D:].
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    x_row = x_ptr + row * x_row_stride
    a = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_row + D + cols, mask=mask, other=0.0).to(tl.float32)
    silu = tl.div_rn(a, 1.0 + tl.exp(-a))
    out = (silu * b).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, out, mask=mask)


@triton.jit
def _rope_heads(src, dst, cos, sin, token, num_heads, first_head, head_size, rot_dim, IS_NEOX: tl.constexpr,
                HEADS: tl.constexpr, HALF_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr):
    # Heads [first_head, first_head + HEADS) of one token: rotate the pairs (x1, x2) by the
    # token's angle, x1' = x1*c - x2*s, x2' = x2*c + x1*s: four separate fp32 products (no fma:
    # the launch disables fusion), then one subtraction / addition, one rounding each.
    half = rot_dim // 2
    heads = first_head + tl.arange(0, HEADS)
    i = tl.arange(0, HALF_BLOCK)
    head_mask = heads < num_heads
    pair_mask = head_mask[:, None] & (i < half)[None, :]
    row_offset = (token * num_heads + heads.to(tl.int64)) * head_size  # [HEADS], int64
    if IS_NEOX:  # halves: x1 = x[i], x2 = x[i + half]
        off1 = row_offset[:, None] + i[None, :]
        off2 = off1 + half
    else:  # GPT-J, interleaved: x1 = x[2i], x2 = x[2i + 1]
        off1 = row_offset[:, None] + 2 * i[None, :]
        off2 = off1 + 1
    x1 = tl.load(src + off1, mask=pair_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + off2, mask=pair_mask, other=0.0).to(tl.float32)
    x1_cos = x1 * cos
    x2_sin = x2 * sin
    x2_cos = x2 * cos
    x1_sin = x1 * sin
    out_dtype = dst.dtype.element_ty
    tl.store(dst + off1, (x1_cos - x2_sin).to(out_dtype), mask=pair_mask)
    tl.store(dst + off2, (x2_cos + x1_sin).to(out_dtype), mask=pair_mask)
    if PASS_BLOCK > 0:  # dims [rot_dim, head_size): copied as they are
        d = rot_dim + tl.arange(0, PASS_BLOCK)
        tail_mask = head_mask[:, None] & (d < head_size)[None, :]
        tail = row_offset[:, None] + d[None, :]
        tl.store(dst + tail, tl.load(src + tail, mask=tail_mask), mask=tail_mask)


@triton.jit
def _rope_kernel(positions_ptr, cos_sin_ptr, q_ptr, q_out_ptr, k_ptr, k_out_ptr, num_q_heads, num_k_heads,
                 q_head_blocks, head_size, rot_dim, IS_NEOX: tl.constexpr, HEADS: tl.constexpr,
                 HALF_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr):
    # Program (token, block of HEADS heads): the first q_head_blocks blocks are q's, the rest k's,
    # so one launch rotates both with the token's cos/sin row loaded once per program.
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    half = rot_dim // 2
    i = tl.arange(0, HALF_BLOCK)
    table_row = cos_sin_ptr + tl.load(positions_ptr + token) * rot_dim  # [cos (half) | sin (half)], fp32
    cos = tl.load(table_row + i, mask=i < half, other=0.0)[None, :]
    sin = tl.load(table_row + half + i, mask=i < half, other=0.0)[None, :]
    if head_block < q_head_blocks:
        _rope_heads(q_ptr, q_out_ptr, cos, sin, token, num_q_heads, head_block * HEADS, head_size, rot_dim,
                    IS_NEOX, HEADS, HALF_BLOCK, PASS_BLOCK)
    else:
        _rope_heads(k_ptr, k_out_ptr, cos, sin, token, num_k_heads, (head_block - q_head_blocks) * HEADS,
                    head_size, rot_dim, IS_NEOX, HEADS, HALF_BLOCK, PASS_BLOCK)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
                     key_t_stride, key_h_stride, value_t_stride, value_h_stride,
                     kc_block_stride, kc_slot_stride, kc_head_stride,
                     vc_block_stride, vc_slot_stride, vc_head_stride,
                     num_heads, head_size, block_size, num_slots,
                     HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (token, block of HEADS heads): copy key/value bits (integer views) to the token's
    # slot. Slots < 0 (padding) and >= num_slots (rejected on the host when it can check) write
    # nothing.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    if (slot < 0) | (slot >= num_slots):
        return
    block, in_block = slot // block_size, slot % block_size
    heads = (tl.program_id(1) * HEADS + tl.arange(0, HEADS)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (d < head_size)[None, :]
    k_src = key_ptr + token * key_t_stride + heads[:, None] * key_h_stride + d[None, :]
    v_src = value_ptr + token * value_t_stride + heads[:, None] * value_h_stride + d[None, :]
    k_dst = (key_cache_ptr + block * kc_block_stride + in_block * kc_slot_stride
             + heads[:, None] * kc_head_stride + d[None, :])
    v_dst = (value_cache_ptr + block * vc_block_stride + in_block * vc_slot_stride
             + heads[:, None] * vc_head_stride + d[None, :])
    tl.store(k_dst, tl.load(k_src, mask=mask), mask=mask)
    tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)


# ------------------------------------------------------------------------------------------
# Launchers (signatures and results of the CPU extension's functions of the same names).

_BITS = {2: torch.int16, 4: torch.int32}


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _launch.TL_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype} (shape {tuple(t.shape)})")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x ``[T, 2D]`` (contiguous last dim) -> ``[T, D]`` = round(silu(a) * b), fp32 math."""
    _launch.check_device("silu_and_mul", x)
    _check_float("x", x)
    _launch.require_exact_bf16_casts("silu_and_mul", x)
    if x.dim() != 2 or x.size(1) % 2 or (x.size(1) > 1 and x.stride(1) != 1):
        raise ValueError(f"silu_and_mul: x must be [T, 2*D] with a contiguous last dim, got shape "
                         f"{tuple(x.shape)}, strides {x.stride()}, dtype {x.dtype}")
    rows, d = x.size(0), x.size(1) // 2
    out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if rows == 0 or d == 0:
        return out
    # Elementwise: the tiling cannot change the bits; 1024-wide blocks keep loads vectorised.
    block = _launch.row_block(d, cap=1024)
    grid = (rows, triton.cdiv(d, block))
    _silu_and_mul_kernel[grid](x, x.stride(0), out, out.stride(0), d, BLOCK=block,
                               num_warps=_launch.row_warps(block), enable_fp_fusion=False)
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, Hq*D]`` / ``[T, Hq, D]`` and k by ``positions``; returns new (q, k)."""
    _launch.check_device("rotary_embedding", positions, q, k, cos_sin_cache)
    _check_float("q", q)
    if k.dtype != q.dtype:
        raise TypeError(f"rotary_embedding: q ({q.dtype}) and k ({k.dtype}) must share a dtype")
    _launch.require_exact_bf16_casts("rotary_embedding", q)
    if positions.dtype != torch.int64 or positions.dim() != 1:
        raise TypeError(f"rotary_embedding: positions must be int64 [T], got {positions.dtype} "
                        f"{tuple(positions.shape)}")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2:
        raise TypeError(f"rotary_embedding: cos_sin_cache must be fp32 [max_pos, rot_dim], got "
                        f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
    if not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"rotary_embedding: head_size must be a positive int, got {head_size!r}")
    tokens, rot_dim = positions.size(0), cos_sin_cache.size(1)
    for name, t in (("q", q), ("k", k)):
        width = math.prod(t.shape[1:])
        if (t.dim() not in (2, 3) or t.size(0) != tokens or width % head_size
                or (t.dim() == 3 and t.size(2) != head_size)):
            raise ValueError(f"rotary_embedding: {name} must be [T, heads*{head_size}] or [T, heads, {head_size}] "
                             f"with T = {tokens}, got shape {tuple(t.shape)}")
    if rot_dim % 2 or rot_dim > head_size:
        raise ValueError(f"rotary_embedding: rot_dim {rot_dim} must be even and <= head_size {head_size}")
    positions, q, k, cos_sin_cache = (t.contiguous() for t in (positions, q, k, cos_sin_cache))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if tokens == 0:
        return q_out, k_out
    num_q_heads = math.prod(q.shape[1:]) // head_size
    num_k_heads = math.prod(k.shape[1:]) // head_size
    # Heads per program: <= 512 rotated pairs (1024 elements) per program, e.g. 8 heads of 128;
    # elementwise, so this only affects speed.
    half_block = triton.next_power_of_2(max(rot_dim // 2, 1))
    heads = min(triton.next_power_of_2(max(num_q_heads, num_k_heads, 1)), max(1, 512 // half_block))
    pass_width = head_size - rot_dim
    q_head_blocks = triton.cdiv(num_q_heads, heads)
    grid = (tokens, q_head_blocks + triton.cdiv(num_k_heads, heads))
    _rope_kernel[grid](positions, cos_sin_cache, q, q_out, k, k_out, num_q_heads, num_k_heads, q_head_blocks,
                       head_size, rot_dim, IS_NEOX=bool(is_neox), HEADS=heads, HALF_BLOCK=half_block,
                       PASS_BLOCK=triton.next_power_of_2(pass_width) if pass_width else 0,
                       num_warps=4, enable_fp_fusion=False)
    return q_out, k_out


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Copy key/value ``[T, Hk, D]`` into the paged caches ``[NB, BS, Hk, D]`` (any strides, last
    dim contiguous) at ``slot_mapping`` (int64 [T]); slots < 0 are skipped; out-of-range slots
    raise ValueError."""
    _launch.check_device("write_kv_cache", key, value, key_cache, value_cache, slot_mapping)
    _check_float("key", key)
    if len({key.dtype, value.dtype, key_cache.dtype, value_cache.dtype}) != 1:
        raise TypeError(f"write_kv_cache: key {key.dtype}, value {value.dtype}, key_cache {key_cache.dtype} and "
                        f"value_cache {value_cache.dtype} must share one dtype")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"write_kv_cache: key_cache/value_cache must both be [num_blocks, block_size, heads, "
                         f"head_size], got {tuple(key_cache.shape)} / {tuple(value_cache.shape)}")
    num_blocks, block_size, num_heads, head_size = key_cache.shape
    if key.dim() != 3 or key.shape[1:] != (num_heads, head_size) or value.shape != key.shape:
        raise ValueError(f"write_kv_cache: key/value must be [T, {num_heads}, {head_size}], got "
                         f"{tuple(key.shape)} / {tuple(value.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.size(0) != key.size(0):
        raise ValueError(f"write_kv_cache: slot_mapping must be [{key.size(0)}], got {tuple(slot_mapping.shape)}")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.size(-1) > 1 and t.stride(-1) != 1:
            raise ValueError(f"write_kv_cache: {name} must have a contiguous last dim, got strides {t.stride()}")
    tokens, num_slots = key.size(0), num_blocks * block_size
    if tokens == 0 or num_heads == 0 or head_size == 0:
        return
    slots = slot_mapping.to(torch.int64).contiguous()
    # The bounds check needs the slots on the host (a sync on GPUs); it is skipped while a CUDA
    # graph is being captured, where the kernel still drops out-of-range slots instead of
    # writing outside the cache.
    capturing = slots.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and int(slots.max()) >= num_slots:
        bad = int(torch.argmax((slots >= num_slots).to(torch.int8)))
        raise ValueError(f"write_kv_cache: slot_mapping[{bad}] = {int(slots[bad])} is out of range for a cache of "
                         f"{num_blocks} blocks x {block_size} slots")
    # Integer views: a pure bit copy (no float conversion can touch NaN payloads or subnormals).
    bits = _BITS[key.element_size()]
    kc, vc = key_cache.view(bits), value_cache.view(bits)
    block_d = triton.next_power_of_2(head_size)
    heads = min(triton.next_power_of_2(num_heads), max(1, 1024 // block_d))
    grid = (tokens, triton.cdiv(num_heads, heads))
    _write_kv_kernel[grid](key.view(bits), value.view(bits), kc, vc, slots,
                           key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                           kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
                           num_heads, head_size, block_size, num_slots, HEADS=heads, BLOCK_D=block_d,
                           num_warps=4, enable_fp_fusion=False)


KERNELS = {"silu_and_mul": silu_and_mul, "rotary_embedding": rotary_embedding, "write_kv_cache": write_kv_cache}
