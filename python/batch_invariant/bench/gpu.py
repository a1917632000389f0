"""GPU acceptance benchmark of the Triton backend (driven by ``bench/gpu_check.sh``).

On a CUDA machine: Triton kernels vs torch's own (cuBLAS ``F.linear``, flash SDPA, ``F.rms_norm``,
``torch.log_softmax``) on Qwen3-8B shapes, plus the per-architecture matmul bucket check (every
candidate M-bucket config must give the default config's bits before an arch may use its table).
With ``--dry-run`` the same code runs on CPU tensors through the Triton interpreter at tiny
shapes (timings meaningless), so CI checks the script's logic without a GPU.

Writes into ``--out``: ``gpu_<gpu>_<date>_{matmul,attention,rows,checks}.csv`` (TFLOP/s, GB/s,
ratio = baseline_ms / ms, so 1.0 = as fast as torch) and a PNG of the matmul ratios; prints a
short table last. Each case is isolated: an error is recorded in its row, never hides the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import statistics
import time
import traceback
from datetime import date
from typing import Callable

import torch
import torch.nn.functional as F

import batch_invariant as bi
from batch_invariant import backends

#: Qwen3-8B: hidden 4096, 32 q heads / 8 kv heads of 128, MLP 12288, vocab 151936.
QWEN3_8B = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 12288, "vocab": 151936}
LINEAR_SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (24576, 4096),
                 "down_proj": (4096, 12288)}  # name -> (N, K)
M_VALUES = (1, 8, 32, 128, 512, 2048, 8192)
DECODE_CASES = ((1, 1024), (16, 4096), (64, 8192), (128, 2048))  # (batch, context)
PREFILL_LENGTHS = (1024, 4096)
PAGE_SIZE = 16

#: Acceptance targets (issue: Triton backend): matmul vs cuBLAS, decode attention vs flash SDPA.
TARGETS = {"matmul_large_m": (256, 0.90), "matmul_small_m": (64, 0.80), "decode_attention": 0.85}

# Tiny shapes for --dry-run through the interpreter.
DRY_LINEAR_SHAPES = {"tiny_proj": (96, 80)}
DRY_M_VALUES = (1, 8, 33)
DRY_MODEL = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 96, "vocab": 300}
DRY_DECODE_CASES = ((2, 40),)
DRY_PREFILL_LENGTHS = (24,)


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Timer:
    """Median milliseconds of `fn`: CUDA-event timing via triton.testing.do_bench on a GPU,
    wall clock (a few repetitions) in the interpreter."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def _record(rows: list, base: dict, fn: Callable[[], dict]) -> None:
    """Run one case; its failure becomes an `error` row instead of stopping the benchmark."""
    if "check" not in base:
        base = {"backend": bi.get_backend(), **base}
    try:
        row = {**base, **fn()}
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the CSV and the table
        row = {**base, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        traceback.print_exc()
    rows.append(row)
    print("  " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def _ratio(base_ms: float, ms: float) -> float:
    return round(base_ms / ms, 3) if ms > 0 else float("nan")


# ------------------------------------------------------------------------------------------
# Cases

def bench_matmul(device, timer, shapes, m_values, dtype=torch.bfloat16) -> list[dict]:
    rows = []
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
        for m in m_values:
            def case(m=m, n=n, k=k, w=w):
                x = torch.randn(m, k, device=device).to(dtype)
                ours = bi.linear(x, w)
                err = (ours.double() - F.linear(x.double(), w.double())).abs().max().item()
                ms, base_ms = timer(lambda: bi.linear(x, w)), timer(lambda: F.linear(x, w))
                flop = 2.0 * m * n * k
                row = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 2), "baseline": "torch F.linear",
                       "baseline_ms": round(base_ms, 4), "baseline_tflops": round(flop / base_ms / 1e9, 2),
                       "ratio": _ratio(base_ms, ms), "max_abs_err_vs_fp64": f"{err:.3g}"}
                if bi.get_backend() == "triton":
                    # What the K-chunk split buys where auto picks it (same bits either way).
                    from batch_invariant.triton_kernels import matmul as triton_matmul
                    row["fused_only_ms"] = round(timer(lambda: triton_matmul.linear(x, w, None, dtype, _split=False)), 4)
                return row
            _record(rows, {"op": "linear", "shape": name, "dtype": str(dtype)[6:], "M": m, "N": n, "K": k}, case)
    return rows


