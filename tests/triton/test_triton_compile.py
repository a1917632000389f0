"""The Triton backend under torch.compile: the ops stay opaque custom ops (fullgraph, dynamic
shapes) and the compiled graph gives the eager bits."""
from __future__ import annotations

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T


def _rand(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def test_compiled_block_equals_eager(triton_device, require):
    for op in ("linear", "rms_norm", "silu_and_mul", "log_softmax"):
        require("triton", op)
    dev = triton_device
    w_up = _rand(64, 32, dtype=torch.bfloat16, device=dev, seed=1) * 0.2
    w_down = _rand(32, 32, dtype=torch.bfloat16, device=dev, seed=2) * 0.2
    norm_w = _rand(32, dtype=torch.bfloat16, device=dev, seed=3)

    def block(x):
        h = bi.rms_norm(x, norm_w, 1e-6)
        h = bi.silu_and_mul(bi.linear(h, w_up))
        return bi.log_softmax(bi.linear(h, w_down))

    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (1, 5, 17):
        x = _rand(rows, 32, dtype=torch.bfloat16, device=dev, seed=10 + rows)
        assert T.bits_equal(compiled(x), block(x)), rows
