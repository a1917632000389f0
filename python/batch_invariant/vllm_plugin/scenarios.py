"""Batch-invariance scenarios run inside one vLLM engine process (used by the test suite and the
parity checker). Flag on and off need separate processes, so this module is run as

    python -m batch_invariant.vllm_plugin.scenarios SPEC.json OUT.pt

with a JSON spec {"model": dir, "flag": bool, "engine": {LLM kwargs}, "scenarios": [...],
"update_from": optional checkpoint dir}. It writes, per scenario, the runs whose outputs must be
bitwise identical (e.g. "alone" vs "batched"), each a list of records
{"prompt": [ids], "tokens": [ids], "logprobs": [float]}.
"""
from __future__ import annotations

import json
import os
import random
import sys

SCENARIOS = ("batch", "needle", "long", "prefix", "update", "dump")


def _prompts(n, lo, hi, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _records(outputs):
    recs = []
    for o in outputs:
        c = o.outputs[0]
        lps = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] if c.logprobs is not None else []
        recs.append({"prompt": list(o.prompt_token_ids), "tokens": list(c.token_ids), "logprobs": lps})
    return recs


def _params(kind, n, max_tokens, seed0=1000):
    from vllm import SamplingParams

    common = {"max_tokens": max_tokens, "logprobs": 0, "ignore_eos": True}
    if kind == "greedy":
        return [SamplingParams(temperature=0.0, **common) for _ in range(n)]
    if kind == "seeded":
        return [SamplingParams(temperature=0.8, seed=seed0 + i, **common) for i in range(n)]
    if kind == "topkp":
        return [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=seed0 + i, **common) for i in range(n)]
    raise ValueError(kind)


def _generate(llm, prompts, params, progress=False):
    from vllm.inputs import TokensPrompt

    return _records(llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=progress))


def _alone(llm, prompts, params, progress, label):
    """Each prompt in its own generate call (batch of one)."""
    pairs = list(zip(prompts, params))
    if progress:
        from tqdm import tqdm
        pairs = tqdm(pairs, desc=label, unit="prompt")
    return [_generate(llm, [p], [sp])[0] for p, sp in pairs]


def run(spec: dict) -> dict:
    from vllm import LLM

    from . import WORKER_EXTENSION

    engine = dict(spec.get("engine", {}))
    engine.setdefault("seed", 0)
    engine.setdefault("max_model_len", 2048)
    llm = LLM(spec["model"], worker_extension_cls=WORKER_EXTENSION, **engine)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    kinds = spec.get("sampling", ["greedy", "seeded"])
    max_tokens = int(spec.get("max_tokens", 16))
    progress = bool(spec.get("progress", False))
    results: dict = {}
    for name in spec["scenarios"]:
        res = {}
        if name == "batch":
            prompts = _prompts(int(spec.get("num_prompts", 32)), 4, 80, vocab, 1)
            for kind in kinds:
                params = _params(kind, len(prompts), max_tokens)
                res[f"{kind}/batched"] = _generate(llm, prompts, params, progress)
                res[f"{kind}/alone"] = _alone(llm, prompts, params, progress, f"{kind}, one at a time")
        elif name == "needle":
            needle = _prompts(1, 40, 41, vocab, 7)[0]
            fillers = _prompts(64, 2, 200, vocab, 8)
            for kind in kinds:
                sp = _params(kind, 65, max_tokens)
                res[f"{kind}/alone"] = _generate(llm, [needle], [sp[0]])
                for pos in (0, 23, 64):
                    batch = fillers[:pos] + [needle] + fillers[pos:]
                    params = sp[1:pos + 1] + [sp[0]] + sp[pos + 1:]
                    res[f"{kind}/pos{pos}"] = [_generate(llm, batch, params)[pos]]
        elif name == "long":
            prompts = _prompts(3, 900, 1100, vocab, 11)
            for kind in kinds:
                params = _params(kind, len(prompts), max_tokens)
                res[f"{kind}/batched"] = _generate(llm, prompts, params)
        elif name == "prefix":
            base = _prompts(1, 600, 601, vocab, 12)[0]
            prompts = [base + tail for tail in _prompts(4, 5, 60, vocab, 13)]
            params = _params("seeded", len(prompts), max_tokens)
            llm.reset_prefix_cache()
            res["cold"] = _generate(llm, prompts, params)
            res["hot"] = _generate(llm, prompts, params)
        elif name == "update":
            from safetensors.torch import load_file

            from . import update_weights

            prompts = _prompts(8, 4, 80, vocab, 14)
            params = _params("seeded", len(prompts), max_tokens)
            res["before"] = _generate(llm, prompts, params)
            new = {}
            for f in sorted(os.listdir(spec["update_from"])):
                if f.endswith(".safetensors"):
                    new.update(load_file(os.path.join(spec["update_from"], f)))
            update_weights(llm, new)
            res["after"] = _generate(llm, prompts, params)
        elif name == "dump":
            # per-layer activations of one token sequence, prefilled alone (engine must be eager)
            llm.collective_rpc("bi_activation_dump", args=(True,))
            res["record"] = _generate(llm, [spec["dump_tokens"]], _params("greedy", 1, 1))
            res["activations"] = llm.collective_rpc("bi_activation_dump", args=(False,))[0]
        else:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        results[name] = res
    import batch_invariant as bi
    from batch_invariant.parity import compute_device

    results["_provenance"] = bi.provenance(compute_device())
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(open(argv[0]).read())
    if spec.get("flag", True):
        os.environ["BATCH_INVARIANT"] = "1"
    else:
        os.environ.pop("BATCH_INVARIANT", None)
    import torch

    torch.save(run(spec), argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
