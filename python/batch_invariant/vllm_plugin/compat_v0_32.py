"""Everything that touches vLLM 0.32 internals, in one place. ``install()`` first checks that each
symbol exists with the expected signature (fail closed on any difference), then registers the
replacements: official hooks where vLLM has them (CustomOp / PluggableLayer ``register_oot``,
attention ``register_backend``), otherwise wrappers of the named private functions.
"""
from __future__ import annotations

import functools
import importlib
import inspect

from .layers import BatchInvariantUnsupported

SUPPORTED_VERSIONS = ("0.32.0",)

# (module, attribute, parameters the code here relies on)
_REQUIRED = [
    ("vllm.model_executor.custom_op", "CustomOp", None),
    ("vllm.model_executor.custom_op", "PluggableLayer", None),
    ("vllm.model_executor.layers.linear", "UnquantizedLinearMethod", None),
    ("vllm.model_executor.layers.linear", "LinearBase", None),
    ("vllm.model_executor.layers.vocab_parallel_embedding", "UnquantizedEmbeddingMethod", None),
    ("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding", None),
    ("vllm.model_executor.layers.logits_processor", "LogitsProcessor._apply_head",
     ("self", "lm_head", "hidden_states", "embedding_bias")),
    ("vllm.model_executor.layers.layernorm", "RMSNorm.forward_native", ("self", "x", "residual")),
    ("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbedding.forward_native",
     ("self", "positions", "query", "key")),
    ("vllm.v1.attention.backends.registry", "register_backend", None),
    ("vllm.v1.attention.backends.registry", "AttentionBackendEnum", None),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward",
     ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
      "output_block_scale")),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.do_kv_cache_update",
     ("self", "layer", "key", "value", "kv_cache", "slot_mapping")),
    ("vllm.v1.sample.sampler", "Sampler.compute_logprobs", ("logits",)),
    ("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_top_p", ("logits", "k", "p")),
    ("vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler.forward_cpu",
     ("self", "logits", "generators", "k", "p")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample", ("self", "logits", "spec_decode_metadata")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._bookkeeping_sync", None),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", ("self", "load_dummy_weights")),
    ("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", ("vllm_config",)),
    ("vllm.v1.engine.input_processor", "InputProcessor._validate_params", ("self", "params", "supported_tasks")),
]

# Only on the CUDA platform (these modules are not imported on CPU).
_REQUIRED_CUDA = [
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.forward",
     ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
      "output_block_scale")),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.do_kv_cache_update",
     ("self", "layer", "key", "value", "kv_cache", "slot_mapping")),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.fused_rope_kvcache_supported", ("self",)),
    ("vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler.forward_cuda",
     ("self", "logits", "generators", "k", "p")),
    ("vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler.forward_native",
     ("self", "logits", "generators", "k", "p")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", ("self",)),
    ("vllm.platforms.cuda", "CudaPlatformBase.check_and_update_config", ("vllm_config",)),
    ("vllm.config.compilation", "CUDAGraphMode", None),
]


def _resolve(module: str, attr: str):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_symbols(required=None) -> None:
    problems = []
    for module, attr, params in (_REQUIRED if required is None else required):
        try:
            obj = _resolve(module, attr)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module}.{attr} is missing ({exc})")
            continue
        if params is not None:
            got = tuple(inspect.signature(obj).parameters)[:len(params)]
            if got != params:
                problems.append(f"{module}.{attr} has parameters {got}, expected {params}")
    if problems:
        raise BatchInvariantUnsupported("BATCH_INVARIANT=1: this vLLM differs from the tested 0.32.0 internals: "
                                        + "; ".join(problems))


def install(device_type: str = "cpu") -> None:
    """Install the replacements for the platform's device type ("cpu" or "cuda")."""
    check_symbols()
    if device_type == "cuda":
        check_symbols(_REQUIRED_CUDA)
    from vllm.model_executor.layers import linear as linear_mod
    from vllm.model_executor.layers import vocab_parallel_embedding as vpe_mod
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.sample import sampler as sampler_mod
    from vllm.v1.sample.ops import topk_topp_sampler as topk_mod
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import audit, layers, sampler

    for vllm_cls, ours in layers.CUSTOM_OPS + layers.PLUGGABLE_LAYERS:
        vllm_cls.register_oot(ours, name=vllm_cls.__name__)
    # Linear layers and the lm_head pick their method from these module globals at construction.
    linear_mod.UnquantizedLinearMethod = layers.BILinearMethod
    vpe_mod.UnquantizedEmbeddingMethod = layers.BIEmbeddingMethod
    register_backend(AttentionBackendEnum.CPU_ATTN, "batch_invariant.vllm_plugin.attention.BIAttentionBackend")

    sampler_mod.Sampler.compute_logprobs = staticmethod(sampler.compute_logprobs)
    topk_mod.apply_top_k_top_p = sampler.apply_top_k_top_p
    topk_mod.TopKTopPSampler.forward_cpu = sampler.make_forward_cpu(topk_mod.TopKTopPSampler.forward_cpu)

    _wrap_request_check(audit)
    _fix_seeded_chunked_prefill(GPUModelRunner)
    if device_type == "cuda":
        _install_cuda(audit, layers, sampler)
    else:
        _wrap_config_check(CpuPlatform, audit)
        _wrap_load_model(CPUModelRunner, audit, layers)


