"""The trainer on the Triton backend (the backend it uses on CUDA tensors), run through the
interpreter at a tiny size: logprobs vs transformers, packing invariance, deterministic
forward + backward. On a GPU (BATCH_INVARIANT_TEST_DEVICE=cuda) the same test runs on CUDA."""
from __future__ import annotations

import pytest
import torch

import batch_invariant as bi
from batch_invariant import backends
from batch_invariant import testing as T

transformers = pytest.importorskip("transformers", reason="transformers is needed to make a reference checkpoint")

OPS = ("linear", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "attention",
       "attention_with_lse", "attention_backward", "log_softmax", "mean", "top_k_top_p_mask")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=16, intermediate_size=48, vocab_size=64, max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(4)  # peaked distributions, like a trained model
    path = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g) for n in lengths]


def test_trainer_on_triton(triton_device, checkpoint):
    for op in OPS:
        if not backends.has_kernel("triton", op):
            pytest.skip(f"triton backend has no {op} kernel here")
    path, hf = checkpoint
    model = bi.trainer.load_model(path, dtype=torch.float32, device=triton_device)
    probe, others = _seqs([9])[0], _seqs([5, 12], seed=1)
    with torch.no_grad():
        alone = model.token_logprobs([probe.to(triton_device)], [3])[0]
        # Reason: fp32 throughout; our K order differs from torch's: a few fp32 ulps per layer.
        ids = probe.unsqueeze(0)
        ref = torch.log_softmax(hf(ids).logits[0, 2:-1].double(), -1).gather(1, ids[0, 3:, None])[:, 0]
        assert T.max_abs_error(alone.cpu(), ref) < 1e-4
        packed = model.token_logprobs([s.to(triton_device) for s in (others[0], probe, others[1])], [2, 3, 4])
        assert T.bits_equal(packed[1], alone)
    # Forward + backward: deterministic bits, gradients reach every parameter.
    grads = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        lp = model.token_logprobs([s.to(triton_device) for s in (probe, others[1])], [3, 4])
        torch.cat(lp).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(g is not None and torch.isfinite(g).all() for g in grads[0].values())
    assert all(T.bits_equal(grads[0][n], grads[1][n]) for n in grads[0])
