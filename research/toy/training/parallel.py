"""Data parallel training under ``torchrun``: the process group and the gradient average (through accelerate), replica
checks."""

from __future__ import annotations

import torch


def _data_parallel(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); under ``torchrun`` (``WORLD_SIZE`` > 1) accelerate's
    :class:`~accelerate.PartialState` joins the process group (NCCL on CUDA, gloo on the CPU) and gives each process
    its GPU (``cuda:LOCAL_RANK``)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    from accelerate import PartialState

    state = PartialState(cpu=torch.device(device).type != "cuda")
    return state.process_index, state.num_processes, state.device


def average_gradients(params: list[torch.nn.Parameter], stop: bool, world: int) -> bool:
    """Average the gradients over the data-parallel processes in one all-reduce (accelerate's ``reduce``); returns
    whether any process stops.

    The stop flag rides along with the gradients (as the last element of the flat buffer), so the processes agree
    on when to end a time-limited run without another synchronisation. (Not ``DistributedDataParallel`` nor
    ``Accelerator.prepare``: what is compiled and trained is a function of three modules, text encoders and UNet, and
    the stop flag has to travel with the step; run 8's speed, in BENCHMARKS.md, includes this one all-reduce a step.)
    """
    from accelerate.utils import reduce

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([float(stop)], device=grads[0].device)])
    flat = reduce(flat, reduction="mean")
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
    return bool(flat[-1] > 0)


def _broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's weights (and buffers) into every process's copy of ``module`` (in place)."""
    from accelerate.utils import broadcast

    broadcast(list(module.state_dict().values()), from_process=0)


def _replica_difference(params: list[torch.nn.Parameter]) -> float:
    """Largest difference between any process's weights and rank 0's (0.0 when the copies stayed equal)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)
