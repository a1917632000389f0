"""torch.library.opcheck on every op, and the ops inside torch.compile (opaque custom ops)."""
from __future__ import annotations

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops import OP_NAMES


def _samples():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    kc, vc = r(4, 16, 2, 64), r(4, 16, 2, 64)
    idx = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    samples = {
        "linear": (r(5, 64), r(7, 64), r(7), None),
        "matmul": (r(5, 64), r(64, 7)),
        "bmm": (r(2, 5, 64), r(2, 64, 7)),
        "rms_norm": (r(5, 64), r(64), 1e-6),
        "fused_add_rms_norm": (r(5, 64), r(5, 64), r(64), 1e-6),
        "silu_and_mul": (r(5, 64),),
        "log_softmax": (r(5, 64), None),
        "softmax": (r(5, 64), None),
        "mean": (r(5, 64), None),
        "top_k_top_p_mask": (r(5, 64, dt=torch.float32), torch.tensor([1, 2, 3, 0, 70]), torch.full((5,), 0.9)),
        "rotary_embedding": (torch.arange(5), r(5, 256), r(5, 128), 64, bi.rope_cos_sin_cache(64, 16), True),
        "write_kv_cache": (r(3, 2, 64), r(3, 2, 64), kc.clone(), vc.clone(), torch.tensor([0, 17, -1])),
        "attention": (r(6, 4, 64), kc, vc, idx([0, 2, 6]), idx([20, 4]), idx([[1, 2, 0, 0], [3, 0, 0, 0]]), 0.125),
    }
    meta = (idx([0, 2, 6]), idx([20, 4]), idx([[1, 2, 0, 0], [3, 0, 0, 0]]))
    q = r(6, 4, 64)
    samples["attention_with_lse"] = (q, kc, vc, *meta, 0.125)
    out, lse = torch.ops.batch_invariant.attention_with_lse(q, kc, vc, *meta, 0.125)
    samples["attention_backward"] = (r(6, 4, 64), q, kc, vc, out, lse, *meta, 0.125)
    return samples


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(require, name):
    op = getattr(torch.ops.batch_invariant, name)
    kernel = {"matmul": "linear", "bmm": "bmm_nt", "mean": "mean"}.get(name, name)
    require("cpu", kernel)
    torch.library.opcheck(op.default, _samples()[name])


def test_ops_inside_torch_compile(require):
    require("cpu", "linear")
    require("cpu", "rms_norm")

    def block(x, w, nw):
        h = bi.rms_norm(x, nw, 1e-6)
        return bi.log_softmax(bi.linear(h, w))

    x, w, nw = torch.randn(9, 64), torch.randn(32, 64), torch.ones(64)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    assert T.bits_equal(compiled(x, w, nw), block(x, w, nw))
    assert T.bits_equal(compiled(x[:3], w, nw), block(x[:3], w, nw))
