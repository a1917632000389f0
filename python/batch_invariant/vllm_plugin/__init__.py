"""vLLM V1 plugin (entry point ``vllm.general_plugins``). Runs in every vLLM process; does nothing
unless ``BATCH_INVARIANT=1``. The layer replacements come with the vLLM plugin issue; until then,
with the flag on, engine start-up is refused rather than served batch-variant (fail closed)."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("batch_invariant.vllm_plugin")

ENV_FLAG = "BATCH_INVARIANT"
_registered = False


def flag_enabled() -> bool:
    return os.environ.get(ENV_FLAG, "0") not in ("", "0")


def register() -> None:
    """vLLM plugin hook: idempotent, a no-op without the flag."""
    global _registered
    if not flag_enabled() or _registered:
        return
    _registered = True
    raise RuntimeError(
        "BATCH_INVARIANT=1 is set, but this version of batch-invariant-kernels has no vLLM layer "
        "replacements yet, so vLLM would run batch-variant kernels. Unset BATCH_INVARIANT or upgrade.")