def _install_cuda(audit, layers, sampler) -> None:
    """CUDA platform: our attention over TRITON_ATTN (selected at start-up), our mask before
    vLLM's native sampler, the audit after load. CUDA graphs are turned off: the ops validate
    some inputs on the host (a sync), which graph capture forbids; invariance does not need them.
    Not yet verified on a GPU with vLLM (none was at hand); the glue is tested in the interpreter."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms.cuda import CudaPlatformBase
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.sample.ops import topk_topp_sampler as topk_mod
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    register_backend(AttentionBackendEnum.TRITON_ATTN,
                     "batch_invariant.vllm_plugin.attention_cuda.BITritonAttentionBackend")
    topk_mod.TopKTopPSampler.forward_cuda = sampler.make_forward_cpu(topk_mod.TopKTopPSampler.forward_native)

    def select(vllm_config):
        attention = vllm_config.attention_config
        if attention.backend not in (None, AttentionBackendEnum.TRITON_ATTN):
            raise BatchInvariantUnsupported(
                f"BATCH_INVARIANT=1: attention backend {attention.backend.name} was requested; the batch-invariant "
                "attention replaces TRITON_ATTN (leave the attention backend unset)")
        attention.backend = AttentionBackendEnum.TRITON_ATTN
        vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE

    _wrap_config_check(CudaPlatformBase, audit, before=select)
    _wrap_load_model(GPUModelRunner, audit, layers, attention_impl="cuda")


def _wrap_config_check(platform_cls, audit, before=None) -> None:
    original = platform_cls.check_and_update_config.__func__

    @functools.wraps(original)
    def check_and_update_config(cls, vllm_config):
        if before is not None:
            before(vllm_config)
        original(cls, vllm_config)
        audit.check_config(vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def _wrap_request_check(audit) -> None:
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params

    @functools.wraps(original)
    def _validate_params(self, params, supported_tasks, *args, **kwargs):
        result = original(self, params, supported_tasks, *args, **kwargs)
        if isinstance(params, SamplingParams):
            audit.check_sampling_params(params, self.model_config.logprobs_mode)
        return result

    InputProcessor._validate_params = _validate_params


def audit_rules(layers, attention_impl: str = "cpu"):
    """(rules, checks) for audit.audit_model: what a served model may contain."""
    import torch
    from vllm.model_executor.custom_op import CustomOp, PluggableLayer
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.rotary_embedding.common import ApplyRotaryEmb
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if attention_impl == "cuda":
        from .attention_cuda import BITritonAttentionImpl as BIAttentionImpl
    else:
        from .attention import BIAttentionImpl

    ours = tuple(c for _, c in layers.CUSTOM_OPS + layers.PLUGGABLE_LAYERS)
    checked = (LinearBase, VocabParallelEmbedding, Attention)
    rules = [
        (CustomOp, ours + checked + (ApplyRotaryEmb,)),  # ApplyRotaryEmb: a helper our rope never calls
        (PluggableLayer, ours + checked),
        ((torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.MultiheadAttention), ()),
    ]

    def method(expected):
        return lambda m: None if type(m.quant_method) is expected else f"method {type(m.quant_method).__name__}"

    def logits_check(m):
        if getattr(m, "scale", 1.0) != 1.0 or getattr(m, "soft_cap", None) is not None:
            return f"logit scale {m.scale} / soft-cap {m.soft_cap} (the trainer does not apply them)"
        return None

    checks = {
        layers.BILogitsProcessor: logits_check,
        LinearBase: method(layers.BILinearMethod),
        VocabParallelEmbedding: method(layers.BIEmbeddingMethod),
        Attention: lambda m: None if type(m.impl) is BIAttentionImpl else f"attention impl {type(m.impl).__name__}",
    }
    return rules, checks


def _wrap_load_model(runner_cls, audit, layers, attention_impl: str = "cpu") -> None:
    original = runner_cls.load_model

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        audit.audit_model(self.model, *audit_rules(layers, attention_impl))

    runner_cls.load_model = load_model


def _fix_seeded_chunked_prefill(runner_cls) -> None:
    """vLLM rewinds the generator of a request whose sampled token is discarded (a partial prefill
    chunk) with CUDA-style offsets, which CPU generators do not have (RuntimeError). Save each such
    generator's state before sampling and restore it exactly instead, so a seeded request consumes
    its random stream the same way whatever the chunking and the batch."""
    original_sample = runner_cls._sample
    original_bookkeeping = runner_cls._bookkeeping_sync

    @functools.wraps(original_sample)
    def _sample(self, logits, spec_decode_metadata):
        n = self.input_batch.num_reqs
        discard = self.discard_request_mask.np[:n]
        self._bi_generator_states = {i: g.get_state() for i, g in self.input_batch.generators.items()
                                     if i < n and discard[i]}
        return original_sample(self, logits, spec_decode_metadata)

    @functools.wraps(original_bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        states = getattr(self, "_bi_generator_states", None) or {}
        self._bi_generator_states = None
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in list(states) if i in generators}
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            for i, gen in hidden.items():
                gen.set_state(states[i])
                generators[i] = gen

    runner_cls._sample = _sample
    runner_cls._bookkeeping_sync = _bookkeeping_sync
