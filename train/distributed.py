"""Training across processes, GPUs and nodes with PyTorch's own machinery: torchrun + DistributedDataParallel.

    torchrun --nproc_per_node 4 -m train --data ... --out ...      (one node, 4 GPUs: nccl)
    torchrun --nproc_per_node 2 -m train ...                       (CPU: gloo)

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``setup()`` reads them (a plain
``python -m train`` is world size 1 and changes nothing). Every rank draws the same *global* batch for a
step from a generator seeded by (seed, step) and takes its own contiguous slice, so N processes at
global batch B see exactly the images one process at batch B sees; DDP averages the gradients, which for
a loss that is a mean over the batch equals the one-process gradient. Rank 0 alone writes logs and the
checkpoint, atomically.
"""
from __future__ import annotations

import gc
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runtime.artifact import atomic_write_bytes

from .batch_share import BatchShare

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process sits: rank among world_size processes, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: no process group (one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_current = DistContext()


def context() -> DistContext:
    """The context ``setup()`` made for this process (world size 1 before and without it): how a family's
    ``fit`` learns its rank without a change to the family contract's signature."""
    return _current


def setup(device: str = "auto", backend: str | None = None) -> DistContext:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); world size 1 without torchrun."""
    global _current
    _current = _setup(device, backend)
    return _current


def _setup(device: str, backend: str | None) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs visible; "
                               "give torchrun --nproc_per_node at most the GPU count")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if world == 1:
        return DistContext(device=device)
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistContext(rank, world, local_rank, device, backend)


def cleanup(ctx: DistContext, ok: bool = True) -> None:
    """Leave the process group together: after a run that ended well, drop the DDP wrappers (``gc``: their
    reducers hold gloo work and sit in reference cycles), wait for every rank (rank 0 calibrates and writes
    while the others are done) and destroy the group on all ranks at once. A rank that leaves alone while
    gloo's threads still hold work was seen to abort at interpreter exit ("terminate called without an
    active exception", SIGABRT) on a loaded CI machine. After a failure nothing collective is attempted: the
    other ranks may be inside a collective this one will never join (a barrier there would hang); torchrun
    ends them."""
    global _current
    _current = DistContext()
    if not (ctx.distributed and dist.is_initialized()):
        return
    if ok:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP around the trainable module (gradients averaged across ranks); the module itself without a group.

    Buffers are not re-broadcast every step: no trained part of any family has batch norm, and the frozen
    statistics (teacher/feature normalisation, head constants) are computed identically on every rank."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    import inspect

    ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    # torch >= 2.14 names it forward_sync_buffers (broadcast_buffers is deprecated there)
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters \
        else "broadcast_buffers"
    return DDP(module, device_ids=ids, **{name: False})


def share_of(global_batch: int, ctx: DistContext, uneven: bool = False) -> BatchShare | None:
    """This rank's share of every step's global batch; None with one process (the plain code paths).

    ``uneven``: a batch the data sizes may split unevenly (``BatchShare.split``), else it must divide."""
    if not ctx.distributed:
        return None
    make = BatchShare.split if uneven else BatchShare.of
    return make(global_batch, ctx.rank, ctx.world_size)


def shard_range(n_items: int, ctx: DistContext, multiple: int = 1) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n_items``, cut at multiples of ``multiple``
    (whole batches: every item is computed in the same batch as one process computes it). May be empty."""
    blocks = BatchShare.split(-(-n_items // multiple), ctx.rank, ctx.world_size)
    return min(blocks.offset * multiple, n_items), min((blocks.offset + blocks.size) * multiple, n_items)


def gather_shards(part: np.ndarray | None, ctx: DistContext) -> np.ndarray:
    """Every rank's ``shard_range`` rows (``part``; None for an empty share), concatenated in rank order:
    all ranks then hold the same whole array, however each device computed its share."""
    if not ctx.distributed:
        if part is None:
            raise ValueError("nothing to gather: the one process's share is empty")
        return part
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, part)
    return np.concatenate([p for p in parts if p is not None])


def check_same_on_all_ranks(values: list[int], ctx: DistContext, what: str) -> None:
    """Raise if the ranks drew different ``values`` (integers): the guard on draws that every rank must make
    identically from its own copy of a seeded generator (a silent mismatch would train on mixed episodes)."""
    if not ctx.distributed:
        return
    mine = torch.tensor(values, dtype=torch.int64, device=ctx.device)
    parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(parts, mine)
    if any(not torch.equal(p, parts[0]) for p in parts):
        raise RuntimeError(f"ranks disagree on {what}: {[p.tolist() for p in parts]}; every rank must read the "
                           "same --data folders with the same --seed")


class LossModule(torch.nn.Module):
    """``fn(model, *args)`` as a module, so DDP sees the forward that uses the trainable parameters.

    Training loops that call submodules directly (student trunk, heads, autoencoder) wrap their loss
    function with this instead of rewriting it: ``losses = wrap(LossModule(_losses, model), ctx)(rgb, ...)``.
    Frozen parts (requires_grad False) are ignored by DDP.
    """

    def __init__(self, fn, model: torch.nn.Module):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)


def global_batch_indices(n_items: int, global_batch: int, step: int, seed: int) -> torch.Tensor:
    """The step's global batch (with replacement, as the one-process loop draws it), identical on every rank.

    Reseeded per step from (seed, step), so ranks agree without communicating and a resumed run
    continues the same sequence.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n_items, (global_batch,), generator=gen)


def rank_slice(indices: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous share of the global batch; the batch must split evenly (equal shares keep
    DDP's gradient average equal to the global-batch mean)."""
    n = len(indices)
    if n % ctx.world_size:
        raise ValueError(f"global batch {n} does not split over {ctx.world_size} processes; "
                         "give a --batch-size divisible by torchrun's --nproc_per_node")
    share = n // ctx.world_size
    return indices[ctx.rank * share:(ctx.rank + 1) * share]


def epoch_indices(n_items: int, epoch: int, seed: int, ctx: DistContext, drop_last: bool = False) -> torch.Tensor:
    """torch's DistributedSampler semantics without a DataLoader: a permutation reseeded per epoch, padded
    (or cut) to a multiple of the world size, every world_size-th item for this rank."""
    gen = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_items, generator=gen)
    if drop_last:
        order = order[:n_items - n_items % ctx.world_size]
    elif n_items % ctx.world_size:
        order = torch.cat([order, order[:ctx.world_size - n_items % ctx.world_size]])
    return order[ctx.rank::ctx.world_size]


def mean_across(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """A logged scalar averaged over ranks (what rank 0 writes to the log)."""
    if not ctx.distributed:
        return value.detach()
    v = value.detach().clone()
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v / ctx.world_size


def save_on_main(path: str | Path, obj: dict, ctx: DistContext) -> Path | None:
    """Rank 0 writes ``obj`` (torch.save) atomically; every rank waits until it is on disk."""
    path = Path(path)
    if ctx.is_main:
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(path, buf.getvalue())
    barrier(ctx)
    return path if ctx.is_main else None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (for state_dict keys without the 'module.' prefix)."""
    return getattr(module, "module", module)
