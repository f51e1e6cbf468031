"""Data-parallel training on ``torch.distributed``: launch detection, batching, metric reduction.

``pycompress.finetune`` and ``pycompress.distill`` run data-parallel when they find a distributed
launch: an initialized default process group, or ``WORLD_SIZE > 1`` in the environment (set by
``torchrun``), in which case they initialize the default group themselves (``nccl`` when training
on CUDA, ``gloo`` on CPU) and destroy it at interpreter exit.

Batching keeps the math of one process. ``batch_size`` is the *global* batch. Every epoch the
data set is ordered once (``0..N-1``, or a permutation drawn from ``seed + epoch`` that every rank
draws identically), cut into global batches of ``batch_size`` consecutive positions (the last one
holds the remaining ``N mod batch_size`` samples: nothing is dropped or repeated), and position
``p`` of a global batch goes to rank ``p mod W``. Each rank's loss is its local mean scaled by
``n_local * W / n_global`` so that DDP's gradient average equals the gradient of the global-batch
mean, also for a last partial batch that W does not divide. A rank left without a sample in a tiny
last batch runs one sample with weight 0, so every rank takes part in every collective.
"""

from __future__ import annotations

import atexit
import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "DistContext",
    "setup",
    "get_context",
    "is_main_process",
    "barrier",
    "all_reduce_sum",
    "broadcast_masks",
    "check_batching",
    "GlobalBatchSampler",
    "shutdown",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world_size`` ranks, this one is ``rank`` on ``device``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that shows progress bars and writes files."""
        return self.rank == 0


_CREATED_GROUP = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _launched_world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def get_context(device: torch.device | str | None = None) -> DistContext:
    """Returns the current :class:`DistContext` without initializing anything."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistContext(
            world_size=dist.get_world_size(),
            rank=dist.get_rank(),
            local_rank=_env_int("LOCAL_RANK", 0),
            device=dev,
            backend=str(dist.get_backend()),
        )
    return DistContext(device=dev)


def setup(device: torch.device | str | None = None) -> DistContext:
    """Detects a distributed launch and joins it; returns the context of this process.

    * an initialized default process group is used as it is;
    * otherwise, when ``WORLD_SIZE > 1`` (``torchrun``), the default group is initialized from
      the environment (``env://``) with ``nccl`` for CUDA devices and ``gloo`` otherwise, and
      destroyed at interpreter exit (or earlier by :func:`shutdown`);
    * otherwise the context is a single process.

    ``device`` is where training runs; for CUDA under a launch the device becomes
    ``cuda:LOCAL_RANK``.

    Example::

        ctx = pycompress.distributed.setup("cpu")
        if ctx.is_main:
            print(f"training on {ctx.world_size} process(es)")
    """
    global _CREATED_GROUP
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dist.is_available() and not dist.is_initialized() and _launched_world_size() > 1:
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {name} is not: launch "
                    "with torchrun (or set RANK, MASTER_ADDR and MASTER_PORT)"
                )
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            dev = torch.device("cuda", _env_int("LOCAL_RANK", 0))
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        _CREATED_GROUP = True
        atexit.register(shutdown)
    elif not (dist.is_available() and dist.is_initialized()) and _launched_world_size() > 1:
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    ctx = get_context(dev)
    if ctx.enabled and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", ctx.local_rank)
        ctx = DistContext(ctx.world_size, ctx.rank, ctx.local_rank, dev, ctx.backend)
    return ctx


def shutdown() -> None:
    """Destroys the default process group if pycompress created it (no-op otherwise)."""
    global _CREATED_GROUP
    if _CREATED_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CREATED_GROUP = False


def is_main_process() -> bool:
    """True in a single process and on rank 0 of an initialized process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Waits for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sums ``values`` over every rank (returns it unchanged in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = values.device
        if str(dist.get_backend()) == "nccl" and device.type != "cuda":
            work = values.to(torch.device("cuda", torch.cuda.current_device()))
        else:
            work = values.clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        values = work.to(device)
    return values


def broadcast_masks(module: torch.nn.Module, src: int = 0) -> int:
    """Copies every boolean buffer (pruning masks) of ``module`` from rank ``src`` to all ranks.

    Returns the number of buffers broadcast (0 in a single process). Masks computed from
    synchronized weights agree already; the broadcast makes that a guarantee.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return 0
    count = 0
    for _, buf in module.named_buffers():
        if buf is not None and buf.dtype == torch.bool:
            # gloo has no bool collectives: go through uint8.
            tmp = buf.to(torch.uint8)
            dist.broadcast(tmp, src=src)
            buf.copy_(tmp.to(torch.bool))
            count += 1
    return count


def check_batching(num_samples: int, batch_size: int, world_size: int) -> None:
    """Raises ValueError when the data set cannot be split into ``world_size`` equal shares."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_samples < 1:
        raise ValueError("train_data is empty")
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must be divisible by the number of "
            f"processes ({world_size}); use a multiple of {world_size}"
        )
    if num_samples < world_size:
        raise ValueError(
            f"train_data has {num_samples} sample(s), fewer than the {world_size} processes"
        )


class GlobalBatchSampler(DistributedSampler):
    """Yields this rank's share of every global batch (a list of indices per step).

    A :class:`~torch.utils.data.distributed.DistributedSampler` whose unit is the global batch:
    use it as ``DataLoader(dataset, batch_sampler=sampler)`` and call :meth:`set_epoch` every
    epoch. Every rank yields ``ceil(N / batch_size)`` lists per epoch; across ranks each sample
    is seen exactly once per epoch. :meth:`shares` tells a step's local and global sample counts.
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0):
        check_batching(len(dataset), batch_size, num_replicas)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.num_samples_total = len(dataset)

    def __len__(self) -> int:
        return math.ceil(self.num_samples_total / self.batch_size)

    def shares(self, step: int) -> tuple[int, int]:
        """(samples of this rank, samples of the global batch) at ``step`` of an epoch."""
        start = step * self.batch_size
        n_global = max(0, min(self.batch_size, self.num_samples_total - start))
        n_local = len(range(self.rank, n_global, self.num_replicas))
        return n_local, n_global

    def order(self) -> list[int]:
        """The epoch's global order of sample indices (identical on every rank)."""
        n = self.num_samples_total
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for step in range(len(self)):
            chunk = order[step * self.batch_size:(step + 1) * self.batch_size]
            mine = chunk[self.rank::self.num_replicas]
            if not mine:
                mine = chunk[:1]  # weight 0: keeps this rank in the step's collectives
            yield mine
