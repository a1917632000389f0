"""Command line: ``batch-invariant demo | parity | rl-demo | bench | make-model | kernels-demo | info``.

``demo`` runs vLLM with and without BATCH_INVARIANT=1 on the embedded default model and checks
trainer parity; ``kernels-demo`` shows the kernel-level problem and fix without vLLM.
"""
from __future__ import annotations

import argparse
import json
import sys


def _kernels_demo(args) -> int:
    import torch
    import torch.nn.functional as F

    import batch_invariant as bi
    from batch_invariant import testing as T

    torch.manual_seed(0)
    k, n = args.hidden, args.hidden * 4
    w = (torch.randn(n, k) * k ** -0.5).bfloat16()
    probe = torch.randn(1, k).bfloat16()
    print(f"A row alone vs the same row inside batches of M rows (bf16 linear {k} -> {n}), bitwise:")
    print(f"{'M':>6} | {'torch F.linear':>16} | {'bi.linear':>10}")
    bad_torch = bad_bi = 0
    alone_t, alone_b = F.linear(probe, w)[0], bi.linear(probe, w)[0]
    for m in (2, 8, 16, 64, 128, 512):
        batch = torch.randn(m, k).bfloat16()
        batch[m // 2] = probe[0]
        same_t = T.bits_equal(F.linear(batch, w)[m // 2], alone_t)
        same_b = T.bits_equal(bi.linear(batch, w)[m // 2], alone_b)
        bad_torch += not same_t
        bad_bi += not same_b
        print(f"{m:>6} | {'identical' if same_t else 'DIFFERENT':>16} | {'identical' if same_b else 'DIFFERENT':>10}")
    print(f"\ntorch: {bad_torch} of 6 batch sizes change the row's bits; batch_invariant: {bad_bi}.")
    print(json.dumps(bi.provenance(), indent=1))
    return 0 if bad_bi == 0 else 1


def _parity(args) -> int:
    from batch_invariant import parity

    report = parity.parity(args.model, scenarios=args.scenarios.split(","), num_prompts=args.prompts,
                           max_tokens=args.max_tokens, mode=args.mode, dtype=args.dtype)
    for name, s in report["scenarios"].items():
        print(f"{name:<8} tokens {s.get('tokens', 0):>6}  mismatches {s.get('mismatches', 0):>5}  "
              f"max|diff| {s.get('max_abs_diff', 0.0):.3g}  invariance mismatches {s.get('invariance_mismatches', 0)}")
    eng = (report["provenance"].get("engine") or {})
    print(f"engine backend {eng.get('ops', {}).get('linear')} ISA {(eng.get('cpu_isa') or {}).get('active')}; "
          f"trainer backend {report['provenance']['trainer']['ops'].get('linear')}")
    print("OK: bitwise parity" if report["ok"] else f"MISMATCH: {report['first_divergence']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


def _info(args) -> int:
    import batch_invariant as bi

    print(json.dumps(bi.provenance(args.device), indent=1))
    return 0


def _make_model(args) -> int:
    from batch_invariant.models import make_model

    path = make_model(args.out, args.arch, args.size, seed=args.seed, tie_word_embeddings=args.tie,
                      dtype=args.dtype, overwrite=args.overwrite)
    print(path)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="batch-invariant", description="batch-invariant kernels for vLLM and a matching trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    from batch_invariant import demo as demo_mod

    demo = sub.add_parser("demo", help="vLLM with and without BATCH_INVARIANT=1 + trainer parity (default model)")
    demo_mod.add_arguments(demo)
    from batch_invariant import rl_demo

    rl = sub.add_parser("rl-demo", help="GRPO loop: vLLM samples, the trainer learns, KL exactly 0 every step")
    rl_demo.add_arguments(rl)
    kd = sub.add_parser("kernels-demo", help="torch vs batch_invariant linear, row alone vs in batches (no vLLM)")
    kd.add_argument("--hidden", type=int, default=1024)
    par = sub.add_parser("parity", help="engine (BATCH_INVARIANT=1) vs trainer parity on a local HF checkpoint")
    par.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    par.add_argument("--prompts", type=int, default=32)
    par.add_argument("--max-tokens", type=int, default=16)
    par.add_argument("--scenarios", default="batch,needle,long,prefix", help="comma list of batch,needle,long,prefix")
    par.add_argument("--mode", default="raw", choices=["raw", "processed"], help="logprobs mode")
    par.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    par.add_argument("--json", default=None, help="write the report (schema: docs/parity.md)")
    info = sub.add_parser("info", help="print the provenance (backend per op, ISA, versions) as JSON")
    info.add_argument("--device", default="cpu")
    bench = sub.add_parser("bench", help="benchmarks: kernels | trainer | e2e (CSV + PNG under bench/results)")
    bench.add_argument("what", choices=["kernels", "trainer", "e2e"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    from batch_invariant import models  # stdlib-only at import time

    mm = sub.add_parser("make-model", help="make a deterministic random-init model + tokenizer folder (no downloads)")
    mm.add_argument("out", help="output folder (reused when it already holds the same model)")
    mm.add_argument("--arch", default="llama", choices=list(models.ARCHS))
    mm.add_argument("--size", default="tiny", choices=list(models.SIZES))
    mm.add_argument("--seed", type=int, default=0)
    tie = mm.add_mutually_exclusive_group()
    tie.add_argument("--tie", dest="tie", action="store_true", default=None, help="tie input/output embeddings")
    tie.add_argument("--no-tie", dest="tie", action="store_false", help="untie them (default: the family's)")
    mm.add_argument("--dtype", default="bfloat16", choices=list(models.DTYPES))
    mm.add_argument("--overwrite", action="store_true", help="rebuild even if the folder holds this model")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return demo_mod.main(args)
        if args.command == "rl-demo":
            return rl_demo.main(args)
        if args.command == "kernels-demo":
            return _kernels_demo(args)
        if args.command == "parity":
            return _parity(args)
        if args.command == "info":
            return _info(args)
        if args.command == "make-model":
            return _make_model(args)
        import importlib
        return importlib.import_module(f"batch_invariant.bench.{args.what}").main(args.rest)
    except Exception as exc:  # one clear line, no traceback, for user-facing errors
        print(f"batch-invariant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
