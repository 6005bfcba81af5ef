"""The process-group view the trainer and policies need (``torchrun``), and a no-op single-process default.

Semantics under DDP: a policy's batch size is the *global* batch. Every rank draws the same global indices from
the same seeded permutation and augments the whole global batch with the same generator, then works on its
share (:meth:`Dist.share`, contiguous, sizes as ``tensor_split``). Losses are normalised by the global number of
samples in a step and DDP averages gradients, so a step equals the single-process step on the global batch
(BatchNorm aside: use ``--sync-bn`` for global batch statistics).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dynbatch.errors import UserError


class Dist:
    """Rank, world size and the few collectives dynbatch uses. World size 1 makes every collective a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def rank_from_env() -> int:
        """This process's rank as torchrun announces it (0 outside torchrun), before any process group exists."""
        return int(os.environ.get("RANK", "0"))

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run without torchrun")
        if not dist.is_initialized():
            # Each torchrun restart attempt gets keys of its own: a rerun worker must never read the connection
            # address a dead worker of the previous attempt left in the agent's store (seen here as gloo's
            # "Connection refused" after --max-restarts brought the job back).
            store, rank, size = next(dist.rendezvous("env://"))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=size,
                                    store=dist.PrefixStore(f"dynbatch/attempt{attempt}", store))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def shares(self, n: int) -> list[int]:
        """Sizes of every rank's share of n items (the first ``n % world`` ranks get one more)."""
        return [n // self.world + (r < n % self.world) for r in range(self.world)]

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items."""
        sizes = self.shares(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``t``'s rows; ``t`` itself in one process (no slicing op per step)."""
        return t[self.share(t.shape[0])] if self.enabled else t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows (ranks may hold different numbers) in rank order."""
        if not self.enabled:
            return t
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        pad = torch.zeros((max(sizes) - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        parts = [torch.empty((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in range(self.world)]
        dist.all_gather(parts, torch.cat([t, pad]).contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (used to stop all ranks at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def close(self, all_ranks_here: bool = False) -> None:
        """Leave the process group. With ``all_ranks_here`` (every rank left training at the same step) it first
        waits for every rank, so that the ranks tear their connections down together. Without it, once in about 100
        two-rank CPU runs, rank 1, which leaves first while rank 0 still writes the run's files, aborted at exit in
        gloo ("terminate called without an active exception"). After an error a peer may never arrive, so then it
        leaves at once."""
        if self.enabled and dist.is_initialized():
            if all_ranks_here:
                dist.barrier()
            dist.destroy_process_group()


SINGLE = Dist()
