"""`torchrun --nproc_per_node 2 -m train` (gloo, CPU) == `python -m train` at the same global batch, per family.

The one-process reference runs the same CLI entry (``train.cli.main``) in this process with one thread,
as torchrun's workers run (OMP_NUM_THREADS=1), so both sides sum in the same order where they can.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from train.batch_share import BatchShare, GlobalDropout, draw, set_share

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--image-size", "64", "--steps", "3", "--batch-size", "4", "--seed", "3"]
WEIGHT_TOL = 1e-5  # trained parameters, absolute
CALIBRATED_TOL = 1e-4  # the head's constants fitted afterwards on rank 0, relative to each tensor's largest value
# cross-class: tiny predictor, two classes (episodes span both), and an odd global batch (episode_batch 5 over
# 2 processes: rows 3 + 2), so the uneven split is what the test checks
CROSSCLASS = ["--steps", "6", *(a for kv in ["backbone=lite0", "stride=8", "dim=32", "heads=2", "ff=64", "layers=1",
                                             "prototypes=16", "proto_sets=2", "episode_batch=5"]
                                for a in ("--model-arg", kv))]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from runtime.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("ddp") / "parts", size=64, n_train=24, n_test_good=2,
                         n_per_defect=1, seed=0)


@pytest.fixture(scope="module")
def second_class(small_data) -> Path:
    from runtime.synthetic import write_dataset

    return write_dataset(small_data.parent / "trays", size=64, n_train=24, n_test_good=2, n_per_defect=1, seed=1,
                         product="tray")


def _one_process(data: Path | list[Path], out: Path, family: str, extra: list[str] = ()) -> dict:
    from train.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--data", *map(str, _paths(data)), "--out", str(out), "--model", family, *ARGS, *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _paths(data: Path | list[Path]) -> list[Path]:
    return [data] if isinstance(data, Path) else list(data)


def _torchrun(data: Path | list[Path], out: Path, family: str, extra: list[str] = ()) -> subprocess.CompletedProcess:
    from runtime.triton_local import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "train", "--data", *map(str, _paths(data)), "--out", str(out), "--model", family,
                           *ARGS, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family", ["efficientad_lite", "uniad", "generalad_lite", "patchcore_lite",
                                    "crossclass_lite"])
def test_torchrun_two_processes_equal_one_process(tmp_path, small_data, family, request):
    data, extra = small_data, []
    if family == "crossclass_lite":  # episodic over classes: give it two
        data, extra = [small_data, request.getfixturevalue("second_class")], CROSSCLASS
    one = _one_process(data, tmp_path / "one", family, extra)
    r = _torchrun(data, tmp_path / "two", family, extra)
    assert r.returncode == 0, r.stderr[-3000:]
    two_dir = tmp_path / "two"
    assert sorted(p.name for p in two_dir.iterdir()) == ["checkpoint.pt", "train_log.jsonl"]  # rank 0 only, no temp
    assert r.stdout.count(str(two_dir / "checkpoint.pt")) == 1, r.stdout  # rank 0 reports it, once
    two = torch.load(two_dir / "checkpoint.pt", weights_only=True)
    assert two["train"]["world_size"] == 2 and "world_size" not in one["train"]  # really two DDP processes
    from train.loop import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    a, b = one["state_dict"], two["state_dict"]
    assert a.keys() == b.keys()
    assert bool(trained) == (family != "patchcore_lite")
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        if k in trained:
            assert diff <= WEIGHT_TOL, (k, diff)
        else:
            assert diff <= CALIBRATED_TOL * max(1.0, a[k].double().abs().max().item()), (k, diff)
    log_one = [json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (two_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_one] == [r["step"] for r in log_two]
    for r1, r2 in zip(log_one, log_two):
        assert r1.keys() == r2.keys()
        assert all(abs(r1[k] - r2[k]) <= 1e-5 * max(1.0, abs(r1[k])) if isinstance(r1[k], float) else r1[k] == r2[k]
                   for k in r1), (r1, r2)
    if family == "crossclass_lite":  # the same episodes, drawn from both classes
        episodes = one["train"]["episodes_per_class"]
        assert episodes == two["train"]["episodes_per_class"] and len(episodes) == 2 and min(episodes.values()) > 0


def test_global_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="divisible by torchrun's --nproc_per_node"):
        BatchShare.of(5, rank=0, world=2)


def test_uneven_split_and_shards_cover_every_row_once_in_order():
    """A batch the data sizes (a class smaller than the episode) and whole-batch feature shards."""
    from train.distributed import DistContext, shard_range

    for total, world in [(5, 2), (2, 3), (7, 3), (0, 2)]:
        shares = [BatchShare.split(total, r, world) for r in range(world)]
        rows = torch.cat([s.rows(torch.arange(total)) for s in shares])
        assert torch.equal(rows, torch.arange(total)), (total, world)
        assert max(s.size for s in shares) - min(s.size for s in shares) <= 1
    ranges = [shard_range(44, DistContext(rank=r, world_size=3), 16) for r in range(3)]
    assert ranges == [(0, 16), (16, 32), (32, 44)]
    ranges = [shard_range(20, DistContext(rank=r, world_size=3), 16) for r in range(3)]
    assert ranges == [(0, 16), (16, 20), (20, 20)]  # a rank may hold none
    assert shard_range(20, DistContext(), 16) == (0, 20)


@pytest.mark.parametrize("shape", [(6, 8, 5, 5), (6, 16, 12)])
def test_global_dropout_rows_equal_one_process_dropout(shape):
    """Each rank's dropout mask is its rows of the mask one process draws for the global batch."""
    x = torch.randn(shape)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(5)
    ref = F.dropout(x, 0.3, training=True)
    parts = []
    for rank in range(3):
        torch.manual_seed(5)  # every rank's global RNG is seeded the same
        m = GlobalDropout(0.3)
        set_share(m, BatchShare.of(6, rank, 3))
        parts.append(m(x[rank * 2:(rank + 1) * 2]))
    assert torch.equal(torch.cat(parts), ref)
    torch.manual_seed(5)
    assert torch.equal(GlobalDropout(0.3)(x), ref)  # without a share: nn.Dropout exactly
    gen = torch.Generator().manual_seed(1)
    full = torch.rand((6, 3), generator=gen)
    gen.manual_seed(1)
    assert torch.equal(draw(lambda s: torch.rand(s, generator=gen), (2, 3), BatchShare.of(6, 1, 3)), full[2:4])
