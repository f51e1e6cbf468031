"""Scenarios run under ``torchrun`` (or in one process) by tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py SCENARIO OUT

Every rank writes ``OUT/<scenario>-rank<r>.pt`` (plain tensors and numbers, loaded with
``weights_only=True``): the trained weights and what the scenario observed.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pycompress  # noqa: E402


def data(n: int = 96, d: int = 12, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w).argmax(1)
    return TensorDataset(x, y)


def mlp(d: int = 12, h: int = 32, classes: int = 4, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, h), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(h, classes))
    return nn.Sequential(*layers)


def teacher():
    return mlp(h=48, seed=123)


def state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def scenario_equivalence(out: dict, ckpt: str) -> None:
    ds = data(n=100)  # 100 = 3 full batches of 32 + a last batch of 4
    student, hist = pycompress.distill(teacher(), mlp(), ds, epochs=2, batch_size=32,
                                       shuffle=False, seed=0, lr=1e-2, progress=False)
    out["distill"] = state(student)
    out["distill_loss"] = torch.tensor([h["loss"] for h in hist], dtype=torch.float64)
    # a last global batch of 3 samples: split 2/1 across two ranks
    shuffled, _ = pycompress.distill(teacher(), mlp(), data(n=99), epochs=2, batch_size=16,
                                     shuffle=True, seed=5, lr=1e-2, progress=False)
    out["distill_shuffle"] = state(shuffled)
    ft, fhist = pycompress.finetune(mlp(), ds, num_classes=4, freeze=None, epochs=2,
                                    batch_size=20, shuffle=True, seed=1, lr=1e-2,
                                    progress=False)
    out["finetune"] = state(ft)
    out["finetune_acc"] = torch.tensor([h["accuracy"] for h in fhist], dtype=torch.float64)
    out["keys"] = sorted(student.state_dict().keys())
    out["is_ddp"] = int(isinstance(student, nn.parallel.DistributedDataParallel))


def scenario_errors(out: dict, ckpt: str) -> None:
    errors = {}
    for name, kwargs in {"odd_batch": dict(ds=data(n=40), batch_size=5),
                         "tiny_data": dict(ds=data(n=1), batch_size=2)}.items():
        try:
            pycompress.distill(teacher(), mlp(), kwargs["ds"], epochs=1,
                               batch_size=kwargs["batch_size"], progress=False)
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)
    # one bad label, at sample 1: on rank 1 of 2 (shuffle=False), so rank 0 sees only good ones
    x, y = data(n=16).tensors
    y = y.clone()
    y[1] = 9
    try:
        pycompress.finetune(mlp(), TensorDataset(x, y), freeze=None, epochs=1, batch_size=8,
                            shuffle=False, progress=False)
        errors["bad_label"] = "no error"
    except ValueError as e:
        errors["bad_label"] = str(e)
    out["errors"] = errors


def scenario_pruning(out: dict, ckpt: str) -> None:
    student = mlp()
    masks_seen = []

    def record(module, args):
        masks = [b.detach().flatten().cpu() for _, b in module.named_buffers()
                 if b.dtype == torch.bool]
        masks_seen.append(torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool))

    student.register_forward_pre_hook(record)
    student, hist = pycompress.distill(
        teacher(), student, data(n=64), epochs=2, batch_size=16, shuffle=True, seed=3, lr=1e-2,
        pruning_schedule={"final_sparsity": 0.75}, progress=False)
    record(student, ())
    out["pruned"] = state(student)
    out["masks_seen"] = masks_seen
    out["sparsity"] = torch.tensor([h["sparsity"] for h in hist], dtype=torch.float64)


def scenario_resume(out: dict, ckpt: str) -> None:
    ds = data(n=64)
    kw = dict(epochs=3, batch_size=16, shuffle=True, seed=7, lr=1e-2, progress=False)
    full, _ = pycompress.distill(teacher(), mlp(dropout=0.2), ds, **kw)
    out["full"] = state(full)
    first, _ = pycompress.distill(teacher(), mlp(dropout=0.2), ds,
                                  **{**kw, "epochs": 1}, checkpoint_dir=ckpt)
    resumed, hist = pycompress.distill(teacher(), mlp(dropout=0.2), ds, **kw,
                                       checkpoint_dir=ckpt, resume=True)
    out["resumed"] = state(resumed)
    out["resumed_epochs"] = [h["epoch"] for h in hist]


def scenario_fsdp(out: dict, ckpt: str) -> None:
    """A teacher sharded with FSDP2 (fully_shard) gives the student of the unsharded teacher."""
    import torch.distributed as dist

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        out["skipped"] = "torch.distributed.fsdp.fully_shard is not available"
        return
    kw = dict(epochs=2, batch_size=16, shuffle=True, seed=2, lr=1e-2, progress=False)
    ds = data(n=66)  # a last global batch of 2 samples: one per rank
    plain, _ = pycompress.distill(teacher(), mlp(), ds, **kw)
    if not dist.is_initialized():
        out["skipped"] = "FSDP needs a process group"
        out["plain"] = state(plain)
        return
    sharded = teacher()
    for m in sharded:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(sharded)
    student, _ = pycompress.distill(sharded, mlp(), ds, **kw)
    out["plain"] = state(plain)
    out["fsdp"] = state(student)
    tiny, _ = pycompress.distill(sharded, mlp(), data(n=17), epochs=1, batch_size=16,
                                 shuffle=False, progress=False)  # last batch: rank 1 has none
    out["tiny_ok"] = 1


def scenario_usergroup(out: dict, ckpt: str) -> None:
    """A default group the caller initialized is used as it is and left alone afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    student, hist = pycompress.distill(teacher(), mlp(), data(n=40), epochs=1, batch_size=8,
                                       shuffle=False, progress=False)
    pycompress.distributed.shutdown()  # must not destroy a group it did not create
    out["still_initialized"] = int(dist.is_initialized())
    out["world"] = dist.get_world_size()
    out["student"] = state(student)
    dist.destroy_process_group()


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items()
             if name.startswith("scenario_")}


def main() -> int:
    names, outdir = sys.argv[1].split(","), sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    for name in names:
        out: dict = {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
        SCENARIOS[name](out, os.path.join(outdir, f"ckpt-{name}"))
        torch.save(out, os.path.join(outdir, f"{name}-rank{rank}.pt"))
    # Whatever still holds the process group (DDP reducers live in reference cycles) is freed
    # while the interpreter is fully alive, then the group is destroyed, joining gloo's threads:
    # left to interpreter shutdown, that teardown can run C++ threads after finalization began.
    gc.collect()
    pycompress.distributed.shutdown()
    import torch.distributed as dist

    out_flag = int(dist.is_available() and dist.is_initialized())
    with open(os.path.join(outdir, f"group-rank{rank}.txt"), "w") as f:
        f.write(str(out_flag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
