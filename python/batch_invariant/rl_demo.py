"""``batch-invariant rl-demo``: a small GRPO loop that is exactly on-policy.

vLLM (BATCH_INVARIANT=1, in this process) samples groups of completions; the trainer recomputes
their logprobs, which must equal the engine's bit for bit (importance ratio exactly 1, KL exactly
0); a policy-gradient step with group-normalised advantages updates the trainer; the new weights
are pushed into the running engine (prefix cache reset). Reward: the fraction of completion
tokens equal to a target token, which a random model learns in a few dozen steps.
"""
from __future__ import annotations

import os
import random
import time


def _setup_env() -> None:
    from .parity import ENGINE_ENV

    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ["BATCH_INVARIANT"] = "1"  # this process is the demo's engine: the plugin must load


def main(args) -> int:
    _setup_env()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import batch_invariant as bi
    from batch_invariant.models import default_model_dir, make_model
    from batch_invariant.vllm_plugin import WORKER_EXTENSION, update_weights

    model_dir = make_model(default_model_dir(args.arch, args.size, dtype="float32"), arch=args.arch,
                           size=args.size, dtype="float32")
    print(f"model {model_dir}; starting vLLM with BATCH_INVARIANT=1 ...", flush=True)
    llm = LLM(str(model_dir), dtype="float32", seed=0, max_model_len=512, worker_extension_cls=WORKER_EXTENSION)
    from batch_invariant.parity import compute_device

    device = compute_device()  # the GPU when there is one, as vLLM
    policy = bi.trainer.load_model(model_dir, dtype=torch.float32, device=device)
    opt = bi.trainer.make_optimizer(policy, lr=args.lr)
    vocab = policy.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(4, 12))] for _ in range(args.prompts)]
    target = None
    history = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = [p for p in prompts for _ in range(args.group)]
        params = [SamplingParams(temperature=1.0, max_tokens=args.max_tokens, logprobs=0, ignore_eos=True,
                                 seed=step * 10_000 + i) for i in range(len(batch))]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        completions = [list(o.outputs[0].token_ids) for o in outs]
        engine_lp = [torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                     for o in outs]
        if target is None:  # a token the initial policy emits now and then: learnable, not yet common
            counts = torch.bincount(torch.tensor(sum(completions, [])), minlength=vocab)
            target = int(torch.argsort(counts, descending=True)[min(10, int((counts > 0).sum()) - 1)])
            print(f"target token {target} (initial frequency {int(counts[target])})", flush=True)
        rewards = torch.tensor([sum(t == target for t in c) / len(c) for c in completions])
        grouped = rewards.view(-1, args.group)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).flatten()
        seqs = [torch.tensor(p + c, device=device) for p, c in zip(batch, completions)]
        lps = [lp.cpu() for lp in policy.token_logprobs(seqs, [len(p) for p in batch])]
        ratio = torch.cat([torch.exp(lp.detach() - e) for lp, e in zip(lps, engine_lp)])
        exact = all(torch.equal(lp.detach(), e) for lp, e in zip(lps, engine_lp))
        kl = float(torch.cat([e - lp.detach() for lp, e in zip(lps, engine_lp)]).mean())
        loss = bi.trainer.policy_gradient_loss(lps, adv.tolist())
        bi.trainer.train_step(policy, opt, loss)
        update_weights(llm, dict(policy.state_dict()))
        history.append((step, float(rewards.mean()), kl, float((ratio - 1).abs().max())))
        print(f"step {step:>3}  reward {rewards.mean():.3f}  KL {kl:.1e}  max|ratio-1| {history[-1][3]:.1e}  "
              f"{'bitwise on-policy' if exact else 'NOT ON-POLICY'}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        if not exact:
            print("FAILED: trainer and engine logprobs differ", flush=True)
            return 1
    _plot(history, args.plot)
    print(f"reward {history[0][1]:.3f} -> {history[-1][1]:.3f}; KL exactly 0 at every step; plot: {args.plot}")
    return 0


def _plot(history, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(steps, [h[1] for h in history], marker="o")
    a.set_title("reward (fraction of target tokens)")
    a.set_xlabel("step")
    b.plot(steps, [h[2] for h in history], marker="o", label="KL(engine || trainer)")
    b.plot(steps, [h[3] for h in history], marker="x", label="max |ratio - 1|")
    b.set_title("on-policy error (exactly 0)")
    b.set_xlabel("step")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--plot", default="rl_demo.png")
