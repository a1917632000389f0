"""The local model maker: loadable offline, non-flat, deterministic, cached, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from batch_invariant import models  # noqa: E402
from batch_invariant.corpus import make_corpus  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TEXTS = ("def foo(x, y=3):\n    return x + y  # The quick model reads 12345 tokens.",
         "Café naïve — 東京\r\n\t tabs  and   spaces 3.14159e-10!\n\n")


def _hashes(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: models.make_model(root / arch, arch, "tiny", seed=0) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_offline_and_is_not_flat(built, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built[arch]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [models.ARCHS[arch][1]]
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert cfg["vocab_size"] == 2048 and cfg["max_position_embeddings"] == 4096
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", models.MANIFEST):
        assert (path / f).is_file(), f

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in TEXTS:  # transformers' class (Qwen2Tokenizer for qwen2) == tokenizer.json
        ids = tok(text).input_ids
        assert ids == raw.encode(text).ids and ids[0] == models.BOS_ID
        assert tok.decode(ids, skip_special_tokens=True) == text

    ids = torch.tensor([tok(TEXTS[0]).input_ids])
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all()
    pmax = logits.softmax(-1).max(-1).values
    assert (pmax > 2 / 2048).all() and pmax.mean() > 0.1, pmax
    # the model does not just echo its input token (the trap of scaling a tied embedding)
    assert (logits.argmax(-1) == ids).float().mean() < 0.5

    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    assert hasattr(attn, "q_norm") == (arch == "qwen3")
    assert model.config.tie_word_embeddings == (arch == "qwen3")
    if arch == "qwen3":  # head_dim != hidden / heads
        assert model.config.head_dim == 32 and attn.q_proj.weight.shape == (4 * 32, 256)
    if arch in ("mistral", "qwen2", "qwen3"):
        assert model.config.sliding_window is None


def test_variant_tied_fp32_llama3_rope(tmp_path):
    from transformers import AutoModelForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024}
    path = models.make_model(tmp_path / "m", "llama", "tiny", seed=3, tie_word_embeddings=True,
                             dtype="float32", rope_scaling=rope)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        p = model(ids).logits.softmax(-1)
    assert p.max(-1).values.mean() > 0.1


def test_same_call_gives_identical_files(built, tmp_path):
    again = models.make_model(tmp_path / "again", "llama", "tiny", seed=0)
    assert _hashes(again) == _hashes(built["llama"])
    other = models.make_model(tmp_path / "seed1", "llama", "tiny", seed=1)
    assert _hashes(other)["model.safetensors"] != _hashes(again)["model.safetensors"]


def test_tokenizer_and_corpus_deterministic():
    assert make_corpus(50_000) == make_corpus(50_000) != make_corpus(50_000, seed=1)
    assert models.train_tokenizer().to_str() == models.train_tokenizer().to_str()


def test_cache_reuse_and_overwrite(tmp_path):
    out = tmp_path / "m"
    path = models.make_model(out, "mistral", "tiny")
    stamp = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    assert models.make_model(out, "mistral", "tiny") == path
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == stamp
    with pytest.raises(FileExistsError):  # a different model in the same folder
        models.make_model(out, "mistral", "tiny", seed=5)
    models.make_model(out, "mistral", "tiny", overwrite=True)
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp["model.safetensors"]
    (path / "config.json").write_text("{}")  # changed files of our own model: rebuilt
    models.make_model(out, "mistral", "tiny")
    assert json.loads((path / "config.json").read_text())["model_type"] == "mistral"
    with pytest.raises(FileExistsError):  # a folder that is not ours
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "x").write_text("x")
        models.make_model(tmp_path / "foreign")


def test_bad_args(tmp_path):
    with pytest.raises(ValueError, match="llama, qwen2, qwen3, mistral"):
        models.make_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="tiny, small"):
        models.make_model(tmp_path, "llama", "huge")
    with pytest.raises(ValueError, match="bfloat16"):
        models.make_model(tmp_path, dtype="int8")
    with pytest.raises(ValueError):
        models.default_model_dir("nope")


def test_default_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCH_INVARIANT_CACHE", str(tmp_path))
    assert models.default_model_dir("qwen3", "small", 2) == tmp_path / "models" / "qwen3-small-seed2"
    assert models.default_model_dir("qwen3", tie_word_embeddings=False).name == "qwen3-tiny-seed0-untied"
    monkeypatch.delenv("BATCH_INVARIANT_CACHE")
    assert models.default_model_dir().parent.parent.name == "batch-invariant-kernels"


def test_cli(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "batch_invariant.cli", "make-model"]
    out = tmp_path / "cli"
    r = subprocess.run(cmd + [str(out), "--arch", "qwen2", "--no-tie", "--dtype", "float16"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out.resolve())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["dtype"] == "float16"
    r = subprocess.run(cmd + [str(out), "--arch", "llama"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "error" in r.stderr
