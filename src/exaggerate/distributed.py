"""Training in several processes: torchrun, gloo on CPUs, NCCL on GPUs.

`explainer.processes: N` (N > 1) makes the train_explainer stage start itself N times under
`torch.distributed.run` on this machine; on several machines, start `torchrun ... -m exaggerate
stage train_explainer` on each (README). Every process draws the same global batch from the same
seeded stream and trains on its own contiguous share of it; batch-norm statistics are computed
over the global batch (SyncedBatchNorm2d) and gradients are averaged over the processes before
each optimiser step. One process with the same global batch and seeds therefore takes the same
steps, up to float rounding. Only rank 0 writes checkpoints, outputs and MLflow runs; every rank
resumes from the same checkpoint.

The GAN step averages gradients itself rather than through DistributedDataParallel: each
iteration calls G several times (the series, its cycle, the embeddings) and D both as the
network being trained and as a frozen critic of G, which DDP's reducer (one forward per backward
of a wrapped module, every parameter reduced) does not fit.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK), else one process."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group (NCCL for CUDA, gloo otherwise) and pick this rank's device."""
    import torch.distributed as dist

    w = world_from_env()
    if not w.distributed:
        return w, device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return w, device


def shard(x: torch.Tensor, w: World) -> torch.Tensor:
    """This rank's contiguous share of a global batch (the whole batch for one process)."""
    if not w.distributed:
        return x
    n = x.shape[0] // w.size
    return x[w.rank * n:(w.rank + 1) * n]


def average_gradients(params: Iterable[torch.nn.Parameter], w: World) -> None:
    """Mean of each gradient over the processes, in one flattened all-reduce."""
    if not w.distributed:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(w: World) -> None:
    if w.distributed:
        import torch.distributed as dist

        dist.barrier()


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across the processes
    (two autograd-aware all-reduces: the mean, then the squared deviations), on any backend,
    gloo on CPUs included. With one process, or in eval mode, it is nn.BatchNorm2d. Same
    parameters and buffers, so state dicts are interchangeable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = total[c]
        mean = total[:c] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.pow(2).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """Every nn.BatchNorm2d inside `module` made a SyncedBatchNorm2d in place (same tensors)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncedBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            synced.to(next(iter(child.buffers()), torch.empty(0)).device)
            setattr(module, name, synced)
        else:
            sync_batch_norm(child)
    return module


def launch(stage: str, processes: int, params_path: str = "params.yaml") -> None:
    """Run `exaggerate stage <stage>` in `processes` processes on this machine through torchrun;
    raises when any of them fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "exaggerate", "stage", stage, "--params", params_path]
    print(f"{stage}: {processes} processes: {' '.join(cmd[2:])}", flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        from .errors import ExaggerateError

        raise ExaggerateError(f"{stage} under torchrun ({processes} processes) failed with exit code {code}")

