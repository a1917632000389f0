"""top-k/top-p mask and token logprobs (vLLM raw/processed semantics)."""
from __future__ import annotations

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops.sampling import top_k_top_p_mask_ref


def _logits(rows, vocab, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def test_mask_matches_vllm_algorithm(backend, require):
    require(backend, "top_k_top_p_mask")
    x = _logits(12, 1000, 1)
    k = torch.tensor([0, 1, 5, 50, 999, 1000, 2000, -1, 0, 7, 20, 3], dtype=torch.int64)
    p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.9, 0.1, 0.999, 0.3, 0.95, 1e-6], dtype=torch.float32)
    got = bi.top_k_top_p_mask(x, k, p)
    ref = top_k_top_p_mask_ref(x, k, p)
    # Kept entries keep their exact values; the kept sets agree except where the fp64 reference
    # cumsum sits within fp32 rounding of the 1 - p boundary (none for these random rows).
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert T.bits_equal(got[~torch.isinf(got)], x[~torch.isinf(got)])


def test_mask_ties_and_boundaries(backend, require):
    require(backend, "top_k_top_p_mask")
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    # top-k=2: threshold is the 2nd largest (3.0); ties with it are kept (vLLM keeps all 3.0s).
    assert torch.isinf(bi.top_k_top_p_mask(x, 2, None)).tolist() == [[True, False, False, True, False, True]]
    # top-p tiny: only the largest entry survives (never remove the last sorted entry); with
    # ties the stable ascending sort puts the highest index last.
    kept = ~torch.isinf(bi.top_k_top_p_mask(x, None, 1e-6))
    assert kept.tolist() == [[False, False, False, False, True, False]]
    assert T.bits_equal(bi.top_k_top_p_mask(x, 0, 1.0), x)  # both off: unchanged


def test_mask_row_invariance(backend, require):
    require(backend, "top_k_top_p_mask")
    k = torch.tensor(17)
    p = torch.tensor(0.9)
    fails = T.row_invariance_mismatches(lambda x: bi.top_k_top_p_mask(x, k, p), lambda m, s: _logits(m, 3001, s),
                                        batch_sizes=(1, 2, 7, 64))
    assert not fails


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_token_logprobs_semantics(backend, require, mode):
    require(backend, "log_softmax")
    require(backend, "top_k_top_p_mask")
    x = _logits(6, 500, 3).bfloat16()
    ids = torch.tensor([0, 5, 499, 17, 250, 3])
    temp = torch.tensor([1.0, 0.7, 0.0, 1.3, 0.5, 1e-7])
    got = bi.token_logprobs(x, ids, temperature=temp, top_k=50, top_p=0.95, mode=mode)
    assert got.dtype == torch.float32 and got.shape == (6,)
    z = x.double()
    if mode == "raw":
        ref = torch.log_softmax(z, -1)
    else:
        t = torch.where(temp < 1e-5, torch.ones_like(temp), temp).double()
        masked = top_k_top_p_mask_ref((x.float() / t.float().unsqueeze(1)), torch.full((6,), 50), torch.full((6,), 0.95))
        ref = torch.log_softmax(masked.double(), -1)
    ref = ref.gather(1, ids.unsqueeze(1)).squeeze(1)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite)
    # Reason: fp32 log_softmax of fp32 inputs: a few fp32 ulps of |logit| + log(V).
    assert T.max_abs_error(got[finite], ref[finite]) <= 1e-5
    # Identical to the op composition the engine uses, bit for bit.
    if mode == "raw":
        assert T.bits_equal(got, bi.log_softmax(x).gather(1, ids.unsqueeze(1)).squeeze(1))


def test_token_logprobs_bad_input():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        bi.token_logprobs(x, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="mode"):
        bi.token_logprobs(x, torch.tensor([0, 1, 2]), mode="weird")
    with pytest.raises(ValueError, match="one id per row"):
        bi.token_logprobs(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="dtype"):
        bi.token_logprobs(x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="temperature"):
        bi.token_logprobs(x, torch.tensor([0, 1, 2]), temperature=-1.0, mode="processed")
    with pytest.raises(ValueError, match="top_p"):
        bi.top_k_top_p_mask(x, None, 0.0)
    with pytest.raises(TypeError, match="dtype"):
        bi.top_k_top_p_mask(x.bfloat16(), 5, None)