def _paged(model, batch, context, device, dtype, seed=0):
    """Random paged KV caches (page size PAGE_SIZE, shuffled block table) + their dense copies."""
    g = torch.Generator().manual_seed(seed)
    hk, d = model["kv_heads"], model["head_dim"]
    pages = -(-context // PAGE_SIZE)
    table = torch.randperm(batch * pages, generator=g).view(batch, pages).to(torch.int32)
    kc = torch.randn(batch * pages, PAGE_SIZE, hk, d, generator=g).to(dtype).to(device)
    vc = torch.randn(batch * pages, PAGE_SIZE, hk, d, generator=g).to(dtype).to(device)
    idx = table.long().to(device)
    k_dense = kc[idx].reshape(batch, pages * PAGE_SIZE, hk, d)[:, :context].transpose(1, 2).contiguous()
    v_dense = vc[idx].reshape(batch, pages * PAGE_SIZE, hk, d)[:, :context].transpose(1, 2).contiguous()
    return kc, vc, table.to(device), k_dense, v_dense


def _sdpa(q, k, v, causal):
    """torch SDPA with the flash backend where it runs (GQA natively); the backend used is reported."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            return (lambda: _flash(q, k, v, causal)), "torch SDPA flash"
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)), "torch SDPA"


def _flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def bench_attention(device, timer, model, decode_cases, prefill_lengths, dtype=torch.bfloat16) -> list[dict]:
    rows = []
    hq, hk, d = model["heads"], model["kv_heads"], model["head_dim"]
    for batch, context in decode_cases:
        def decode(batch=batch, context=context):
            kc, vc, table, k_dense, v_dense = _paged(model, batch, context, device, dtype)
            q = torch.randn(batch, hq, d, device=device).to(dtype)
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            ours = lambda: bi.attention(q, kc, vc, qsl, lens, table)  # noqa: E731
            base, base_name = _sdpa(q.unsqueeze(2), k_dense, v_dense, causal=False)
            err = (ours().float() - base().squeeze(2).float()).abs().max().item()
            ms, base_ms = timer(ours), timer(base)
            kv_bytes = 2 * batch * context * hk * d * k_dense.element_size()
            return {"ms": round(ms, 4), "gbs": round(kv_bytes / ms / 1e6, 1), "baseline": base_name,
                    "baseline_ms": round(base_ms, 4), "baseline_gbs": round(kv_bytes / base_ms / 1e6, 1),
                    "ratio": _ratio(base_ms, ms), "max_abs_diff_vs_baseline": f"{err:.3g}"}
        _record(rows, {"op": "decode_attention", "batch": batch, "context": context, "dtype": str(dtype)[6:]}, decode)
    for length in prefill_lengths:
        def prefill(length=length):
            kc, vc, table, k_dense, v_dense = _paged(model, 1, length, device, dtype)
            q = torch.randn(length, hq, d, device=device).to(dtype)
            qsl = torch.tensor([0, length], dtype=torch.int32, device=device)
            lens = torch.tensor([length], dtype=torch.int32, device=device)
            ours = lambda: bi.attention(q, kc, vc, qsl, lens, table)  # noqa: E731
            base, base_name = _sdpa(q.transpose(0, 1).unsqueeze(0), k_dense, v_dense, causal=True)
            err = (ours().float() - base()[0].transpose(0, 1).float()).abs().max().item()
            ms, base_ms = timer(ours), timer(base)
            flop = 2.0 * 2.0 * hq * d * length * (length + 1) / 2  # causal: QK^T and PV over the lower triangle
            return {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 2), "baseline": base_name,
                    "baseline_ms": round(base_ms, 4), "baseline_tflops": round(flop / base_ms / 1e9, 2),
                    "ratio": _ratio(base_ms, ms), "max_abs_diff_vs_baseline": f"{err:.3g}"}
        _record(rows, {"op": "prefill_attention", "batch": 1, "context": length, "dtype": str(dtype)[6:]}, prefill)
    return rows


def bench_rows(device, timer, model, m_values, dtype=torch.bfloat16) -> list[dict]:
    rows = []
    h, vocab = model["hidden"], model["vocab"]
    for t in m_values:
        def norm(t=t):
            x = torch.randn(t, h, device=device).to(dtype)
            w = torch.rand(h, device=device).to(dtype)
            ms, base_ms = timer(lambda: bi.rms_norm(x, w, 1e-6)), timer(lambda: F.rms_norm(x, (h,), w, 1e-6))
            nbytes = 2 * x.numel() * x.element_size()
            return {"ms": round(ms, 4), "gbs": round(nbytes / ms / 1e6, 1), "baseline": "torch F.rms_norm",
                    "baseline_ms": round(base_ms, 4), "ratio": _ratio(base_ms, ms)}
        _record(rows, {"op": "rms_norm", "T": t, "H": h, "dtype": str(dtype)[6:]}, norm)
    for t in m_values[:3]:
        def logsm(t=t):
            x = torch.randn(t, vocab, device=device)
            ms, base_ms = timer(lambda: bi.log_softmax(x)), timer(lambda: torch.log_softmax(x, -1))
            nbytes = 2 * x.numel() * 4
            return {"ms": round(ms, 4), "gbs": round(nbytes / ms / 1e6, 1), "baseline": "torch log_softmax",
                    "baseline_ms": round(base_ms, 4), "ratio": _ratio(base_ms, ms)}
        _record(rows, {"op": "log_softmax", "T": t, "H": vocab, "dtype": "float32"}, logsm)
    return rows


def run_checks(device, dry_run: bool) -> list[dict]:
    """Per-architecture bucket equivalence of the Triton matmul (bits of every candidate M-bucket
    config vs the default config) and which configuration this arch uses."""
    from batch_invariant.triton_kernels import _launch
    from batch_invariant.triton_kernels import matmul as tm

    arch = _launch.arch_key(device)
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        def check(dtype=dtype):
            shapes = [(96, 80)] if dry_run else [(4096, 4096), (6144, 4096)]
            failures = tm.bucket_equivalence_mismatches(arch, device, dtype, shapes=shapes)
            return {"result": "pass" if not failures else "FAIL", "detail": "; ".join(failures[:5]),
                    "arch_table_in_use": arch in tm.VERIFIED_ARCHS}
        _record(rows, {"check": "matmul_bucket_equivalence", "arch": arch, "dtype": str(dtype)[6:]}, check)
    return rows


# ------------------------------------------------------------------------------------------
# Output

def _write_csv(path: str, rows: list[dict], extra: dict) -> None:
    fields: list[str] = list(extra)
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**extra, **row})


def _plot(path: str, rows: list[dict], title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in dict.fromkeys((r["backend"], r["shape"]) for r in rows):
        pts = [(r["M"], r["ratio"]) for r in rows if (r["backend"], r["shape"]) == key and "ratio" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=" ".join(key))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("cuBLAS time / our time")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(row: dict, dry_run: bool = False) -> str:
    if "error" in row:
        return "ERROR"
    if dry_run:
        return "(interpreter: no target)"
    ratio = row.get("ratio")
    if row.get("op") == "linear":
        big_m, big_t = TARGETS["matmul_large_m"]
        small_m, small_t = TARGETS["matmul_small_m"]
        target = big_t if row["M"] >= big_m else small_t if row["M"] <= small_m else None
    elif row.get("op") == "decode_attention":
        target = TARGETS["decode_attention"]
    else:
        target = None
    if target is None:
        return ""
    return f"{'ok' if ratio >= target else 'BELOW'} (>= {target})"


def summary_table(matmul, attention, rows, checks, dry_run: bool = False) -> str:
    lines = [f"{'case':44s} {'ms':>9s} {'base ms':>9s} {'ratio':>6s}  target"]
    for row in matmul:
        label = f"{row['backend']} linear {row['shape']} M={row['M']}"
        lines.append(f"{label:44s} {row.get('ms', float('nan')):9.4f} {row.get('baseline_ms', float('nan')):9.4f} "
                     f"{row.get('ratio', float('nan')):6.2f}  {_verdict(row, dry_run)}")
    for row in attention + rows:
        label = " ".join(f"{k}={row[k]}" if k not in ("op", "backend") else str(row[k]) for k in row
                         if k in ("backend", "op", "batch", "context", "T", "H"))
        lines.append(f"{label:44s} {row.get('ms', float('nan')):9.4f} {row.get('baseline_ms', float('nan')):9.4f} "
                     f"{row.get('ratio', float('nan')):6.2f}  {_verdict(row, dry_run)}")
    for row in checks:
        lines.append(f"check {row['check']} {row['arch']} {row['dtype']}: {row.get('result', 'ERROR')} "
                     f"{row.get('detail') or row.get('error', '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors through the Triton interpreter at tiny shapes (checks the logic)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            parser.error("--dry-run needs TRITON_INTERPRET=1 set before Python starts (bench/gpu_check.sh does)")
        from batch_invariant.triton_kernels.interpreter import exact_dot
        device, model = torch.device("cpu"), DRY_MODEL
        shapes, m_values, decode, prefill = DRY_LINEAR_SHAPES, DRY_M_VALUES, DRY_DECODE_CASES, DRY_PREFILL_LENGTHS
        patch = exact_dot()
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or use --dry-run")
        device, model = torch.device("cuda"), QWEN3_8B
        shapes, m_values, decode, prefill = LINEAR_SHAPES, M_VALUES, DECODE_CASES, PREFILL_LENGTHS
        patch = contextlib.nullcontext()

    # The Triton backend always; the CUDA extension's kernels beside it when it is built here
    # (ops it does not implement run Triton kernels inside the cuda backend).
    kernel_backends = ["triton"]
    if not args.dry_run and backends.backend_unavailable_reason("cuda", "cuda") is None:
        kernel_backends.append("cuda")
    torch.manual_seed(0)
    timer = Timer(device)
    name, today = gpu_name(device), date.today().isoformat()
    extra = {"gpu": name, "date": today, "torch": torch.__version__, "triton": _triton_version()}
    prefix = os.path.join(args.out, f"gpu_{_slug(name)}_{today}")
    matmul, attention, rows = [], [], []
    with patch, torch.no_grad():
        print(f"== {name}, torch {torch.__version__}, triton {extra['triton']}, backends {kernel_backends}", flush=True)
        print("== checks", flush=True)
        checks = run_checks(device, args.dry_run)
        try:
            for backend in kernel_backends:
                bi.set_backend(backend)
                print(f"== {backend}: matmul", flush=True)
                matmul += bench_matmul(device, timer, shapes, m_values)
                print(f"== {backend}: attention", flush=True)
                attention += bench_attention(device, timer, model, decode, prefill)
                print(f"== {backend}: rows", flush=True)
                rows += bench_rows(device, timer, model, m_values[:4] if not args.dry_run else m_values[:2])
        finally:
            bi.set_backend(None)
    for suffix, data in (("matmul", matmul), ("attention", attention), ("rows", rows), ("checks", checks)):
        _write_csv(f"{prefix}_{suffix}.csv", data, extra)
    _plot(f"{prefix}_matmul.png", [r for r in matmul if "ratio" in r], f"batch-invariant linear vs cuBLAS, {name}, {today}")
    print(f"\nwrote {prefix}_*.csv\n")
    print(summary_table(matmul, attention, rows, checks, args.dry_run))
    failed = [r for r in matmul + attention + rows + checks if "error" in r or r.get("result") == "FAIL"]
    return 1 if failed else 0


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    raise SystemExit(main())
