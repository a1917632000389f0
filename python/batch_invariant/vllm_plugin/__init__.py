"""vLLM V1 plugin (entry point ``vllm.general_plugins``): ``BATCH_INVARIANT=1`` makes the model's
whole forward and the sampler's logprobs run on batch_invariant ops.

vLLM loads general plugins in every process (front end, engine core, workers). ``register()`` is
idempotent and does nothing at all unless ``BATCH_INVARIANT=1``. With the flag it selects the
compat module of the installed vLLM version (fail closed for any other version), which checks the
internals it touches and installs the replacements. See docs/vllm.md.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("batch_invariant.vllm_plugin")

ENV_FLAG = "BATCH_INVARIANT"
_registered = False


def flag_enabled() -> bool:
    return os.environ.get(ENV_FLAG, "0") not in ("", "0")


def _compat_module():
    import vllm

    from . import compat_v0_32

    version = getattr(vllm, "__version__", "unknown")
    base = version.split("+")[0]
    if base in compat_v0_32.SUPPORTED_VERSIONS:
        return compat_v0_32
    from .layers import BatchInvariantUnsupported
    raise BatchInvariantUnsupported(
        f"BATCH_INVARIANT=1: vLLM {version} is not a tested version (tested: "
        f"{', '.join(compat_v0_32.SUPPORTED_VERSIONS)}); refusing to run rather than risk batch-variant kernels")


def register() -> None:
    """vLLM plugin hook: idempotent; a no-op without ``BATCH_INVARIANT=1``."""
    global _registered
    if not flag_enabled() or _registered:
        return
    import torch  # noqa: F401  (the ops must be registered before any layer is built)

    import batch_invariant.ops  # noqa: F401
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        device_type = "cpu"
    elif current_platform.is_cuda():
        device_type = "cuda"  # Triton backend (CUDA extension when built); see attention_cuda.py
    else:
        from .layers import BatchInvariantUnsupported
        raise BatchInvariantUnsupported(
            f"BATCH_INVARIANT=1: the vLLM plugin runs on the CPU and CUDA platforms only (this is "
            f"{current_platform.device_name!r})")
    _compat_module().install(device_type)
    _registered = True
    logger.info("batch_invariant: vLLM plugin active (BATCH_INVARIANT=1)")


class WorkerExtension:
    """Worker methods for weight updates; pass ``worker_extension_cls=WORKER_EXTENSION`` to LLM()."""

    def bi_load_weights(self, named_tensors: dict) -> int:
        """Load HF-named tensors into this worker's model (vLLM's own loader maps merged QKV and
        gate/up). Our linear layers read the raw weights directly, so nothing needs repacking."""
        import torch

        if not _registered:
            raise RuntimeError("bi_load_weights needs BATCH_INVARIANT=1 in the engine: stock CPU linears use "
                               "prepacked copies of the weights that an in-place update would not reach")
        with torch.no_grad():
            loaded = self.model_runner.model.load_weights(list(named_tensors.items()))
        return len(loaded) if loaded is not None else len(named_tensors)

    def bi_collect_state(self, names: list) -> dict:
        """A copy of some parameters by their vLLM names (for tests and parity checks)."""
        params = dict(self.model_runner.model.named_parameters())
        return {n: params[n].detach().clone() for n in names}


    def bi_activation_dump(self, enable: bool):
        """Start (True) or stop (False) recording every decoder layer's and the final norm's
        outputs; stopping returns {module name: [per-step outputs]} (each a tuple of tensors).
        Forward hooks fire only in eager mode (enforce_eager=True): compiled graphs skip them."""
        model = self.model_runner.model
        if enable:
            self._bi_dump, self._bi_hooks = {}, []
            for name, module in model.named_modules():
                if type(module).__name__.endswith("DecoderLayer") or name.endswith("model.norm"):
                    self._bi_hooks.append(module.register_forward_hook(_recorder(self._bi_dump, name)))
            return None
        for hook in getattr(self, "_bi_hooks", []):
            hook.remove()
        dump, self._bi_dump, self._bi_hooks = getattr(self, "_bi_dump", {}), {}, []
        return dump


def _recorder(store: dict, name: str):
    def hook(module, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        store.setdefault(name, []).append(tuple(o.detach().clone() for o in outs if o is not None))
    return hook


WORKER_EXTENSION = f"{__name__}.WorkerExtension"


def update_weights(llm, named_tensors: dict) -> None:
    """Push new weights (Hugging Face names -> tensors) into every worker of a running ``LLM``
    (created with ``worker_extension_cls=WORKER_EXTENSION``) and reset the prefix cache, whose
    KV entries were computed with the old weights."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in named_tensors.items()}
    llm.collective_rpc("bi_load_weights", args=(tensors,))
    llm.reset_prefix_cache()
