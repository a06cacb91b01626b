"""Mixed precision by the card, decided in one place: training, the fit measurement and sampling all ask here.

"auto" picks what the GPU computes natively:
- compute capability >= 8.0 (A100, A10, L4, H100, RTX 30xx/40xx): bf16. Its range is fp32's, so no loss scaling.
- 7.x (V100, T4, RTX 20xx): fp16 with loss scaling (Accelerate's GradScaler). These cards have no bf16 units:
  cuDNN has no bf16 convolutions below sm_80 and PyTorch's memory-efficient attention takes no bf16 there, so
  bf16 would be emulated and several times slower (a public T4 measurement: 4.3x).
- 6.x (P100, GTX 10xx): fp16 too, for its memory: no tensor cores, so expect little or no speed from it.
- a CPU: none (fp32).
An explicit "no", "fp16" or "bf16" is taken as asked, with a warning where the card emulates bf16.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

MODES = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    mode: str  # "no" | "bf16" | "fp16": what Accelerate's mixed_precision gets
    reason: str  # one line, printed where training or sampling starts

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)

    @property
    def loss_scaling(self) -> bool:
        return self.mode == "fp16"  # bf16 has fp32's exponent range: its gradients do not underflow

    def autocast(self, device):
        """The autocast of this precision on `device` (a no-op for "no")."""
        device = torch.device(device)
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def capability(device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`, None off CUDA (tests mock this)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def decide(requested: str, device) -> Precision:
    """The precision a run uses on `device` for the config's `mixed_precision` value."""
    if requested not in MODES:
        raise ValueError(f"mixed_precision={requested!r} is not one of {', '.join(MODES)}")
    cc = capability(device)
    if cc is None:
        kind = torch.device(device).type
        if requested == "bf16":  # CPU autocast does bf16 (slower here, but it shows a GPU run's memory)
            return Precision("bf16", f"bf16 autocast on {kind} as set")
        if requested == "fp16":
            return Precision("no", f"mixed_precision='fp16' needs a GPU (loss scaling): fp32 on {kind}")
        return Precision("no", f"fp32 on {kind} (mixed precision is for GPUs)")
    sm = f"sm_{cc[0]}{cc[1]}"
    if requested == "auto":
        if cc >= (8, 0):
            return Precision("bf16", f"bf16: {sm} computes bf16 natively (auto)")
        if cc >= (7, 0):
            return Precision("fp16", f"fp16 with loss scaling: {sm} has fp16 tensor cores but no bf16 units (auto)")
        return Precision("fp16", f"fp16 with loss scaling: {sm} has no tensor cores, so fp16 saves memory but brings "
                                 f"little or no speed (auto; mixed_precision='no' for fp32)")
    if requested == "bf16" and cc < (8, 0):
        return Precision("bf16", f"bf16 as set, but {sm} has no bf16 units: it is emulated and several times slower "
                                 f"than fp16 (mixed_precision='auto' picks fp16 here)")
    return Precision(requested, f"{'fp32' if requested == 'no' else requested} as set (mixed_precision={requested!r})")


MIN_LOSS_SCALE = 1.0  # below this, fp16 gradients overflow even unscaled: the run is diverging, not underflowing


class LossScaleWatch:
    """fp16's safeguards: the steps Accelerate's GradScaler skipped (overflowing gradients) are counted, and a loss
    scale that collapses below MIN_LOSS_SCALE stops the run. The weights stay fp32 (autocast), and a skipped step
    leaves them as they were, so the stop can write a resumable checkpoint."""

    def __init__(self, accelerator):
        self.accelerator, self.skipped = accelerator, 0

    @property
    def scale(self) -> float | None:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else None

    def after_step(self) -> None:
        if self.accelerator.scaler is not None and self.accelerator.optimizer_step_was_skipped:
            self.skipped += 1

    def problem(self, step: int) -> str | None:
        """One line when the loss scale has collapsed, else None."""
        scale = self.scale
        if scale is None or scale >= MIN_LOSS_SCALE:
            return None
        return (f"fp16 loss scale collapsed to {scale:g} by step {step} ({self.skipped} steps skipped for overflowing "
                f"gradients this session): stopped with a resumable checkpoint. Lower lr or max_grad_norm, or set "
                f"mixed_precision='no', then resume")
