"""Kernel benchmark: batch-invariant kernels vs torch's own (oneDNN on CPU) in the same run.

Writes ``kernels_<device>.csv`` (op, dtype, M, N, K, backend, ms, baseline, baseline_ms, ratio)
and a PNG plot. ``ratio`` = baseline_ms / ms: 1.0 means as fast as torch, 0.5 half as fast.
Timings are medians of interleaved repetitions (ours, baseline, ours, ...) so that machine noise
hits both sides alike.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import time
from datetime import date
from typing import Callable

import torch
import torch.nn.functional as F

import batch_invariant as bi

FIELDS = ["op", "dtype", "M", "N", "K", "backend", "ms", "baseline", "baseline_ms", "ratio"]
LINEAR_SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096), (4096, 4096), (8192, 4096), (4096, 8192)]  # (N, K)
QUICK_LINEAR_SHAPES = [(4096, 1024), (1024, 4096), (4096, 4096)]
M_VALUES = (1, 16, 128, 512)


def _time_pair(ours: Callable, base: Callable, min_time: float, max_reps: int = 50) -> tuple[float, float]:
    for fn in (ours, base):  # warm up (allocations, page faults)
        fn()
    t_ours, t_base = [], []
    start = time.perf_counter()
    while len(t_ours) < 3 or (time.perf_counter() - start < min_time and len(t_ours) < max_reps):
        for fn, bucket in ((ours, t_ours), (base, t_base)):
            t0 = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t0)
    return statistics.median(t_ours) * 1e3, statistics.median(t_base) * 1e3


def _row(op, dtype, m, n, k, backend, ms, baseline, base_ms):
    return {"op": op, "dtype": str(dtype).replace("torch.", ""), "M": m, "N": n, "K": k, "backend": backend,
            "ms": round(ms, 4), "baseline": baseline, "baseline_ms": round(base_ms, 4),
            "ratio": round(base_ms / ms, 3)}


def bench_linear(device, dtypes, shapes, m_values, min_time):
    rows = []
    for dtype in dtypes:
        for n, k in shapes:
            w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
            for m in m_values:
                x = torch.randn(m, k, device=device).to(dtype)
                ms, base = _time_pair(lambda: bi.linear(x, w), lambda: F.linear(x, w), min_time)
                rows.append(_row("linear", dtype, m, n, k, bi.provenance(device)["ops"]["linear"], ms,
                                 "torch F.linear", base))
                print(_fmt(rows[-1]), flush=True)
    return rows


def bench_rows(device, dtypes, min_time):
    rows = []
    for dtype in dtypes:
        for t, h in ((1, 4096), (64, 4096), (512, 4096)):
            x = torch.randn(t, h, device=device).to(dtype)
            w = torch.ones(h, device=device, dtype=dtype)
            cases = {
                "rms_norm": (lambda: bi.rms_norm(x, w, 1e-6), lambda: F.rms_norm(x, (h,), w, 1e-6), "torch F.rms_norm"),
                "silu_and_mul": (lambda: bi.silu_and_mul(x), lambda: F.silu(x[:, :h // 2]) * x[:, h // 2:],
                                 "torch silu*mul"),
            }
            for op, (ours, base, base_name) in cases.items():
                ms, base_ms = _time_pair(ours, base, min_time)
                rows.append(_row(op, dtype, t, h, 0, "bi", ms, base_name, base_ms))
                print(_fmt(rows[-1]), flush=True)
        for t, v in ((1, 151936), (64, 32000)):
            x = torch.randn(t, v, device=device).to(dtype)
            ms, base_ms = _time_pair(lambda: bi.log_softmax(x), lambda: torch.log_softmax(x.float(), -1), min_time)
            rows.append(_row("log_softmax", dtype, t, v, 0, "bi", ms, "torch log_softmax(fp32)", base_ms))
            print(_fmt(rows[-1]), flush=True)
    return rows


def bench_attention(device, dtypes, min_time):
    rows = []
    for dtype in dtypes:
        for hq, hk, d in ((16, 4, 64), (16, 4, 128)):
            for batch, q_len, ctx in ((1, 1024, 1024), (16, 1, 1024)):
                block = 16
                nblocks = batch * ctx // block
                g = torch.Generator().manual_seed(0)
                kc = torch.randn(nblocks, block, hk, d, generator=g).to(dtype)
                vc = torch.randn(nblocks, block, hk, d, generator=g).to(dtype)
                q = torch.randn(batch * q_len, hq, d, generator=g).to(dtype)
                qsl = torch.arange(batch + 1, dtype=torch.int32) * q_len
                lens = torch.full((batch,), ctx, dtype=torch.int32)
                table = torch.arange(nblocks, dtype=torch.int32).view(batch, -1)
                kd = kc.view(batch, ctx, hk, d).transpose(1, 2).repeat_interleave(hq // hk, 1)
                vd = vc.view(batch, ctx, hk, d).transpose(1, 2).repeat_interleave(hq // hk, 1)
                qd = q.view(batch, q_len, hq, d).transpose(1, 2)
                causal = q_len > 1
                ms, base_ms = _time_pair(
                    lambda: bi.attention(q, kc, vc, qsl, lens, table),
                    lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal), min_time)
                rows.append(_row(f"attention_{'prefill' if causal else 'decode'}_d{d}", dtype, batch * q_len, ctx, d,
                                 "bi", ms, "torch SDPA (contiguous KV)", base_ms))
                print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r) -> str:
    return (f"{r['op']:<24} {r['dtype']:<9} M={r['M']:<5} N={r['N']:<6} K={r['K']:<5} "
            f"{r['ms']:9.3f} ms vs {r['baseline_ms']:9.3f} ms  ratio {r['ratio']:.2f}")


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    lin = [r for r in rows if r["op"] == "linear"]
    others = [r for r in rows if r["op"] != "linear"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    for ax, subset, label in ((axes[0], lin, lambda r: f"{short[r['dtype']]} {r['N']}x{r['K']} M={r['M']}"),
                              (axes[1], others, lambda r: f"{r['op']} {short[r['dtype']]} M={r['M']}")):
        if not subset:
            ax.axis("off")
            continue
        ax.bar(range(len(subset)), [r["ratio"] for r in subset],
               color=["tab:blue" if r["dtype"] == "bfloat16" else "tab:orange" for r in subset])
        ax.set_xticks(range(len(subset)), [label(r) for r in subset], rotation=90, fontsize=6)
        ax.set_yscale("log")
        for y, style in ((1.0, "-"), (0.7, "--"), (0.5, ":")):
            ax.axhline(y, color="grey", linestyle=style, linewidth=0.8)
        ax.set_ylabel("speed vs torch (baseline_ms / ms, log)")
    axes[0].set_title("linear vs torch F.linear (blue: bf16, orange: fp32)")
    axes[1].set_title("other ops vs torch")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="batch-invariant bench kernels", description=__doc__)
    parser.add_argument("--out", default=os.path.join("bench", "results"), help="folder for the CSV and PNG")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (about a minute)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--ops", default="linear,rows,attention", help="comma list: linear, rows, attention")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 1.0)
    dtypes = (torch.bfloat16, torch.float32)
    ops = set(args.ops.split(","))
    rows = []
    if "linear" in ops:
        rows += bench_linear(device, dtypes, QUICK_LINEAR_SHAPES if args.quick else LINEAR_SHAPES,
                             M_VALUES, min_time)
    if "rows" in ops:
        rows += bench_rows(device, dtypes, min_time)
    if "attention" in ops:
        rows += bench_attention(device, dtypes, min_time)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"kernels_{device.type}.csv")
    write_csv(rows, csv_path)
    isa = (bi.provenance(device)["cpu_isa"] or {}).get("active")
    title = (f"batch-invariant-kernels {bi.__version__} on {platform.processor() or platform.machine()} "
             f"({torch.get_num_threads()} threads, ISA {isa}), torch {torch.__version__}, {date.today()}")
    plot(rows, os.path.join(args.out, f"kernels_{device.type}.png"), title)
    lin = [r["ratio"] for r in rows if r["op"] == "linear" and r["dtype"] == "bfloat16"]
    if lin:
        m1 = [r["ratio"] for r in rows if r["op"] == "linear" and r["dtype"] == "bfloat16" and r["M"] == 1]
        big = [r["ratio"] for r in rows if r["op"] == "linear" and r["dtype"] == "bfloat16" and r["M"] >= 16]
        gm = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
        print(f"bf16 linear speed vs oneDNN: M=1 geomean {gm(m1):.2f} (min {min(m1):.2f}); "
              f"M>=16 geomean {gm(big):.2f} (min {min(big):.2f})")
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
