"""A few DDP steps of a toy model (run by torchrun from tests/test_distributed.py; also imported there
for the one-process reference). Not a test module itself."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from train.distributed import (DistContext, LossModule, cleanup, global_batch_indices, mean_across, rank_slice,
                               save_on_main, setup, wrap)


def toy_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Like the training loop's loss function: calls the model's parts itself, returns named losses."""
    for part in model:
        x = part(x)
    return {"mse": F.mse_loss(x, y)}


def toy_train(ctx: DistContext, out: Path, steps: int = 6, global_batch: int = 8, seed: int = 0) -> Path | None:
    torch.manual_seed(seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    g = torch.Generator().manual_seed(123)
    data, target = torch.randn(40, 3, 8, 8, generator=g), torch.randn(40, 4, generator=g)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(6, 4))
    losses_fn = wrap(LossModule(toy_loss, model), ctx)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        idx = rank_slice(global_batch_indices(len(data), global_batch, step, seed), ctx)
        loss = sum(losses_fn(data[idx], target[idx]).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        logged = float(mean_across(loss, ctx))
        if ctx.is_main:
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": logged}) + "\n")
    return save_on_main(out / "checkpoint.pt", {"state_dict": model.state_dict(), "step": steps}, ctx)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ctx = setup("cpu")
    try:
        toy_train(ctx, Path(args.out))
    finally:
        cleanup(ctx)
    sys.exit(0)
