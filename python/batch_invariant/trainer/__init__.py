"""The matching trainer: a decoder-only model built only from batch_invariant ops, loading Hugging
Face checkpoints, computing token logprobs with the engine's semantics, and training helpers.

    model = bi.trainer.load_model("path/to/ckpt", dtype=torch.bfloat16)
    lps = model.token_logprobs(sequences, prompt_lens, temperature=0.8, mode="processed")
"""
from __future__ import annotations

from .config import ARCHITECTURES, ModelConfig, UnsupportedModelError
from .loading import load_model, read_state_dict
from .logprobs import completion_logprobs
from .model import CausalLM, PackedBatch
from .training import make_optimizer, policy_gradient_loss, train_step

__all__ = ["ARCHITECTURES", "CausalLM", "ModelConfig", "PackedBatch", "UnsupportedModelError", "completion_logprobs",
           "load_model", "make_optimizer", "policy_gradient_loss", "read_state_dict", "train_step"]
