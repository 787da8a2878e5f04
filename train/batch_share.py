"""One rank's share of a global training batch: what makes N DDP processes compute what one process computes.

DDP averages the ranks' gradients. That equals the one-process gradient only if (a) every rank sees
exactly the images and the random draws one process would give those images, and (b) each rank's loss,
averaged over ranks, is the global-batch loss. Plain batch means satisfy (b) with equal shares; losses
over the whole batch (a quantile, class-balanced means) use ``gather``/``total`` below.

For (a), every rank holds the same seeded generator and draws in the same order as one process, always
the *global* batch's worth (``draw``): per-batch draws (an augmentation's kind and factor) are then
identical on every rank, and per-image draws (noise) are the global tensor's rows of this rank. Dropout
masks come from torch's global RNG, seeded identically on every rank: ``GlobalDropout`` draws the mask of
the global batch the way ``F.dropout`` does and keeps this rank's rows. Nothing depends on the rank
except which rows are kept.

With one process there is no share (``None``) and every helper is the plain one-process code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class BatchShare:
    """Rows ``[offset, offset + size)`` of a global batch of ``total`` images, split evenly over ``world`` ranks."""

    offset: int
    size: int
    total: int
    world: int

    @classmethod
    def of(cls, global_batch: int, rank: int, world: int) -> "BatchShare":
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} processes; "
                             "give a --batch-size divisible by torchrun's --nproc_per_node")
        size = global_batch // world
        return cls(rank * size, size, global_batch, world)

    @classmethod
    def split(cls, total: int, rank: int, world: int) -> "BatchShare":
        """Contiguous near-equal rows of a batch whose size the data fixes, not the user (a class smaller than
        the episode batch): the first ``total % world`` ranks hold one row more, a rank may hold none. Exact
        only with losses written as ``mean_loss_sum`` over the global count (a per-rank mean needs ``of``)."""
        base, extra = divmod(total, world)
        return cls(rank * base + min(rank, extra), base + int(rank < extra), total, world)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor or numpy array (dim 0)."""
        return t[self.offset:self.offset + self.size]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape on all ranks), concatenated in rank order along dim 0 (no gradient)."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def total_of(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks (no gradient)."""
        v = t.detach().clone()
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        return v


def draw(fn: Callable[[tuple[int, ...]], torch.Tensor], shape: tuple[int, ...], share: BatchShare | None) -> torch.Tensor:
    """``fn(shape)`` for a per-image random tensor of the local batch (dim 0): with a share, the global
    batch's draw (so the generator advances as in one process) and this rank's rows of it."""
    if share is None:
        return fn(tuple(shape))
    return share.rows(fn((share.total, *shape[1:])))


class GlobalDropout(nn.Dropout):
    """``nn.Dropout`` whose mask, under DDP, is this rank's rows of the mask one process draws for the
    global batch (identically seeded global RNG on every rank). Without a share: ``nn.Dropout`` exactly.

    The mask reproduces CPU ``F.dropout`` (bernoulli_ on an empty tensor like the input, divided by
    1 - p); on CUDA, ``torch.native_dropout`` on the global shape (the fused kernel's own draw)."""

    share: BatchShare | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = self.share
        if share is None or not self.training or self.p == 0.0 or x.shape[0] != share.size:
            return super().forward(x)
        shape = (share.total, *x.shape[1:])
        if self.p == 1.0:
            return x * torch.zeros_like(x)
        if x.is_cuda:
            _, mask = torch.native_dropout(torch.ones(shape, dtype=x.dtype, device=x.device), self.p, True)
            return x * share.rows(mask).to(x.dtype) * (1.0 / (1.0 - self.p))
        fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        noise = torch.empty(shape, dtype=x.dtype, device=x.device).to(memory_format=fmt)
        noise.bernoulli_(1.0 - self.p)
        noise.div_(1.0 - self.p)
        return x * share.rows(noise)


def set_share(module: nn.Module, share: BatchShare | None) -> None:
    """Tell every ``GlobalDropout`` in ``module`` which rows of the global batch this rank computes."""
    for m in module.modules():
        if isinstance(m, GlobalDropout):
            m.share = share


def dropout_to_global(module: nn.Module) -> nn.Module:
    """Swap every plain ``nn.Dropout`` of ``module`` for a ``GlobalDropout`` of the same p (no parameters move)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Dropout:
            setattr(module, name, GlobalDropout(child.p, child.inplace))
        else:
            dropout_to_global(child)
    return module


def mean_loss_sum(values: torch.Tensor, count: torch.Tensor | int, share: BatchShare | None) -> torch.Tensor:
    """A mean over elements selected across the global batch, written so DDP's gradient average gives the
    one-process gradient: this rank's sum / global count * world size."""
    world = 1 if share is None else share.world
    return values.sum() / count * world


__all__ = ["BatchShare", "draw", "GlobalDropout", "set_share", "dropout_to_global", "mean_loss_sum"]
