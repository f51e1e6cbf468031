"""KDLoss under DistributedDataParallel, one shard of a batch per rank (run with torchrun).

Every rank checks its all-reduced gradient against the float64 reference: the mean over ranks of
each shard's KD + cross-entropy gradient. Prints "ok rank <r>" and exits 0 when it matches.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_nn_kd import kdloss_ref  # noqa: E402

from pycompress.nn import KDLoss  # noqa: E402


def check(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.nn.Linear(16, 40)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(6 * world, 16, generator=g)
    teacher = torch.randn(6 * world, 40, generator=g)
    y = torch.randint(0, 40, (6 * world,), generator=g)
    y[5] = -100  # an ignored row on rank 0's shard
    rows = slice(6 * rank, 6 * (rank + 1))
    model = DDP(student)
    KDLoss(temperature=2.0, alpha=0.7)(model(x[rows]), teacher[rows], y[rows]).backward()
    ref = torch.zeros(40, 16, dtype=torch.float64)
    for r in range(world):
        w = student.weight.detach().double().clone().requires_grad_()
        b = student.bias.detach().double()
        s = x[6 * r:6 * (r + 1)].double() @ w.t() + b
        kdloss_ref(s, teacher[6 * r:6 * (r + 1)], y[6 * r:6 * (r + 1)], 2.0, 0.7, "batchmean",
                   -100, "forward").backward()
        ref += w.grad / world
    torch.testing.assert_close(student.weight.grad.double(), ref, rtol=1e-4, atol=1e-6)


def main() -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        check(rank, world)
        print(f"ok rank {rank}", flush=True)
        return 0
    finally:
        # Whatever still holds the process group or its work (DDP's reducer lives in reference
        # cycles) is freed here, while the interpreter is fully alive; then the group is destroyed,
        # which joins gloo's threads. Left to interpreter shutdown, that teardown can run C++
        # threads that need the GIL after finalization began.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())  # a failed check ends the process with its traceback, code 1
