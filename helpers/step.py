"""One training step's parts, shared by the loop (helpers.train) and the fit measurement (helpers.fit).

- Every random choice of a micro-step (flip, latent sample, caption, dropout, noise, timestep) comes from a
  generator seeded by (seed, step, micro-step, process): resume is exact by construction and processes draw
  different data. Data order is a seeded permutation per epoch.
- The whole cache lives on the device and is indexed there: no DataLoader, no VAE in the loop.
- A step's batch is drawn whole, then may be split for memory (`split_backward`): the same data for any split.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch

from .cache import LatentCache, read_split
from .config import RunConfig
from .diffusion import Objective
from .unet import build_unet


def step_generator(seed: int, *parts, device="cpu") -> torch.Generator:
    """A generator whose seed is a hash of (seed, *parts): the same step always draws the same numbers."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return g


def data_rows(rows: torch.Tensor, seed: int, start: int, count: int) -> torch.Tensor:
    """Items start..start+count of the endless stream 'one seeded permutation of `rows` per epoch'."""
    n = len(rows)
    positions = torch.arange(start, start + count)
    out = torch.empty(count, dtype=torch.int64)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=step_generator(seed, "epoch", epoch))
        sel = positions // n == epoch
        out[sel] = rows[perm[positions[sel] % n]]
    return out


def train_rows(cfg: RunConfig, cache: LatentCache) -> torch.Tensor:
    """Cache rows of the training monsters (split.json), decodable images only, max_images applied."""
    train_groups = set(read_split(cfg)["train"])
    rows = [i for i, g in enumerate(cache.groups) if g in train_groups and bool(cache.valid[i])]
    if cfg.max_images > 0:
        rows = rows[:cfg.max_images]
    if not rows:
        raise ValueError(f"No training images: the cache {cache.dir} has none of the train groups in "
                         f"{cfg.run_dir / 'split.json'}")
    return torch.tensor(rows, dtype=torch.int64)


@dataclass
class DeviceCache:
    """The latent cache on the training device, shaped for drawing batches."""

    mean: torch.Tensor  # [N, 2, C, h, w] fp16, index 1 = flipped
    std: torch.Tensor  # [N, 2, C, h, w] fp16
    caption_ids: torch.Tensor  # [N, K] rows of `embeddings` (padding clamped to 0, never picked)
    caption_counts: torch.Tensor  # [N] how many captions each image has (at least 1)
    embeddings: torch.Tensor  # [M, L, D] fp16, row 0 = ""

    @classmethod
    def from_cache(cls, cache: LatentCache, device) -> "DeviceCache":
        ids = cache.caption_ids
        return cls(cache.mean.to(device), cache.std.to(device), ids.clamp(min=0).to(device),
                   (ids >= 0).sum(1).clamp(min=1).to(device), cache.embeddings.to(device))

    def batch(self, rows: torch.Tensor, gen: torch.Generator, caption_dropout: float, offset_noise: float,
              objective: Objective, hflip: bool = False):
        """(x0, caption embeddings, eps, t) for `rows`, every draw from `gen`; `hflip`: mirrored at random;
        `objective` draws t (and may pair images with noise)."""
        dev, b = self.mean.device, len(rows)
        rows = rows.to(dev)
        flip = torch.randint(0, 2, (b,), generator=gen, device=dev) * hflip  # drawn either way: same stream after
        mean, std = self.mean[rows, flip].float(), self.std[rows, flip].float()
        x0 = mean + std * torch.randn(mean.shape, generator=gen, device=dev)  # a sample of the VAE's posterior
        counts = self.caption_counts[rows]
        pick = (torch.rand(b, generator=gen, device=dev) * counts).long().clamp(max=counts - 1)
        caption = self.caption_ids[rows, pick]
        dropped = torch.rand(b, generator=gen, device=dev) < caption_dropout  # -> "" (row 0): learns the CFG prior
        context = self.embeddings[torch.where(dropped, 0, caption)].float()
        eps = torch.randn(x0.shape, generator=gen, device=dev)
        offset = torch.randn(b, x0.shape[1], 1, 1, generator=gen, device=dev)
        eps = eps + offset_noise * offset  # offset noise lets the model shift whole-image brightness
        return x0, context, objective.pair_noise(x0, eps), objective.draw_t(b, gen, dev)


def unet_for_cache(cfg: RunConfig, cache: LatentCache):
    """A fresh U-Net whose input channels, size and context width are those of the cached latents and captions."""
    return build_unet(cfg.unet_preset, in_channels=cache.mean.shape[2], cross_attention_dim=cache.embeddings.shape[-1],
                      sample_size=cache.mean.shape[-1], seed=cfg.seed)


def adamw(unet, device, **options) -> torch.optim.AdamW:
    """The run's optimizer, as the loop and the fit measurement make it: AdamW, fused on a CPU too (one kernel for all
    parameters; the default loops over them: 22 ms a demo step against 5 ms)."""
    return torch.optim.AdamW(unet.parameters(), fused=torch.device(device).type in ("cuda", "cpu"), **options)


def loss_function(objective: Objective, forward):
    """loss_of(x0, context, eps, t): the run's loss of `forward` (the U-Net, maybe wrapped) on a chunk."""
    return lambda *chunk: objective.loss(forward, *chunk)


def split_backward(loss_of, batch: tuple, micro_splits: int, backward=torch.Tensor.backward,
                   no_sync=contextlib.nullcontext) -> torch.Tensor:
    """Forward + backward of `batch` (tensors sharing dim 0) in `micro_splits` chunks; returns its mean loss (detached).

    The batch is drawn whole before it is split, so the data stream is the same for any split. Each chunk's loss
    is weighted by its share of the batch, so the summed gradients are those of the whole batch's mean loss (up
    to float rounding); under DDP, gradients are synchronised only in the last chunk's backward."""
    chunks = list(zip(*(x.tensor_split(min(micro_splits, len(batch[0]))) for x in batch)))
    if len(chunks) == 1:  # unsplit: exactly the step as it always was
        loss = loss_of(*batch)
        backward(loss)
        return loss.detach().float()
    total = 0.0
    for i, chunk in enumerate(chunks):
        share = len(chunk[0]) / len(batch[0])
        with no_sync() if i < len(chunks) - 1 else contextlib.nullcontext():
            loss = loss_of(*chunk)
            backward(loss * share)
        total = total + loss.detach().float() * share
    return total
