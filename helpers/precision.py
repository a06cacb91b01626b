"""Mixed precision by the card, decided in one place: training, the fit measurement and sampling all ask here,
saying which use they decide for (`use="train"` or `"sample"`).

"auto" picks what the GPU computes natively, the same for both uses:
- compute capability >= 8.0 (A100, A10, L4, H100, RTX 30xx/40xx): bf16. Its range is fp32's, so no loss scaling.
- 7.x (V100, T4, RTX 20xx): fp16 with loss scaling (Accelerate's GradScaler). These cards have no bf16 units:
  cuDNN has no bf16 convolutions below sm_80 and PyTorch's memory-efficient attention takes no bf16 there, so
  bf16 would be emulated and several times slower (a public T4 measurement: 4.3x).
- 6.x (P100, GTX 10xx): fp16 too, for its memory: no tensor cores, so expect little or no speed from it.
On a CPU "auto" depends on the use (benchmarks/bench_cpu.py, the demo's U-Net):
- a CPU that computes bf16 natively (AMX or AVX512-BF16, `cpu_native_bf16`): bf16 autocast for sampling
  (1.79x fp32's images/s on a Xeon with AMX, 1.41x on an AMD host; the demo's scores held over 3 training seeds,
  benchmarks/RESULTS.md "CPU speed levers"), fp32 for training (bf16 training measured 0.74x fp32's images/s on
  that Xeon).
- any other CPU: fp32 for both (bf16 would be emulated).
- another device (e.g. MPS): fp32.
An explicit "no", "fp16" or "bf16" is taken as asked, for both uses, with a warning where the card emulates bf16
("fp16" on a CPU is fp32: loss scaling needs a GPU).
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


# the CPU features that compute bf16 natively, by the names torch's cpuinfo and Linux's /proc/cpuinfo give them
NATIVE_BF16 = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}
SAMPLE_SPEEDUP, TRAIN_SPEEDUP = 1.79, 0.74  # bf16 autocast / fp32 on a Xeon with AMX (benchmarks/bench_cpu.py)


def cpu_native_bf16() -> str | None:
    """"AMX" or "AVX512-BF16": how this CPU computes bf16 natively, None where it would be emulated (tests mock this).

    Asks torch's cpuinfo (what its oneDNN kernels dispatch on), else the kernel's /proc/cpuinfo flags."""
    try:
        flags = {k for k, v in torch._C._cpu._get_cpu_capability().items() if v is True}
    except (AttributeError, RuntimeError):  # a private API: a torch without it reads the flags itself
        flags = _proc_cpuinfo_flags()
    return next((name for flag, name in NATIVE_BF16.items() if flag in flags), None)


def _proc_cpuinfo_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:  # not Linux: no flags known, so no native bf16 claimed
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


USES = ("train", "sample")


def decide(requested: str, device, use: str = "train") -> Precision:
    """The precision a run uses on `device` for the config's `mixed_precision` value, for training (and the fit
    measurement) or sampling: `use` is "train" or "sample" (they differ only for "auto" on a CPU)."""
    if requested not in MODES:
        raise ValueError(f"mixed_precision={requested!r} is not one of {', '.join(MODES)}")
    if use not in USES:
        raise ValueError(f"use={use!r} is not one of {', '.join(USES)}")
    cc = capability(device)
    if cc is None:
        return _off_cuda(requested, torch.device(device).type, use)
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


def _off_cuda(requested: str, kind: str, use: str) -> Precision:
    if requested == "bf16":  # CPU autocast does bf16 (it shows a GPU run's memory, whatever its speed here)
        return Precision("bf16", f"bf16 autocast on {kind} as set")
    if requested == "fp16":
        return Precision("no", f"mixed_precision='fp16' needs a GPU (loss scaling): fp32 on {kind}")
    if requested == "no":
        return Precision("no", f"fp32 on {kind} as set (mixed_precision='no')")
    if kind != "cpu":
        return Precision("no", f"fp32 on {kind} (mixed precision is for CUDA GPUs and CPUs with native bf16)")
    return _auto_on_cpu(use)


def _auto_on_cpu(use: str) -> Precision:
    native = cpu_native_bf16()
    if native is None:
        return Precision("no", "fp32: this CPU has no native bf16 (no AMX or AVX512-BF16), so bf16 would be "
                               "emulated (auto)")
    if use == "sample":
        return Precision("bf16", f"bf16 autocast for sampling: this CPU computes bf16 natively ({native}; measured "
                                 f"{SAMPLE_SPEEDUP}x fp32's images/s on a Xeon with AMX, the demo's scores unchanged "
                                 f"over 3 training seeds); training stays fp32 (bf16 training measured "
                                 f"{TRAIN_SPEEDUP}x) (auto; mixed_precision='no' for fp32)")
    return Precision("no", f"fp32 for training: bf16 training measured {TRAIN_SPEEDUP}x fp32's speed on a CPU with "
                           f"native bf16 ({native}) (auto)")


_reported: set[tuple[str, str]] = set()


def report_once(precision: Precision, what: str) -> None:
    """Print "<what>: <reason>" the first time this process starts `what` with this precision: sampling runs once per
    preview, sweep cell or panel row, and one line says what they all use."""
    if (what, precision.reason) not in _reported:
        _reported.add((what, precision.reason))
        print(f"{what}: {precision.reason}")


MIN_LOSS_SCALE = 1.0  # below this, fp16 gradients overflow even unscaled: the run is diverging, not underflowing


class LossScaleWatch:
    """fp16's safeguards: the steps Accelerate's GradScaler skipped (overflowing gradients) are counted, and a loss
    scale that collapses below MIN_LOSS_SCALE stops the run. The weights stay fp32 (autocast), and a skipped step
    leaves them as they were, so the stop can write a resumable checkpoint."""

    def __init__(self, accelerator):
        self.accelerator, self.skipped = accelerator, 0
        self.last = self.scale

    @property
    def scale(self) -> float | None:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else None

    def after_step(self) -> None:
        """Count the step if GradScaler skipped it: it lowers the scale (x backoff_factor) on exactly those steps.
        Not Accelerate's optimizer_step_was_skipped: with a fused optimizer GradScaler always calls step() (the
        kernel itself skips on overflow), so that flag never comes up."""
        now = self.scale
        if now is not None and self.last is not None and now < self.last:
            self.skipped += 1
        self.last = now

    def problem(self, step: int) -> str | None:
        """One line when the loss scale has collapsed, else None."""
        scale = self.scale
        if scale is None or scale >= MIN_LOSS_SCALE:
            return None
        return (f"fp16 loss scale collapsed to {scale:g} by step {step} ({self.skipped} steps skipped for overflowing "
                f"gradients this session): stopped with a resumable checkpoint. Lower lr or max_grad_norm, or set "
                f"mixed_precision='no', then resume")
