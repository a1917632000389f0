"""Training with the batch-invariant model: loss goes down, runs are bitwise reproducible, and
FSDP2 (torch.distributed.fsdp.fully_shard, 2 CPU processes over gloo) gives the same logprobs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T

trainer = bi.trainer
pytest.importorskip("transformers", reason="transformers makes the test checkpoint")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from batch_invariant import backends
    if not backends.has_kernel("cpu", "attention_backward"):
        pytest.skip("cpu backend has no attention_backward kernel built here")
    from batch_invariant.models import make_model
    return make_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", size="tiny", dtype="float32")


def _batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 2048, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g) for _ in range(n)]
    return seqs, [4] * n


def _train(path, steps, dtype=torch.float32):
    torch.manual_seed(0)
    model = trainer.load_model(path, dtype=dtype)
    opt = trainer.make_optimizer(model, lr=3e-3)
    target = 7  # reward: probability mass on token 7 -> push its logprob up everywhere
    losses = []
    for step in range(steps):
        seqs, prompts = _batch(step)
        seqs = [torch.cat([s[:4], torch.full((s.numel() - 4,), target)]) for s in seqs]
        lps = model.token_logprobs(seqs, prompts)
        loss = trainer.policy_gradient_loss(lps, [1.0] * len(lps))
        trainer.train_step(model, opt, loss)
        losses.append(float(loss.detach()))
    return model, losses


def test_loss_goes_down_and_runs_are_bitwise_reproducible(tiny_llama):
    model_a, losses = _train(tiny_llama, 6)
    assert losses[-1] < losses[0] * 0.8, losses
    model_b, losses_b = _train(tiny_llama, 6)
    assert losses == losses_b
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert T.bits_equal(a, b), f"{name} differs between two identical training runs"


def test_bf16_training_step_runs(tiny_llama):
    _, losses = _train(tiny_llama, 2, dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FSDP_WORKER = r'''
import os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import batch_invariant as bi
path, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
model = bi.trainer.load_model(path, dtype=torch.float32)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
g = torch.Generator().manual_seed(0)
seqs = [torch.randint(3, 2048, (n,), generator=g) for n in (12, 30, 7)]
lps = model.token_logprobs(seqs, [3, 3, 3])
opt = bi.trainer.make_optimizer(model, lr=1e-3)
loss = bi.trainer.policy_gradient_loss(lps, [1.0, -1.0, 0.5])
bi.trainer.train_step(model, opt, loss)
if rank == 0:
    torch.save([lp.detach() for lp in lps], out)
dist.destroy_process_group()
'''


def test_fsdp2_two_processes_bitwise_equal_to_single(tiny_llama, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    out = tmp_path / "lps.pt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_llama), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=str(Path(tmp_path)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    sharded = torch.load(out)
    model = trainer.load_model(tiny_llama, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 2048, (n,), generator=g) for n in (12, 30, 7)]
    with torch.no_grad():
        single = model.token_logprobs(seqs, [3, 3, 3])
    for a, b in zip(sharded, single):
        assert T.bits_equal(a, b)
