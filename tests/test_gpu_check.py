"""bench/gpu_check.sh --dry-run: the GPU acceptance script's logic, through the Triton interpreter."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from batch_invariant.bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path, require):
    for op in ("linear", "attention", "rms_norm", "log_softmax"):
        require("triton", op)
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    env.pop("BATCH_INVARIANT_BACKEND", None)
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    files = {p.name.rsplit("_", 1)[-1]: p for p in tmp_path.glob("gpu_cpu-interpreter_*.csv")}
    assert set(files) == {"matmul.csv", "attention.csv", "rows.csv", "checks.csv"}, sorted(tmp_path.iterdir())
    rows = {name: list(csv.DictReader(path.open())) for name, path in files.items()}
    for name, data in rows.items():
        assert data and all(r["gpu"] == "cpu-interpreter" and r["date"] for r in data), name
        assert not any(r.get("error") for r in data), (name, data)
    assert len(rows["matmul.csv"]) == len(gpu.DRY_M_VALUES) * len(gpu.DRY_LINEAR_SHAPES)
    assert all(float(r["ms"]) > 0 and float(r["baseline_ms"]) > 0 for r in rows["matmul.csv"])
    assert {r["op"] for r in rows["attention.csv"]} == {"decode_attention", "prefill_attention"}
    assert all(r["result"] == "pass" for r in rows["checks.csv"])
    # The short table is printed last (after the per-case lines), one line per case.
    table = out.stdout[out.stdout.rindex("wrote "):]
    assert all(r["backend"] == "triton" for r in rows["matmul.csv"] + rows["attention.csv"] + rows["rows.csv"])
    assert table.count("triton linear tiny_proj") == len(gpu.DRY_M_VALUES) and "decode_attention" in table
    assert "interpreter: no target" in table
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
