"""Data parallelism over ``torch.distributed``: every rank holds the model, decodes its own shard of the prompts,
and the outputs are gathered in the original order, so that accuracy and summed counters are exactly those of one
process (``torchrun --nproc-per-node N -m s2d2 eval ...``; across machines with torchrun's rendezvous flags).

Shards are contiguous (rank r decodes prompts ``[r*n//W, (r+1)*n//W)``) and a seeded config is shifted by the
shard's start, so row ``i`` draws from ``seed + i`` wherever it runs: sampled outputs do not depend on the number of
processes either. Times are the slowest rank's (the job ends when it does).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from s2d2.config import DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.errors import ConfigError

if TYPE_CHECKING:
    from s2d2.api import Generation, Model

__all__ = ["DataParallel", "shard_bounds"]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice ``[start, end)`` of ``n`` items that ``rank`` of ``world_size`` takes."""
    return rank * n // world_size, (rank + 1) * n // world_size


@dataclass
class DataParallel:
    """This process's place in a data-parallel job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> DataParallel:
        """Join the job torchrun (or any launcher setting ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
        variables) started, on the gloo backend for CPU and NCCL for CUDA; a single process when ``WORLD_SIZE`` is
        unset or 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda")
        if cuda:
            if not torch.cuda.is_available():
                raise ConfigError(f"device {device!r} was requested but no CUDA device is available.")
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
        return cls(rank, world_size, local_rank)

    @classmethod
    def joined(cls) -> DataParallel:
        """The job this process already belongs to (a single process when no group was set up)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        """Whether this process writes the results (rank 0)."""
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this rank decodes on: ``cuda`` (or ``cuda:k``) becomes this rank's own GPU."""
        return f"cuda:{self.local_rank}" if requested.startswith("cuda") and self.world_size > 1 else requested

    def generate(self, model: Model, prompts: Sequence[Any], cfg: DecodeConfig, batch_size: int | str,
                 progress: bool | str = False) -> list[Generation]:
        """``model.generate(prompts, cfg, batch_size)`` split across the ranks; every rank gets all outputs, in order.
        ``progress``: the main rank shows a bar of its own prompts (as ``Model.generate``)."""
        if self.world_size == 1:
            return model.generate(list(prompts), cfg, batch_size=batch_size, progress=progress)
        start, end = shard_bounds(len(prompts), self.rank, self.world_size)
        mine: list[Generation] = []
        times = (0.0, 0.0)
        if end > start:
            shard_cfg = cfg.replace(seed=cfg.seed + start) if cfg.seed is not None else cfg
            mine = model.generate(list(prompts[start:end]), shard_cfg, batch_size=batch_size,
                                  progress=progress if self.is_main else False)
            stats = model.last_batch_stats
            times = (stats.time_s, stats.forward_time_s) if stats is not None else (0.0, 0.0)
        parts = self._all_gather((mine, times))
        self._wall, self._forward = max(t for _, t in parts)  # the slowest rank's wall and forward time
        return [g for part, _ in parts for g in part]

    def summed_stats(self, model: Model, generations: Sequence[Generation]) -> DecodeStats:
        """:meth:`Model.summed_stats` of the last :meth:`generate`: counters summed over every prompt, the wall and
        forward times the slowest rank's (so tokens/s is the job's throughput)."""
        if self.world_size == 1:
            return model.summed_stats(generations)
        total = DecodeStats.total([g.stats for g in generations])
        total.time_s, total.forward_time_s = self._wall, self._forward
        return total

    def barrier(self) -> None:
        """Wait for every rank (so that rank 0's output comes after every rank's work)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Leave the job at the end of a ``with`` block, without waiting for the others after a failure."""
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Leave the job: wait for every rank, then tear the group down. After a failure (``failed``) nothing
        waits: this process exits with an error and the launcher stops the other ranks."""
        if self.world_size > 1 and not failed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()  # no rank tears the group down while another still talks to it
                dist.destroy_process_group()

    def _all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
