"""Layer replacements for vLLM 0.32 (imported only when BATCH_INVARIANT=1, by compat_v0_32).

Every class subclasses the vLLM class it replaces (vLLM swaps classes by exact name at
construction) and overrides ``forward`` itself, so the result does not depend on vLLM's
custom-op enablement or compile mode: each forward is one ``torch.ops.batch_invariant`` call,
the same op the trainer uses, opaque to torch.compile.
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

import batch_invariant as bi

_ops = torch.ops.batch_invariant


class BatchInvariantUnsupported(RuntimeError):
    """BATCH_INVARIANT=1 and this layer / configuration cannot be run batch-invariantly."""


class BILinearMethod(UnquantizedLinearMethod):
    """Every unquantized linear (merged QKV / gate-up, row-parallel, replicated): bi.linear on
    the raw [N, K] weight. The weight is never prepacked, so in-place weight updates just work
    (RL pushes new weights every step)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        return None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _ops.linear(x, layer.weight, bias, None)


class BIEmbeddingMethod(UnquantizedEmbeddingMethod):
    """Embedding lookups stay exact gathers; the (tied or untied) lm_head is bi.linear."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        return None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _ops.linear(x, layer.weight, bias, None)


class BILogitsProcessor(LogitsProcessor):
    """The lm_head projection, honouring ``hf_overrides={"head_dtype": "float32"}`` with the
    contract's definition: fp32 hidden state x fp32 weight through the fp32 kernel."""

    def _apply_head(self, lm_head, hidden_states: torch.Tensor, embedding_bias: torch.Tensor | None) -> torch.Tensor:
        head_dtype = self.head_dtype
        if head_dtype is None or head_dtype == hidden_states.dtype:
            return _ops.linear(hidden_states, lm_head.weight, embedding_bias, None)
        if head_dtype != torch.float32:
            raise BatchInvariantUnsupported(f"head_dtype {head_dtype} is not supported (model dtype or float32)")
        bias = None if embedding_bias is None else embedding_bias.float()
        return _ops.linear(hidden_states.float(), lm_head.weight.float(), bias, None)


class BIRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.variance_size_override is not None or not self.has_weight:
            raise BatchInvariantUnsupported("RMSNorm with var_hidden_size or without weight is not supported")
        eps = float(self.variance_epsilon)
        if residual is None:
            return _ops.rms_norm(x, self.weight, eps)
        return _ops.fused_add_rms_norm(x, residual, self.weight, eps)


class BISiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.silu_and_mul(x)


class _BIRope:
    """Mixin: our fp32 cos/sin table (float64-built, the trainer's table) and our rotation."""

    def _bi_init(self, rope_scaling: dict | None) -> None:
        table = bi.rope_cos_sin_cache(int(self.rotary_dim), int(self.max_position_embeddings), float(self.base),
                                      rope_scaling)
        self.register_buffer("bi_cos_sin_cache", table, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        if key is None:
            raise BatchInvariantUnsupported("rotary embedding without a key tensor is not supported")
        return _ops.rotary_embedding(positions.long(), query, key, int(self.head_size), self.bi_cos_sin_cache,
                                     bool(self.is_neox_style))


class BIRotaryEmbedding(_BIRope, RotaryEmbedding):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bi_init(None)


class BILlama3RotaryEmbedding(_BIRope, Llama3RotaryEmbedding):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bi_init({"rope_type": "llama3", "factor": self.scaling_factor, "low_freq_factor": self.low_freq_factor,
                       "high_freq_factor": self.high_freq_factor,
                       "original_max_position_embeddings": self.orig_max_position})


#: (vLLM class, our class) pairs registered with CustomOp.register_oot.
CUSTOM_OPS = (
    (RMSNorm, BIRMSNorm),
    (SiluAndMul, BISiluAndMul),
    (RotaryEmbedding, BIRotaryEmbedding),
    (Llama3RotaryEmbedding, BILlama3RotaryEmbedding),
)
PLUGGABLE_LAYERS = ((LogitsProcessor, BILogitsProcessor),)
