"""A decoder-only causal LM (Llama / Qwen2 / Qwen3 / Mistral) built only from batch_invariant ops.

The forward pass is the engine's, op for op: merged projections are computed as separate linears
(identical bits: the linear is N-invariant), the residual stream uses fused_add_rms_norm exactly
where vLLM does, attention runs over a paged cache with vLLM V1 metadata (here: page size 1,
each sequence's K/V used in place, so autograd flows into q, k and v). Module and parameter names
follow Hugging Face, so checkpoints load directly and FSDP2 can shard per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import batch_invariant as bi

from .config import ModelConfig


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bi.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return bi.rms_norm(x, self.weight, self.eps)
        return bi.fused_add_rms_norm(x, residual, self.weight, self.eps)


@dataclass
class PackedBatch:
    """vLLM-style metadata for sequences packed back to back (each sequence is a full prefill)."""
    positions: torch.Tensor        # int64 [T]
    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor         # int32 [B]
    block_table: torch.Tensor      # int32 [B, max_len]: page size 1, slot = token index in the pack

    @classmethod
    def from_lengths(cls, lengths: list[int], device) -> "PackedBatch":
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        width = max(lengths)
        table = torch.zeros(len(lengths), width, dtype=torch.int32)
        for b, n in enumerate(lengths):
            table[b, :n] = torch.arange(starts[b], starts[b] + n, dtype=torch.int32)
        return cls(
            positions=torch.cat([torch.arange(n) for n in lengths]).to(device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
            block_table=table.to(device),
        )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, biases: dict[str, bool]):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_heads * d, biases["q_proj"], dtype)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, biases["k_proj"], dtype)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, biases["v_proj"], dtype)
        self.o_proj = Linear(cfg.num_heads * d, h, biases["o_proj"], dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.scale = d ** -0.5

    def forward(self, h: torch.Tensor, batch: PackedBatch, cos_sin: torch.Tensor) -> torch.Tensor:
        cfg, t = self.cfg, h.size(0)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if cfg.qk_norm:  # per-head RMSNorm before RoPE (Qwen3)
            q = self.q_norm(q.view(t, cfg.num_heads, cfg.head_dim)).view(t, -1)
            k = self.k_norm(k.view(t, cfg.num_kv_heads, cfg.head_dim)).view(t, -1)
        q, k = bi.rotary_embedding(batch.positions, q, k, cfg.head_dim, cos_sin, True)
        # Page size 1: token i of the pack is cache slot i, so k/v are the caches themselves.
        key_cache = k.view(t, 1, cfg.num_kv_heads, cfg.head_dim)
        value_cache = v.view(t, 1, cfg.num_kv_heads, cfg.head_dim)
        out = bi.attention(q.view(t, cfg.num_heads, cfg.head_dim), key_cache, value_cache,
                           batch.query_start_loc, batch.seq_lens, batch.block_table, self.scale)
        return self.o_proj(out.view(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, biases: dict[str, bool]):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, biases["gate_proj"], dtype)
        self.up_proj = Linear(h, i, biases["up_proj"], dtype)
        self.down_proj = Linear(i, h, biases["down_proj"], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # == vLLM's merged gate_up projection followed by SiluAndMul (N-invariant linear).
        return self.down_proj(bi.silu_and_mul(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, biases: dict[str, bool]):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, biases)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, biases)

    def forward(self, h, residual, batch: PackedBatch, cos_sin):
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, batch, cos_sin)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """HF-named container (``model.*``) of the embedding, the layers and the final norm."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, biases: dict[str, bool]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, biases) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class CausalLM(nn.Module):
    """``model(token_ids, lengths)`` -> final hidden states of the packed sequences."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, lm_head_dtype: torch.dtype | None = None,
                 biases: dict[str, bool] | None = None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.lm_head_dtype = lm_head_dtype or dtype
        biases = biases or {}
        biases = {name: biases.get(name, False)
                  for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
        self.model = DecoderModel(cfg, dtype, biases)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, self.lm_head_dtype)
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.reset_rope_table()

    def reset_rope_table(self) -> None:
        """(Re)build the fp32 cos/sin table on the model's device (after meta init / to_empty)."""
        cfg = self.config
        table = bi.rope_cos_sin_cache(cfg.rot_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.cos_sin_cache = table.to(self.model.norm.weight.device)

    def lm_head_weight(self) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return w if w.dtype == self.lm_head_dtype else w.to(self.lm_head_dtype)

    def forward(self, token_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        batch = PackedBatch.from_lengths(lengths, token_ids.device)
        h = self.model.embed_tokens(token_ids)
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, batch, self.cos_sin_cache)
        h, _ = self.model.norm(h, residual)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the lm_head dtype (fp32 head: fp32 hidden x fp32 weight, DESIGN.md section 1)."""
        return bi.linear(hidden.to(self.lm_head_dtype), self.lm_head_weight())

    def token_logprobs(self, sequences, prompt_lens, temperature=1.0, top_k=-1, top_p=1.0,
                       mode: str = "raw") -> list[torch.Tensor]:
        """Per sequence, the fp32 logprob of every completion token (the tokens after prompt_len),
        with the engine's semantics (``bi.token_logprobs``); sequences are packed without padding.
        Sampling parameters may be scalars or one value per sequence."""
        from .logprobs import completion_logprobs

        return completion_logprobs(self, sequences, prompt_lens, temperature, top_k, top_p, mode)
