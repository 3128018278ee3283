"""Which process does which item: deterministic sharding by item index.

Item ``i`` belongs to shard ``i % num_shards``. The shard comes from, in this order:

1. ``--shard-index K --num-shards N`` (clusters that schedule processes themselves: no communication between them);
2. ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``): Accelerate's :class:`~accelerate.PartialState` gives the
   rank, the world size and this process's device, and a barrier lets rank 0 merge the manifests at the end;
3. otherwise one process does everything.

Every image has its own generator seeded from its (prompt, image) seed, so an image never depends on which process
made it or on how many there were.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from detailpp.bench import BenchError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's share of the items, plus how to wait for the others (``barrier``) when they can be reached."""

    index: int = 0
    count: int = 1
    device: str | None = None
    barrier: Callable[[], None] | None = None
    launcher: str = "single"

    def __post_init__(self) -> None:
        if self.count < 1:
            raise BenchError(f"--num-shards must be at least 1, got {self.count}.")
        if not 0 <= self.index < self.count:
            raise BenchError(
                f"--shard-index must be between 0 and {self.count - 1} for {self.count} shard(s), got {self.index}."
            )

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def owns(self, item: int) -> bool:
        return item % self.count == self.index

    def wait(self) -> None:
        """Wait for every process (a no-op without a launcher: shards scheduled apart cannot wait for each other)."""
        if self.barrier is not None:
            self.barrier()


def _same_device(asked: str, assigned: str) -> bool:
    """``cuda`` (no index) is satisfied by ``cuda:1``; ``cpu`` by ``cpu:0``."""
    import torch

    try:
        a, b = torch.device(asked), torch.device(assigned)
    except (RuntimeError, TypeError):
        return asked == assigned
    return a.type == b.type and (a.index is None or a.index == b.index)


def resolve_shard(shard_index: int | None = None, num_shards: int | None = None, device: str | None = None) -> Shard:
    """The shard of this process (see the module's docstring); ``device`` is kept unless a launcher assigns one."""
    if shard_index is not None or num_shards is not None:
        if shard_index is None or num_shards is None:
            raise BenchError("Give both --shard-index and --num-shards (e.g. --shard-index 0 --num-shards 4).")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise BenchError(
                "--shard-index/--num-shards cannot be combined with torchrun/accelerate launch, which "
                "shard by themselves; drop one of the two."
            )
        return Shard(shard_index, num_shards, device, None, "manual")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            from accelerate import PartialState
        except ImportError as e:  # pragma: no cover - accelerate is a dependency
            raise BenchError("Running under torchrun/accelerate needs the `accelerate` package.") from e
        import torch

        cpu = device == "cpu" or not torch.cuda.is_available()  # Accelerate sets up gloo on CPU only when told
        state = PartialState(cpu=cpu)
        world = int(os.environ["WORLD_SIZE"])
        if state.num_processes != world:
            raise BenchError(
                f"The launcher started {world} processes but Accelerate sees {state.num_processes}; "
                "launch with torchrun or accelerate launch, or use --shard-index/--num-shards."
            )
        assigned = str(state.device)
        if device is not None and not _same_device(device, assigned):
            logger.warning(
                "--device %s ignored: the launcher gave rank %d the device %s.", device, state.process_index, assigned
            )
        return Shard(state.process_index, state.num_processes, assigned, state.wait_for_everyone, "distributed")
    return Shard(0, 1, device, None, "single")
