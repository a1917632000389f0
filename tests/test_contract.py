"""The contract constants have one source (contract.py); every backend and the docs agree."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from batch_invariant import backends, contract

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_extension_built_with_contract_values(require):
    require("cpu", "linear")
    assert backends.cpu_extension().contract_constants() == contract.compiled_constants()


def test_generated_header_matches_contract():
    header = (ROOT / "csrc" / "generated" / "bi_contract.h")
    if not header.exists():
        pytest.skip("the C++ header is generated at build time and this checkout has not been built")
    assert header.read_text() == contract.render_c_header()


def test_docs_state_every_constant():
    """docs/invariance.md must quote each constant with its current value (a docs rule a test enforces)."""
    text = (ROOT / "docs" / "invariance.md").read_text()
    for name, value in contract.compiled_constants().items():
        assert re.search(rf"`{name}`\s*=\s*{value}\b", text), f"docs/invariance.md does not state {name} = {value}"
    for dtype, block in contract.GPU_MATMUL_BLOCK_K.items():
        assert re.search(rf"{dtype}\D+{block}\b", text), f"docs/invariance.md does not state BLOCK_K for {dtype}"


def test_triton_kernels_take_the_contract_constants():
    """The Triton backend receives the contract as launch arguments from contract.py (no copies)."""
    pytest.importorskip("triton", reason="Triton is not installed")
    from batch_invariant.triton_kernels import attention, matmul

    assert (attention.ATTN_TILE_N, attention.ATTN_SPLIT) == (contract.ATTN_TILE_N, contract.ATTN_SPLIT)
    assert matmul.contract is contract
    for cfgs in matmul.CANDIDATE_BUCKETS.values():  # BLOCK_K is never part of a tile config
        for table in cfgs.values():
            assert all(not hasattr(cfg, "block_k") for _, cfg in table)
