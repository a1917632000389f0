"""Load a Hugging Face checkpoint folder (config.json + single or sharded safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .model import CausalLM

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{path} has no safetensors weights (model.safetensors or an index)")
    return found


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        state.update(load_file(str(file)))
    return state


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               lm_head_dtype: torch.dtype | None = None) -> CausalLM:
    """Build the batch-invariant model for the checkpoint at `path` and load its weights.

    ``lm_head_dtype=torch.float32`` computes logits as fp32 hidden x fp32 weight (the weight is
    converted exactly from the checkpoint; a tied head uses the embedding converted on the fly).
    Raises UnsupportedModelError (a ValueError) naming what is not supported.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    biases = {p: any(k.endswith(f".{p}.bias") for k in state) for p in _PROJECTIONS}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = CausalLM(cfg, dtype, lm_head_dtype, biases)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the {cfg.family} model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, param in expected.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)} != model {tuple(param.shape)}")
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name].to(param.dtype))
    model.reset_rope_table()
    return model
