"""Fail-closed checks: the engine configuration (front end) and the loaded model (worker).

With BATCH_INVARIANT=1, anything the package cannot make batch-invariant stops engine start-up
with an error naming the cause — never a silent batch-variant fallback.
"""
from __future__ import annotations

import os

import torch

from ..trainer.config import ModelConfig, UnsupportedModelError
from .layers import BatchInvariantUnsupported

ENGINE_ROPE_TYPES = ("default", "llama3")  # rotary classes with a batch-invariant replacement (layers.py)
SUPPORTED_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")


def check_config(vllm_config) -> None:
    """Raise BatchInvariantUnsupported naming every unsupported setting of `vllm_config`."""
    problems = []
    if os.environ.get("VLLM_BATCH_INVARIANT", "0") not in ("", "0"):
        problems.append("VLLM_BATCH_INVARIANT is also set (vLLM's own mode replaces the CPU kernels with "
                        "Triton ones that do not run here); unset it")
    model = vllm_config.model_config
    if model is not None:
        try:
            cfg = ModelConfig.from_dict(model.hf_config.to_dict())  # the trainer's rules: arch, MoE, window, rope
            kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type", "default"))
            if kind not in ENGINE_ROPE_TYPES:
                problems.append(f"rope scaling {kind!r} (the engine serves {', '.join(ENGINE_ROPE_TYPES)}; "
                                "the trainer supports more)")
        except (UnsupportedModelError, KeyError) as exc:
            problems.append(f"model: {exc}")
        if getattr(model, "quantization", None):
            problems.append(f"quantization {model.quantization!r}")
        if model.logprobs_mode not in SUPPORTED_LOGPROB_MODES:
            problems.append(f"logprobs_mode {model.logprobs_mode!r}")
        if getattr(model, "logits_processors", None):
            problems.append("custom logits processors")
        if model.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            problems.append(f"model dtype {model.dtype}")
    if vllm_config.quant_config is not None:
        problems.append("quantized weights")
    cache = vllm_config.cache_config
    if cache is not None and cache.cache_dtype not in ("auto", None):
        problems.append(f"kv_cache_dtype {cache.cache_dtype!r} (only 'auto')")
    if vllm_config.lora_config is not None:
        problems.append("LoRA")
    par = vllm_config.parallel_config
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if getattr(par, name, 1) != 1:
            problems.append(f"{name}={getattr(par, name)} (only 1 is supported so far)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        problems.append("KV transfer / connectors")
    if getattr(vllm_config, "use_v2_model_runner", False):
        problems.append("Model Runner V2 (its sampler bypasses the batch-invariant logprob path); "
                        "set VLLM_USE_V2_MODEL_RUNNER=0")
    if problems:
        raise BatchInvariantUnsupported("BATCH_INVARIANT=1 cannot serve this configuration: " + "; ".join(problems))


def audit_model(model: torch.nn.Module, rules, checks) -> None:
    """Walk the loaded model; refuse to serve if any compute layer is not ours.

    ``rules``: (base class, accepted classes) pairs: an instance of a base class must also be an
    instance of one of its accepted classes (an empty tuple rejects the base outright).
    ``checks``: base class -> function(module) returning a problem string or None, for layers whose
    kernel lives in a member (a linear's quant_method, an attention layer's impl).
    """
    bad = []
    for name, module in model.named_modules():
        label = name or "<model>"
        for base, accepted in rules:
            if isinstance(module, base) and not isinstance(module, accepted):
                bad.append(f"{label}: {type(module).__module__}.{type(module).__qualname__}")
        for base, check in checks.items():
            problem = check(module) if isinstance(module, base) else None
            if problem:
                bad.append(f"{label}: {problem}")
    if bad:
        raise BatchInvariantUnsupported("BATCH_INVARIANT=1: these layers are not batch-invariant implementations, "
                                        "refusing to serve: " + "; ".join(bad[:20]))


PROCESSED_MODES = ("processed_logprobs", "processed_logits")


def check_sampling_params(params, logprobs_mode: str) -> None:
    """Per request, in processed mode: refuse sampling options whose effect on the logits the
    trainer's ``token_logprobs`` does not reproduce (raises ValueError: the request is rejected,
    the engine keeps serving)."""
    if getattr(params, "structured_outputs", None) is not None:
        # the grammar mask is applied to the logits before any logprob is taken, in every mode
        raise ValueError("BATCH_INVARIANT=1: structured output masks the logits in ways the trainer does not "
                         "reproduce; not supported")
    if logprobs_mode not in PROCESSED_MODES:
        return  # raw logprobs come from the raw logits, whatever the sampling options
    problems = []
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        problems.append("presence/frequency/repetition penalties")
    for name in ("logit_bias", "bad_words", "allowed_token_ids"):
        if getattr(params, name, None):
            problems.append(name)
    if params.min_p:
        problems.append("min_p")
    if params.min_tokens:
        problems.append("min_tokens")
    if problems:
        raise ValueError(f"BATCH_INVARIANT=1 with logprobs_mode={logprobs_mode!r}: {', '.join(problems)} change the "
                         "processed logprobs in ways the trainer does not reproduce; not supported")
