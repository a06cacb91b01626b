"""Post-hoc EMA: choose the length of the weight average after training (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", EDM2, Sec. 3 and App. C).

A power-function EMA at training time t (counted in images) averages the weights theta(tau) seen so far with the
profile
    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)      for 0 <= tau <= t, 0 after t,
whose width relative to t is
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))     (a length that grows with training).
Tracked step by step, a step of n images ending at t uses beta = (1 - n / t)^(gamma + 1): the discrete average then
gives step k's weights exactly the integral of p over that step, so it is the profile above with piecewise
constant weights, and it needs no warm-up (the first step has beta = 0).

Training keeps a few such profiles (sigma_rel 0.05 and 0.10, EDM2's default) and stores them now and then. Any
other profile (t_r, sigma_r) is then approximated as a combination sum_i x_i p_i of the stored ones, x solving the
least-squares problem  min_x || p_r - sum_i x_i p_i ||^2  in L2 over tau: the normal equations A x = b with
A_ij = <p_i, p_j>, b_i = <p_i, p_r>, where for t_a <= t_b
    <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_b) * (t_a / t_b)^gamma_b.
x is rescaled to sum to 1 (an average of weights stays an average), and the reconstructed weights are
sum_i x_i theta_i. Only stored profiles with t_i <= t_r take part. The fit is exact when p_r is one of the stored
profiles; otherwise its error is the residual of the least squares, which `profile_error` reports: denser
snapshots leave a smaller one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .setting import MAX_SIGMA_REL  # the width at gamma = 0 (a plain running mean); wider needs gamma < 0

DEFAULT_SIGMA_RELS = (0.05, 0.10)
FILE_PREFIX = "phema-"  # <run>/phema/step-NNNNNN/phema-0.050.safetensors


# ---------------------------------------------------------------- the profile's two parametrisations


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power profile with exponent gamma."""
    gamma = float(gamma)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width sigma_rel (0 < sigma_rel < 0.2887 = the width at
    gamma = 0): the largest real root of (gamma + 2)^2 (gamma + 3) sigma_rel^2 = gamma + 1, i.e. of the cubic
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) with s = sigma_rel^-2."""
    sigma_rel = float(sigma_rel)
    if not (math.isfinite(sigma_rel) and 0 < sigma_rel < MAX_SIGMA_REL):
        raise ValueError(f"sigma_rel {sigma_rel!r} is not a power-function EMA length: expected a number in "
                         f"(0, {MAX_SIGMA_REL:.4f}) (gamma > 0)")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(gamma: float, images_after: float, images_step: float) -> float:
    """The decay of one tracking step of `images_step` images that ends at `images_after` images seen."""
    return (1.0 - images_step / images_after) ** (gamma + 1.0)


# ---------------------------------------------------------------- tracking during training


class PowerEMA:
    """Power-function EMAs of a model's weights, one per sigma_rel, in fp32 (what checkpoints store for exact
    resume). `update(model, images)` after every optimizer step of `images` images."""

    def __init__(self, model: torch.nn.Module, sigma_rels=DEFAULT_SIGMA_RELS):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.names = [name for name, _ in model.named_parameters()]
        self.profiles = [[p.detach().clone().float() for p in model.parameters()] for _ in self.sigma_rels]
        self.images_seen = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, images: int) -> None:
        self.images_seen += images
        weights = [p.detach().float() for p in model.parameters()]
        for gamma, profile in zip(self.gammas, self.profiles):
            torch._foreach_lerp_(profile, weights, 1.0 - power_beta(gamma, self.images_seen, images))

    @torch.no_grad()
    def restart(self, model: torch.nn.Module, images_seen: int) -> None:
        """Every profile := the model's weights, with `images_seen` images counted as already averaged."""
        for profile in self.profiles:
            torch._foreach_copy_(profile, [p.detach().float() for p in model.parameters()])
        self.images_seen = int(images_seen)

    def weights(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """The tracked average of length `sigma_rel` by parameter name (fp32, shared: do not modify)."""
        return dict(zip(self.names, self.profiles[self._index(sigma_rel)]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat, for safetensors: '<sigma_rel>/<parameter>' per profile, plus 'images_seen'."""
        state = {f"{key(s)}/{n}": w for s, profile in zip(self.sigma_rels, self.profiles)
                 for n, w in zip(self.names, profile)}
        return {**state, "images_seen": torch.tensor(self.images_seen, dtype=torch.int64)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [key(s) for s in self.sigma_rels if f"{key(s)}/{self.names[0]}" not in state]
        if missing:
            have = sorted({k.split("/")[0] for k in state if "/" in k})
            raise ValueError(f"the saved post-hoc EMA state has no profile sigma_rel {', '.join(missing)} "
                             f"(it has {', '.join(have) or 'none'})")
        for s, profile in zip(self.sigma_rels, self.profiles):
            for n, w in zip(self.names, profile):
                w.copy_(state[f"{key(s)}/{n}"])
        self.images_seen = int(state["images_seen"])

    def save(self, folder: str | Path, step: int, dtype: torch.dtype = torch.float16) -> list[Path]:
        """Store every profile in `folder` as `dtype`, with step, images and sigma_rel as metadata.

        fp16 is EDM2's choice (half of fp32's size). Its rounding (at most 2^-11 relative, ~2.8e-4 RMS) enters the
        reconstruction times sum |x_i|, so it matters when EMA lengths differ little relative to the weights: in
        tests/test_phema.py's 40-step tiny U-Net (lengths 0.05 and 0.10 differ by 0.2 % of the weights' norm) it is
        8 % of that difference against 0.4 % for fp32; in the demo at 900 steps they differ by 0.31 %, so fp16 adds
        noise of roughly a tenth of the step between those two lengths (dtype=torch.float32 doubles the size)."""
        from safetensors.torch import save_file

        folder, out = Path(folder), []
        folder.mkdir(parents=True, exist_ok=True)
        for s, profile in zip(self.sigma_rels, self.profiles):
            path = folder / f"{FILE_PREFIX}{key(s)}.safetensors"
            tensors = {n: w.detach().to("cpu", dtype).contiguous() for n, w in zip(self.names, profile)}
            save_file(tensors, str(path), metadata={"sigma_rel": repr(s), "images": str(self.images_seen),
                                                    "step": str(int(step))})
            out.append(path)
        return out

    def store(self, root: str | Path, step: int, dtype: torch.dtype = torch.float16) -> Path:
        """`save` into root/step-NNNNNN/ atomically (a temp folder renamed into place), replacing an older one."""
        import shutil

        name = f"step-{int(step):06d}"
        final, tmp = Path(root) / name, Path(root) / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save(tmp, step, dtype)
        if final.exists():  # this run trained the step again (resumed from an earlier checkpoint)
            shutil.rmtree(final)
        tmp.rename(final)
        return final

    def _index(self, sigma_rel: float) -> int:
        for i, s in enumerate(self.sigma_rels):
            if math.isclose(s, sigma_rel, rel_tol=1e-9):
                return i
        raise KeyError(f"no tracked profile sigma_rel {sigma_rel} (tracked: {self.sigma_rels})")


def key(sigma_rel: float) -> str:
    return f"{float(sigma_rel):.3f}"


# ---------------------------------------------------------------- reconstruction after training


def profile_inner_products(t_a, sigma_a, t_b, sigma_b) -> np.ndarray:
    """<p_a, p_b> for every pair (rows a, columns b), in float64."""
    g_a = np.array([sigma_rel_to_gamma(s) for s in np.ravel(sigma_a)]).reshape(-1, 1)
    g_b = np.array([sigma_rel_to_gamma(s) for s in np.ravel(sigma_b)]).reshape(1, -1)
    t_a = np.asarray(t_a, np.float64).reshape(-1, 1)
    t_b = np.asarray(t_b, np.float64).reshape(1, -1)
    t_lo, t_hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_hi = np.where(t_a <= t_b, g_b, g_a)  # the exponent of the profile that ends later
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def posthoc_coefficients(stored_t, stored_sigma, t: float, sigma_rel: float) -> np.ndarray:
    """x with sum_i x_i p_i ~ p_{t, sigma_rel} in least squares, rescaled to sum to 1."""
    a = profile_inner_products(stored_t, stored_sigma, stored_t, stored_sigma)
    b = profile_inner_products(stored_t, stored_sigma, [t], [sigma_rel])[:, 0]
    x = np.linalg.lstsq(a, b, rcond=None)[0]  # lstsq: the same answer as solve, and no error if A is singular
    return x / x.sum()


def profile_error(stored_t, stored_sigma, t: float, sigma_rel: float) -> float:
    """|| p_r - sum_i x_i p_i || / || p_r ||: how far the reconstructed average's profile is from the one asked for
    (0 = exact)."""
    x = posthoc_coefficients(stored_t, stored_sigma, t, sigma_rel)
    a = profile_inner_products(stored_t, stored_sigma, stored_t, stored_sigma)
    b = profile_inner_products(stored_t, stored_sigma, [t], [sigma_rel])[:, 0]
    rr = profile_inner_products([t], [sigma_rel], [t], [sigma_rel])[0, 0]
    return float(math.sqrt(max(rr - 2 * x @ b + x @ a @ x, 0.0) / rr))


@dataclass(frozen=True)
class StoredProfile:
    path: Path
    step: int
    images: int
    sigma_rel: float


def stored_profiles(root: str | Path) -> list[StoredProfile]:
    """Every profile stored under `root` (<run>/phema/step-NNNNNN/phema-*.safetensors), by time then length."""
    from safetensors import safe_open

    found = []
    for path in sorted(Path(root).glob(f"step-*/{FILE_PREFIX}*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            found.append(StoredProfile(path, int(meta["step"]), int(meta["images"]), float(meta["sigma_rel"])))
        except Exception as e:  # a damaged or foreign file must not pass for a profile
            raise ValueError(f"{path}: not a stored post-hoc EMA profile ({type(e).__name__}: {e})") from None
    return sorted(found, key=lambda p: (p.images, p.sigma_rel))


def reconstruct(stored: list[StoredProfile], sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The weights (fp32, by parameter name) of the EMA of length `sigma_rel` at training step `step` (None: the
    last stored one), from the stored profiles of steps <= step."""
    from safetensors.torch import load_file

    last_step = max((p.step for p in stored), default=0)
    step = last_step if step is None else int(step)
    usable = [p for p in stored if p.step <= step]
    if not usable:
        raise ValueError(f"no stored post-hoc EMA profile at or before step {step} to reconstruct sigma_rel "
                         f"{sigma_rel} from (train with phema_sigma_rels set, e.g. [0.05, 0.1])")
    last = max(usable, key=lambda p: p.step)
    target = last.images * step / last.step  # images seen at `step`, at the stored profiles' images per step
    x = posthoc_coefficients([p.images for p in usable], [p.sigma_rel for p in usable], target, sigma_rel)
    out: dict[str, torch.Tensor] = {}
    for coefficient, profile in zip(x, usable):
        if coefficient == 0.0:
            continue
        for name, w in load_file(str(profile.path)).items():
            term = w.float() * float(coefficient)
            out[name] = out[name].add_(term) if name in out else term
    return out


# ---------------------------------------------------------------- a training run's post-hoc EMA bookkeeping


def phema_every(cfg) -> int:
    """How often the post-hoc EMA profiles are stored (besides snapshots and max_steps): phema_every, 0 = at each
    snapshot."""
    return cfg.phema_every or cfg.snapshot_every


def stores_phema(cfg, done: int) -> bool:
    """Whether step `done` stores the profiles: at max_steps, at every snapshot (so each snapshot's own EMA lengths
    can be rebuilt exactly at its step), and every phema_every steps."""
    if not cfg.phema_sigma_rels:
        return False
    every, snapshot = phema_every(cfg), cfg.snapshot_every
    return (done == cfg.max_steps or (every > 0 and done % every == 0)
            or (snapshot > 0 and done % snapshot == 0))


def resume_phema(phema, unet, state: dict, images_seen: int, verbose: bool) -> None:
    """Restore the post-hoc EMA profiles from a checkpoint's state. A checkpoint without the lengths asked for
    (written with phema off, or other phema_sigma_rels) restarts them from the resumed weights, as if the weights
    had been these since step 0, and says so."""
    if phema is None:
        return
    try:
        if state.get("phema") is None:
            raise ValueError("the checkpoint has none")
        phema.load_state_dict(state["phema"])
    except ValueError as e:
        phema.restart(unet, images_seen)
        if verbose:
            print(f"Post-hoc EMA profiles {phema.sigma_rels} start at this step ({e}): they count the steps before "
                  f"it as if the weights had been the resumed ones")
