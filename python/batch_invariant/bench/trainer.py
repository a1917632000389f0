"""Trainer benchmark: forward + backward tokens/s of the batch-invariant trainer vs Hugging Face
transformers on the same checkpoint, same inputs, same threads, measured in the same run.

Writes ``trainer_<device>.csv`` (model, dtype, seqs, seq_len, tokens, backend, ms, baseline,
baseline_ms, tokens_per_s, baseline_tokens_per_s, ratio) and a PNG. ratio = ours / HF tokens/s.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from datetime import date

import torch

FIELDS = ["model", "dtype", "seqs", "seq_len", "tokens", "backend", "ms", "baseline", "baseline_ms",
          "tokens_per_s", "baseline_tokens_per_s", "ratio"]


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(model_dir, dtype, seqs, seq_len, reps):
    import transformers

    import batch_invariant as bi

    ours = bi.trainer.load_model(model_dir, dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    hf.train()
    g = torch.Generator().manual_seed(0)
    vocab = ours.config.vocab_size
    ids = torch.randint(3, vocab, (seqs, seq_len), generator=g)
    prompt = 1

    def ours_step():
        ours.zero_grad(set_to_none=True)
        lps = ours.token_logprobs(list(ids), [prompt] * seqs)
        torch.stack([lp.sum() for lp in lps]).sum().backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(ids).logits[:, prompt - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, prompt:, None])
        lp.sum().backward()

    # interleave to share machine noise
    t_ours, t_hf = [], []
    for _ in range(reps):
        t_ours.append(_median_ms(ours_step, 1))
        t_hf.append(_median_ms(hf_step, 1))
    ms, base = statistics.median(t_ours), statistics.median(t_hf)
    tokens = seqs * seq_len
    return {"model": os.path.basename(str(model_dir)), "dtype": str(dtype).replace("torch.", ""), "seqs": seqs,
            "seq_len": seq_len, "tokens": tokens, "backend": "cpu", "ms": round(ms, 2),
            "baseline": f"transformers {transformers.__version__}", "baseline_ms": round(base, 2),
            "tokens_per_s": round(tokens / ms * 1e3, 1), "baseline_tokens_per_s": round(tokens / base * 1e3, 1),
            "ratio": round(base / ms, 3)}


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['dtype']} {r['seqs']}x{r['seq_len']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["tokens_per_s"] for r in rows], width=0.4, label="batch_invariant trainer")
    ax.bar([i + 0.2 for i in x], [r["baseline_tokens_per_s"] for r in rows], width=0.4, label="HF transformers")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("forward+backward tokens/s")
    ax.legend()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="batch-invariant bench trainer", description=__doc__)
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--model", default=None, help="HF checkpoint folder (default: the local 'small' llama)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    from batch_invariant.models import default_model_dir, make_model

    model_dir = args.model or make_model(default_model_dir("llama", "small"), arch="llama", size="small")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for seqs, seq_len in ((4, 256), (1, 1024)):
            rows.append(run(model_dir, dtype, seqs, seq_len, args.reps))
            r = rows[-1]
            print(f"{r['dtype']:<9} {seqs}x{seq_len}: ours {r['tokens_per_s']:8.1f} tok/s, HF "
                  f"{r['baseline_tokens_per_s']:8.1f} tok/s, ratio {r['ratio']:.2f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trainer_cpu.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out, "trainer_cpu.png"),
         f"trainer fwd+bwd on {os.path.basename(str(model_dir))}, {torch.get_num_threads()} threads, {date.today()}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
