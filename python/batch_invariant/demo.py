"""``batch-invariant demo``: the problem and the fix in one command, on the embedded default model.

1. make (or reuse) the local default model; 2. run vLLM without the flag and 3. with
BATCH_INVARIANT=1 (separate processes), each on the same prompts alone and batched; 4. recompute
the flag-on engine's logprobs with the trainer. Prints a summary table.
"""
from __future__ import annotations

import time

import torch


def _step(i, n, text):
    print(f"[{i}/{n}] {text} ...", flush=True)
    return time.perf_counter()


def _done(t0):
    print(f"      done in {time.perf_counter() - t0:.1f} s", flush=True)


def _row(label, off, on):
    print(f"| {label:<58} | {off:>14} | {on:>18} |")


def main(args) -> int:
    from . import parity
    from .models import default_model_dir, make_model

    n = 4
    t0 = _step(1, n, f"default model ({args.arch}, {args.size}; made locally, cached)")
    model_dir = make_model(default_model_dir(args.arch, args.size), arch=args.arch, size=args.size)
    _done(t0)
    common = dict(scenarios=["batch"], sampling=["greedy", "seeded"], num_prompts=args.prompts,
                  max_tokens=args.max_tokens, engine={"dtype": "bfloat16"}, progress=True)
    t0 = _step(2, n, "vLLM without the flag: each prompt alone, then all batched")
    off = parity.run_engine(model_dir, flag=False, **common)
    _done(t0)
    t0 = _step(3, n, "vLLM with BATCH_INVARIANT=1: the same")
    on = parity.run_engine(model_dir, flag=True, **common)
    _done(t0)
    t0 = _step(4, n, "trainer: logprobs of the same tokens (both engines' outputs)")
    prov = on.pop("_provenance", None)
    off.pop("_provenance", None)
    inv_off, inv_on = parity.invariance_report(off)["batch"], parity.invariance_report(on)["batch"]
    par_off = parity.trainer_report(off, model_dir)["batch"]
    par_on = parity.trainer_report(on, model_dir)["batch"]
    _done(t0)
    print()
    _row("", "without flag", "BATCH_INVARIANT=1")
    _row("-" * 58, "-" * 14, "-" * 18)
    _row("prompts whose output changes alone vs in a batch",
         f"{inv_off['invariance_mismatches']}/{inv_off['compared']}",
         f"{inv_on['invariance_mismatches']}/{inv_on['compared']}")
    _row("sampled-token logprobs != trainer's (bitwise)", f"{par_off['mismatches']}/{par_off['tokens']}",
         f"{par_on['mismatches']}/{par_on['tokens']}")
    _row("max |engine - trainer| logprob", f"{par_off['max_abs_diff']:.3g}", f"{par_on['max_abs_diff']:.3g}")
    ok = inv_on["invariance_mismatches"] == 0 and par_on["mismatches"] == 0
    print()
    if prov:
        print(f"engine provenance: backend {prov['ops'].get('linear')}, ISA {(prov.get('cpu_isa') or {}).get('active')}, "
              f"contract v{prov['contract_version']}, torch {prov['torch']}")
    print("OK: with BATCH_INVARIANT=1 the engine is batch-invariant and bitwise equal to the trainer."
          if ok else "FAILED: differences with the flag on (see the table).")
    return 0 if ok else 1


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)


if __name__ == "__main__":
    raise SystemExit("use: batch-invariant demo")
