"""Triton kernels of batch_invariant, installed as ``batch_invariant.triton_kernels``.

This folder must never be imported as a top-level module named ``triton_kernels``: vLLM probes
for a third-party package of that name (OpenAI's MoE kernels) and would pick this one up when the
repository root is on ``sys.path`` (e.g. ``python -c`` run from the checkout).
"""
if __name__ == "triton_kernels":
    raise ImportError(
        "this is batch_invariant.triton_kernels, imported as the top-level module `triton_kernels` because the "
        "repository root is on sys.path; vLLM looks for a different package of that name. Run from another "
        "directory (or with pytest's --import-mode=importlib) and import batch_invariant.triton_kernels.")
