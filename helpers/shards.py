"""Sampling split over the processes of `accelerate launch` (or torchrun): each process samples every world-th
image and the images are gathered in order.

Every image has its own seed and generator (helpers.sample), so which process samples it does not change it
beyond float rounding: the gathered images equal one process's within uint8 rounding of the PNGs. Without a
launcher (or with one process) everything runs here, as before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shards:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Shards":
        """This process's place: from an initialised torch.distributed group, or the launcher's environment
        (which this then initialises through Accelerate: gloo on CPU, NCCL on GPUs)."""
        import torch.distributed as dist

        if not (dist.is_available() and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1)):
            return cls()
        if not dist.is_initialized():
            from accelerate import PartialState

            PartialState()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> list[int]:
        """The indices of n items this process takes: every world-th one, starting at its rank."""
        return list(range(self.rank, n, self.world))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """The main process's `obj` on every process (decisions that must agree, e.g. a measured cost)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, local: list, n: int) -> list:
        """Every process's `local` items (its share of n) back in the original order, on every process."""
        if self.world == 1:
            return list(local)
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, list(local))
        out = [None] * n
        for rank, part in enumerate(parts):
            for i, item in zip(range(rank, n, self.world), part):
                out[i] = item
        return out

    def sample(self, model, prompts: list[str], seeds: list[int], setting, *, batch_size: int) -> torch.Tensor:
        """helpers.sample.sample_images of all `prompts`, this process sampling its share; all images on each."""
        from .sample import sample_images

        if self.world == 1:
            return sample_images(model, prompts, seeds, setting, batch_size=batch_size)
        mine = self.share(len(prompts))
        local = sample_images(model, [prompts[i] for i in mine], [seeds[i] for i in mine], setting,
                              batch_size=batch_size) if mine else []
        return torch.stack(self.gather(list(local), len(prompts)))
