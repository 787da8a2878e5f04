"""torchrun + DDP (train/distributed.py): 2 gloo processes == 1 process at the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.distributed import DistContext, epoch_indices, global_batch_indices, rank_slice

ROOT = Path(__file__).resolve().parents[1]


def test_rank_slices_cover_the_global_batch_and_epochs_partition():
    idx = global_batch_indices(50, 8, step=3, seed=0)
    assert torch.equal(idx, global_batch_indices(50, 8, step=3, seed=0))  # every rank draws the same batch
    assert not torch.equal(idx, global_batch_indices(50, 8, step=4, seed=0))  # reseeded per step
    parts = [rank_slice(idx, DistContext(rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat(parts), idx)
    with pytest.raises(ValueError, match="divisible"):
        rank_slice(global_batch_indices(50, 7, 0, 0), DistContext(rank=0, world_size=2))
    shares = [epoch_indices(11, epoch=2, seed=0, ctx=DistContext(rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shares} == {4} and set(torch.cat(shares).tolist()) == set(range(11))
    other = epoch_indices(11, epoch=3, seed=0, ctx=DistContext(rank=0, world_size=3))
    assert not torch.equal(shares[0], other)  # reseeded per epoch


def test_two_gloo_processes_equal_one_process(tmp_path):
    from runtime.triton_local import free_port
    from tests.ddp_toy_worker import toy_train

    one = tmp_path / "one"
    one.mkdir()
    toy_train(DistContext(), one)
    two = tmp_path / "two"
    two.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "ddp_toy_worker.py"),
                        "--out", str(two)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.pt", "train_log.jsonl"]  # rank 0 only, no temp
    assert len((two / "train_log.jsonl").read_text().splitlines()) == 6
    a = torch.load(one / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(two / "checkpoint.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k
    torch.manual_seed(0)  # the initial weights toy_train starts from: training must have moved them
    initial = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(6, 4)).state_dict()
    assert all((a[k] - initial[k]).abs().max().item() > 1e-3 for k in a)
