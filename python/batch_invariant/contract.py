"""The invariance contract, as constants. This module is the single source of truth.

An op is *batch-invariant* when the bits of each output row depend only on that row's inputs and
on fixed parameters (weights, dtype, backend, ISA / device architecture), never on the number of
rows, the row's position, other rows' values, the number of output columns computed together,
chunk boundaries, the KV-cache page size or block-table layout, prefill vs decode, or the number
of threads. Within one backend on one device type every op is also run-to-run deterministic.
Bits may differ *between* backends; parity is engine vs trainer on the same backend.

The C++ kernels receive these values through a header generated at build time from this module
(``csrc/generated/bi_contract.h``, written by ``setup.py``); the compiled extension reports the
values it was built with and ``tests/test_contract.py`` checks that they agree. GPU kernels take
them as launch arguments. Prose version: ``docs/invariance.md``.
"""
from __future__ import annotations

#: Bumped whenever a reduction order below changes (so old logprobs are no longer reproducible).
CONTRACT_VERSION = 2  # 2: GPU matmul sums K in GPU_MATMUL_K_CHUNK chunks

# --------------------------------------------------------------------------------------------
# CPU reduction structure (shared by every CPU row reduction: matmul dot products, RMSNorm sum of
# squares, softmax/log_softmax sums, attention q.k dot products).
#
# A length-K reduction is done with CPU_LANES fp32 partial sums: lane l takes the elements
# k = CPU_LANES*c + l (for bf16 matmul: the *pairs* k = 2*(CPU_LANES*c + l) + {1, 0}, the
# semantics of the AVX-512 ``vdpbf16ps`` instruction: odd element first, then even), c = 0, 1, ...
# in increasing order, each lane starting from +0. The lanes are then folded by a fixed tree:
# for s in (8, 4, 2, 1): lane[i] += lane[i + s] for i < s. The result is lane[0].
# Missing elements of the last chunk are treated as +0 products (a function of K only).
CPU_LANES = 16
CPU_TREE_STRIDES = (8, 4, 2, 1)

# --------------------------------------------------------------------------------------------
# Attention (causal, GQA, paged KV). A query token at absolute position p sees keys 0..p.
# Keys are visited in tiles of ATTN_TILE_N *logical* tokens (tile t = keys [t*TILE_N,(t+1)*TILE_N)),
# grouped in splits of ATTN_SPLIT tokens (split s = keys [s*SPLIT, (s+1)*SPLIT)).
# Inside a split: fp32 online softmax, state (m, l, acc) starting at (-inf, 0, 0); per tile:
#   s_j   = (q . k_j) * scale                       (fp32 dot, CPU reduction structure above)
#   m'    = max(m, max_j s_j);  a = exp(m - m')     (a = 0 when m = -inf)
#   p_j   = exp(s_j - m')
#   l     = l * a + sum_j p_j                       (j ascending)
#   acc   = acc * a + sum_j p_j * v_j               (j ascending, per head-dim element)
# Splits combine left to right, starting from (-inf, 0, 0):
#   M = max(m, m_s); l = l*exp(m - M) + l_s*exp(m_s - M); acc = acc*exp(m - M) + acc_s*exp(m_s - M)
# and out = round(acc / l). The structure depends only on p, never on the page size, the block
# table, the query chunk, or the other sequences of the batch. New K/V are written to the cache
# before attention reads it.
ATTN_TILE_N = 32
ATTN_SPLIT = 512

# --------------------------------------------------------------------------------------------
# GPU matmul (Triton / CUDA): BLOCK_K fixed per dtype, never chosen by M or N; fp32 inputs use
# IEEE fp32 (never TF32). K is cut into chunks of GPU_MATMUL_K_CHUNK elements from k = 0 (a multiple
# of every BLOCK_K; the last chunk may be short). Each chunk is summed from +0 in BLOCK_K steps, k
# ascending, on one fp32 accumulator per output element; the chunk sums are then added left to right
# to a total that starts at -0.0 (IEEE's additive identity: -0 + x == x for every x, signed zeros
# included, so the first add is exact). Bias (fp32) after the total; one rounding.
# Small M realises the chunks on separate thread blocks (fp32 partials + an ordered combine), large
# M as a second accumulator inside each block: the same bits, a function of K only.
GPU_MATMUL_BLOCK_K = {"bfloat16": 64, "float16": 64, "float32": 32}
GPU_MATMUL_K_CHUNK = 1024

# --------------------------------------------------------------------------------------------
# Logprob modes (vLLM ``logprobs_mode`` semantics for the sampled token):
#   raw:       log_softmax(fp32 logits) -- temperature, top-k and top-p are ignored.
#   processed: logits fp32 / temperature (temperature < SAMPLING_EPS counts as 1.0, vLLM's greedy
#              convention), then the top-k / top-p mask (masked logits = -inf), then log_softmax,
#              i.e. renormalised over the kept set.
LOGPROB_MODES = ("raw", "processed")
SAMPLING_EPS = 1e-5

#: Values the C++ extension must have been built with (checked by tests/test_contract.py).
def compiled_constants() -> dict[str, int]:
    return {
        "CONTRACT_VERSION": CONTRACT_VERSION,
        "CPU_LANES": CPU_LANES,
        "ATTN_TILE_N": ATTN_TILE_N,
        "ATTN_SPLIT": ATTN_SPLIT,
        "GPU_MATMUL_K_CHUNK": GPU_MATMUL_K_CHUNK,
    }


def render_c_header() -> str:
    """Text of ``csrc/generated/bi_contract.h`` (called by setup.py at build time)."""
    lines = [
        "// Generated from python/batch_invariant/contract.py by setup.py. Do not edit.",
        "#pragma once",
        "namespace bi { namespace contract {",
    ]
    lines += [f"constexpr int {name} = {value};" for name, value in compiled_constants().items()]
    lines += ["} }  // namespace bi::contract", ""]
    # X-macro over the names, so the extensions' contract_constants() reports each one without a list of its own.
    lines += ["#define BI_CONTRACT_FOR_EACH(X) " + " ".join(f"X({name})" for name in compiled_constants()), ""]
    return "\n".join(lines)
