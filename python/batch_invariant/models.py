"""Deterministic local models for tests, demos and benchmarks (no hub: nothing is downloaded).

``make_model(out_dir, arch, size, seed=...)`` builds a Hugging Face causal LM from a config with a
fixed-seed random init, trains a byte-level BPE tokenizer on the self-made corpus of
:mod:`batch_invariant.corpus`, and saves a folder that ``AutoModelForCausalLM`` /
``AutoTokenizer`` / vLLM load offline. The same call gives bitwise-identical files (same
torch / transformers / tokenizers versions); a folder already holding the same model is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ARCHS = {  # arch -> (config class name, architectures entry, tied embeddings by default)
    "llama": ("LlamaConfig", "LlamaForCausalLM", False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", True),
    "mistral": ("MistralConfig", "MistralForCausalLM", False),
}
SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=2048),
    "small": dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, vocab_size=2048),
}
# qwen3 uses an explicit head_dim != hidden / heads (like Qwen3-0.6B: hidden 1024, 16 heads x 128).
QWEN3_HEAD_DIM = {"tiny": 32, "small": 128}
DTYPES = ("bfloat16", "float16", "float32")
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
LM_HEAD_SCALE = 20.0
INIT_STD = 0.02
MAX_POSITIONS = 4096
ROPE_THETA = 10000.0
MANIFEST = "batch_invariant_model.json"
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
MANIFEST_VERSION = 1


def _check(arch: str, size: str, dtype: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def cache_root() -> Path:
    """``$BATCH_INVARIANT_CACHE`` if set, else ``~/.cache/batch-invariant-kernels``."""
    base = os.environ.get("BATCH_INVARIANT_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "batch-invariant-kernels"


def default_model_dir(arch: str = "llama", size: str = "tiny", seed: int = 0, *,
                      tie_word_embeddings: bool | None = None, dtype: str = "bfloat16") -> Path:
    """``<cache>/models/<arch>-<size>-seed<seed>`` (+ ``-tied``/``-untied``/``-<dtype>`` when not default)."""
    _check(arch, size, dtype)
    name = f"{arch}-{size}-seed{int(seed)}"
    if tie_word_embeddings is not None and bool(tie_word_embeddings) != ARCHS[arch][2]:
        name += "-tied" if tie_word_embeddings else "-untied"
    if dtype != "bfloat16":
        name += f"-{dtype}"
    return cache_root() / "models" / name


def train_tokenizer(vocab_size: int = 2048):
    """Byte-level BPE (``tokenizers.Tokenizer``) trained on the built-in corpus; deterministic.

    Specials ``<|bos|>`` (0), ``<|eos|>`` (1), ``<|pad|>`` (2); encoding prepends ``<|bos|>``
    (Llama style); every byte string round-trips (all 256 bytes are in the alphabet).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from batch_invariant.corpus import make_corpus

    tok = Tokenizer(models.BPE())
    # Qwen2-style pipeline (NFC, Qwen split regex, then byte-level): transformers 5 rebuilds
    # exactly this for model_type qwen2 whatever tokenizer.json says, so all archs tokenize alike.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = make_corpus()
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
        special_tokens=[("<|bos|>", BOS_ID)])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    if [tok.token_to_id(s) for s in SPECIAL_TOKENS] != [BOS_ID, EOS_ID, PAD_ID]:
        raise RuntimeError("special tokens did not get ids 0, 1, 2")
    return tok


def make_config(arch: str = "llama", size: str = "tiny", *, tie_word_embeddings: bool | None = None,
                dtype: str = "bfloat16", rope_scaling: dict | None = None):
    """The transformers config (not saved). ``rope_scaling``: e.g. ``{"rope_type": "llama3", ...}``."""
    import transformers

    _check(arch, size, dtype)
    cls_name, architecture, tie_default = ARCHS[arch]
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    if rope_scaling:
        rope = {**dict(rope_scaling), "rope_theta": float(rope_scaling.get("rope_theta", ROPE_THETA))}
        rope.setdefault("rope_type", rope.pop("type", "default"))
    kw = dict(SIZES[size], max_position_embeddings=MAX_POSITIONS, rope_parameters=rope,
              rms_norm_eps=1e-6, initializer_range=INIT_STD, hidden_act="silu",
              tie_word_embeddings=tie_default if tie_word_embeddings is None else bool(tie_word_embeddings),
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
              architectures=[architecture], dtype=dtype)
    if arch == "qwen2":
        kw.update(use_sliding_window=False, sliding_window=None, max_window_layers=kw["num_hidden_layers"])
    elif arch == "qwen3":
        kw.update(head_dim=QWEN3_HEAD_DIM[size], attention_bias=False, use_sliding_window=False,
                  sliding_window=None, max_window_layers=kw["num_hidden_layers"])
    elif arch == "mistral":
        kw.update(sliding_window=None, head_dim=kw["hidden_size"] // kw["num_attention_heads"])
    return getattr(transformers, cls_name)(**kw)


def _param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()[:8], "little") >> 1


