"""Model configuration read from a Hugging Face ``config.json``: the supported decoder-only families
and a clear error for anything the batch-invariant model cannot reproduce."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

#: HF architecture name -> family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
_SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or feature this package cannot run batch-invariantly."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    partial_rotary_factor: float = 1.0

    @property
    def rot_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            raise UnsupportedModelError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                                        f"supported: {', '.join(ARCHITECTURES)}")
        _reject_unsupported(cfg, family)
        heads = int(cfg["num_attention_heads"])
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)) or 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in _SUPPORTED_ROPE:
            raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (supported: {', '.join(_SUPPORTED_ROPE)})")
        scaling = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            rope_scaling=scaling,
            partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
        return cls.from_dict(json.loads(file.read_text()))


def _reject_unsupported(cfg: dict, family: str) -> None:
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise UnsupportedModelError(f"activation {act!r} is not supported (only silu)")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            raise UnsupportedModelError(f"mixture-of-experts models ({key}={cfg[key]}) are not supported")
    window = cfg.get("sliding_window")
    uses_window = window is not None and cfg.get("use_sliding_window", family == "mistral")
    if uses_window or "sliding_attention" in (cfg.get("layer_types") or []):
        raise UnsupportedModelError(f"sliding-window attention (sliding_window={window}) is not supported")
    if cfg.get("quantization_config"):
        raise UnsupportedModelError("quantized checkpoints are not supported")
    if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
        raise UnsupportedModelError("logit soft-capping is not supported")
