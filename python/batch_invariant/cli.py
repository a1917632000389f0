"""Command line: ``batch-invariant demo | info | bench | make-model``.

The vLLM end-to-end demo and the parity checker come with the CLI issue; today's
``demo`` shows the kernel-level problem and fix on this machine.
"""
from __future__ import annotations

import argparse
import json
import sys


def _demo(args) -> int:
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
    demo = sub.add_parser("demo", help="show batch variance of torch vs batch_invariant on this machine")
    demo.add_argument("--hidden", type=int, default=1024)
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
            return _demo(args)
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