def _init_weights(model, seed: int) -> None:
    """Every parameter from its own generator seeded by (seed, name): independent of thread count,
    parameter order and transformers' own init. Norm weights = 1; everything else N(0, 0.02)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            g = torch.Generator().manual_seed(_param_seed(seed, name))
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * INIT_STD)


def _file_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[f.name] = h.hexdigest()
    return out


def _content_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def _state(out_dir: Path, params: dict) -> str:
    """'same' (reusable), 'stale' (our manifest, same params, files changed), 'other'."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return "other"
    if not isinstance(manifest, dict) or manifest.get("params") != params:
        return "other"
    same = manifest.get("content_sha256") == _content_hash(_file_hashes(out_dir))
    return "same" if same else "stale"


def make_model(out_dir, arch: str = "llama", size: str = "tiny", *, seed: int = 0,
               tie_word_embeddings: bool | None = None, dtype: str = "bfloat16",
               rope_scaling: dict | None = None, overwrite: bool = False) -> Path:
    """Make (or reuse) a deterministic random-init model folder; returns its path.

    arch: llama | qwen2 (qkv bias) | qwen3 (q/k RMSNorm, head_dim != hidden/heads, tied by
    default) | mistral (sliding window disabled). size: tiny (hidden 256) | small (hidden 1024,
    ~49M params); both 4 layers, vocab 2048, 4096 positions, rope_theta 1e4.
    ``tie_word_embeddings=None`` keeps the family default (qwen3 tied, others untied).

    Init: each parameter from a generator seeded by (seed, parameter name), N(0, 0.02), norms 1,
    then the logits are scaled x20 so next-token distributions are not flat: the ``lm_head``
    weight for untied models; for tied models the final RMSNorm weight (``model.norm``), which
    scales the logits the same way (scaling the shared embedding would also scale the inputs x20
    and make the model echo its input token with p = 1).

    Saved in ``dtype`` as safetensors with config.json (``architectures``, ``dtype`` and
    ``torch_dtype``), generation_config.json, the tokenizer (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) and a manifest ``batch_invariant_model.json`` (parameters + content
    hash). If ``out_dir`` already holds the model made with the same parameters it is returned
    untouched (our manifest with the same parameters but changed files: rebuilt); a non-empty
    folder holding anything else raises ``FileExistsError`` unless ``overwrite=True``.
    """
    _check(arch, size, dtype)
    out_dir = Path(out_dir).expanduser().resolve()
    config = make_config(arch, size, tie_word_embeddings=tie_word_embeddings, dtype=dtype,
                         rope_scaling=rope_scaling)
    params = {"manifest_version": MANIFEST_VERSION, "arch": arch, "size": size, "seed": int(seed),
              "tie_word_embeddings": bool(config.tie_word_embeddings), "dtype": dtype,
              "rope_parameters": json.loads(json.dumps(config.rope_parameters, sort_keys=True))}
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        state = _state(out_dir, params)
        if state == "same" and not overwrite:
            return out_dir
        if state == "other" and any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{out_dir} is not empty and does not hold this model; "
                                  "pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _build(tmp, config, seed, dtype)
        hashes = _file_hashes(tmp)
        manifest = {"params": params, "files": hashes, "content_sha256": _content_hash(hashes),
                    "versions": _versions()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # mkdtemp / safetensors create owner-only files
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def _build(folder: Path, config, seed: int, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed)
    with torch.no_grad():
        if config.tie_word_embeddings:  # x20 on the shared embedding would make the model echo
            model.model.norm.weight.mul_(LM_HEAD_SCALE)  # its input token (p=1): scale the final norm
        else:
            model.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)
    model = model.to(getattr(torch, dtype)).eval()
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=PAD_ID, do_sample=False,
                                               max_length=MAX_POSITIONS)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # torch_dtype beside dtype for readers that predate transformers 5.
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = dtype
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(config.vocab_size),
                                  bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
                                  pad_token=SPECIAL_TOKENS[2], model_max_length=MAX_POSITIONS,
                                  clean_up_tokenization_spaces=False)
    tok.save_pretrained(folder)
    # PreTrainedTokenizerFast: loadable by transformers 4 and 5 alike (5 writes TokenizersBackend).
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    smap = folder / "special_tokens_map.json"
    if not smap.exists():
        smap.write_text(json.dumps({"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1],
                                    "pad_token": SPECIAL_TOKENS[2]}, indent=2) + "\n")
