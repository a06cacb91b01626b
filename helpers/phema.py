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
profiles; otherwise its error is the residual of the least squares, which `posthoc_fit` reports: denser
snapshots leave a smaller one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import snapshot_at
from .setting import MAX_SIGMA_REL  # the width at gamma = 0 (a plain running mean); wider needs gamma < 0

DEFAULT_SIGMA_RELS = (0.05, 0.10)
FILE_PREFIX = "phema-"  # <run>/phema/step-NNNNNN/phema-0.050.safetensors


# ---------------------------------------------------------------- the profile's two parametrisations


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2
    (gamma + 3))) (0 < sigma_rel < 0.2887 = the width at gamma = 0): the largest real root of (gamma + 2)^2 (gamma + 3) sigma_rel^2 = gamma + 1, i.e. of the cubic
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

    def store(self, root: str | Path, step: int, dtype: torch.dtype = torch.float16) -> Path:
        """Every profile into root/step-NNNNNN/ as `dtype`, atomically (a temp folder renamed into place), replacing
        an older one; step, images and sigma_rel as metadata.

        fp16 is EDM2's choice (half of fp32's size). Its rounding (at most 2^-11 relative, ~2.8e-4 RMS) enters the
        reconstruction times sum |x_i|, so it matters when EMA lengths differ little relative to the weights: in
        tests/test_phema.py's 40-step tiny U-Net (lengths 0.05 and 0.10 differ by 0.2 % of the weights' norm) it is
        8 % of that difference against 0.4 % for fp32; in the demo at 900 steps they differ by 0.31 %, so fp16 adds
        noise of roughly a tenth of the step between those two lengths (dtype=torch.float32 doubles the size)."""
        return store_profiles(root, step, self.images_seen, self._by_length(), dtype)

    def _by_length(self) -> dict[float, dict[str, torch.Tensor]]:
        return {s: dict(zip(self.names, profile)) for s, profile in zip(self.sigma_rels, self.profiles)}

    def _index(self, sigma_rel: float) -> int:
        for i, s in enumerate(self.sigma_rels):
            if math.isclose(s, sigma_rel, rel_tol=1e-9):
                return i
        raise KeyError(f"no tracked profile sigma_rel {sigma_rel} (tracked: {self.sigma_rels})")


def key(sigma_rel: float) -> str:
    return f"{float(sigma_rel):.3f}"


def save_profiles(folder: str | Path, step: int, images: int, profiles: dict, dtype=torch.float16) -> list[Path]:
    """Write `profiles` ({sigma_rel: {parameter: weights}}) to folder/phema-<sigma_rel>.safetensors as `dtype`, with
    step, images and sigma_rel as metadata (what `stored_profiles` checks against the file's place)."""
    from safetensors.torch import save_file

    folder, out = Path(folder), []
    folder.mkdir(parents=True, exist_ok=True)
    for s, weights in profiles.items():
        path = folder / f"{FILE_PREFIX}{key(s)}.safetensors"
        tensors = {n: w.detach().to("cpu", dtype).contiguous() for n, w in weights.items()}
        save_file(tensors, str(path), metadata={"sigma_rel": repr(float(s)), "images": str(int(images)),
                                                "step": str(int(step))})
        out.append(path)
    return out


def store_profiles(root: str | Path, step: int, images: int, profiles: dict, dtype=torch.float16) -> Path:
    """`save_profiles` into root/step-NNNNNN/ atomically (a temp folder renamed into place), replacing an older one."""
    import shutil

    final, tmp = Path(root) / store_name(step), Path(root) / f".tmp-{store_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_profiles(tmp, step, images, profiles, dtype)
    if final.exists():  # this run trained the step again (resumed from an earlier checkpoint)
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def store_state(root: str | Path, step: int, state: dict[str, torch.Tensor], sigma_rels=()) -> Path:
    """The store of step `step` written from a checkpoint's post-hoc EMA state (PowerEMA.state_dict): what a resume
    rewrites when the store itself was cut off (helpers.repair). `sigma_rels`: the lengths tracked (the config's
    phema_ema_lengths), whose exact values the state's keys round to 3 decimals."""
    exact = {key(s): float(s) for s in sigma_rels}
    profiles: dict[float, dict[str, torch.Tensor]] = {}
    for name, w in state.items():
        length, sep, parameter = name.partition("/")
        if sep:
            profiles.setdefault(exact.get(length, float(length)), {})[parameter] = w
    if not profiles or "images_seen" not in state:
        raise ValueError("the checkpoint's post-hoc EMA state holds no profiles")
    return store_profiles(root, step, int(state["images_seen"]), profiles)


def store_name(step: int) -> str:
    return f"step-{int(step):06d}"


def stores_at(step: int, max_steps: int, snapshot_every: int, phema_every: int) -> bool:
    """Whether training step `step` stores the post-hoc EMA profiles: with every snapshot (every snapshot_every
    steps and at max_steps), so each snapshot's own EMA lengths rebuild exactly, and every phema_every steps
    besides (0: no others), which makes the fit of other lengths closer."""
    return snapshot_at(step, max_steps, snapshot_every) or (phema_every > 0 and step % phema_every == 0)


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


def posthoc_fit(stored_t, stored_sigma, t: float, sigma_rel: float) -> tuple[np.ndarray, float]:
    """(x, error): x with sum_i x_i p_i ~ p_{t, sigma_rel} in least squares, rescaled to sum to 1, and
    || p_r - sum_i x_i p_i || / || p_r ||, how far the rebuilt average's profile is from the one asked for (0 = exact)."""
    a = profile_inner_products(stored_t, stored_sigma, stored_t, stored_sigma)
    b = profile_inner_products(stored_t, stored_sigma, [t], [sigma_rel])[:, 0]
    x = np.linalg.lstsq(a, b, rcond=None)[0]  # lstsq: the same answer as solve, and no error if A is singular
    x = x / x.sum()
    rr = profile_inner_products([t], [sigma_rel], [t], [sigma_rel])[0, 0]
    return x, float(math.sqrt(max(rr - 2 * x @ b + x @ a @ x, 0.0) / rr))


@dataclass(frozen=True)
class StoredProfile:
    path: Path
    step: int
    images: int
    sigma_rel: float


def stored_profiles(root: str | Path) -> list[StoredProfile]:
    """Every profile stored under `root` (<run>/phema/step-NNNNNN/phema-*.safetensors), by time then length. A file
    whose step or sigma_rel (its metadata) is not the one its folder and name say (e.g. copied into another step's
    folder) is refused, naming it: read as it is, it would be another step's average."""
    from safetensors import safe_open

    found = []
    for path in sorted(Path(root).glob(f"step-*/{FILE_PREFIX}*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            profile = StoredProfile(path, int(meta["step"]), int(meta["images"]), float(meta["sigma_rel"]))
        except Exception as e:  # a damaged or foreign file must not pass for a profile
            raise ValueError(f"{path}: not a stored post-hoc EMA profile ({type(e).__name__}: {e})") from None
        place = (path.parent.name, path.name)
        if place != (store_name(profile.step), f"{FILE_PREFIX}{key(profile.sigma_rel)}.safetensors"):
            raise ValueError(f"{path}: holds the post-hoc EMA profile of step {profile.step}, sigma_rel "
                             f"{profile.sigma_rel:g}, not the one its folder and name say (copied or renamed?); "
                             f"move it to {store_name(profile.step)}/{FILE_PREFIX}{key(profile.sigma_rel)}.safetensors "
                             f"or out of {Path(root)}")
        found.append(profile)
    return sorted(found, key=lambda p: (p.images, p.sigma_rel))


# Above this profile error a rebuilt average is refused: it is no longer the asked-for average of the snapshot's
# step. Every length in the profiles' sweeps (0.025-0.13) fits within 35 % at a step whose own profiles are stored,
# even from that one store (0.025: 34 %; 0.07: 6 %); a step whose store is missing is extrapolated from earlier
# ones, e.g. 0.05 at step 600 from stores every 100 steps up to 500: 145 % (tests/test_phema.py).
MAX_PROFILE_ERROR = 0.4


@dataclass(frozen=True)
class Rebuild:
    """How the EMA of length `sigma_rel` at training step `step` is rebuilt: coefficients `x` of the stored profiles
    `used` (all of steps <= step), and the fit's profile error at that step."""
    sigma_rel: float
    step: int
    used: tuple
    x: tuple
    error: float

    def line(self) -> str:
        last = max(p.step for p in self.used)
        own = "" if last == self.step else f"; step {self.step} has no store of its own, the last one used is {last}"
        return (f"EMA length {self.sigma_rel:g} at step {self.step} rebuilt from {len(self.used)} stored profiles: "
                f"its weight profile is {self.error:.1%} off the one asked for{own}")

    def weights(self) -> dict[str, torch.Tensor]:
        """The rebuilt weights (fp32, by parameter name)."""
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for coefficient, profile in zip(self.x, self.used):
            if coefficient == 0.0:
                continue
            for name, w in load_file(str(profile.path)).items():
                term = w.float() * float(coefficient)
                out[name] = out[name].add_(term) if name in out else term
        return out


def plan_rebuild(stored: list[StoredProfile], sigma_rel: float, step: int | None = None,
                 max_error: float | None = MAX_PROFILE_ERROR) -> Rebuild:
    """The rebuild of length `sigma_rel` at step `step` (None: the last stored one) from the profiles stored at or
    before it, its error computed at `step` itself; ValueError (one line) when there is none, or when the error
    exceeds `max_error` (None: no bound)."""
    step = max((p.step for p in stored), default=0) if step is None else int(step)
    usable = [p for p in stored if p.step <= step]
    if not usable:
        raise ValueError(f"no stored post-hoc EMA profile at or before step {step} to reconstruct sigma_rel "
                         f"{sigma_rel} from (train with phema_ema_lengths set, e.g. [0.05, 0.1])")
    last = max(usable, key=lambda p: p.step)
    target = last.images * step / last.step  # images seen at `step`, at the stored profiles' images per step
    x, error = posthoc_fit([p.images for p in usable], [p.sigma_rel for p in usable], target, sigma_rel)
    rebuild = Rebuild(float(sigma_rel), step, tuple(usable), tuple(float(v) for v in x), error)
    if max_error is not None and error > max_error:
        raise ValueError(f"post-hoc EMA length {sigma_rel:g} at step {step} cannot be rebuilt faithfully: from the "
                         f"stores up to step {last.step} its weight profile is {error:.0%} off the one asked for "
                         f"(the bound is {max_error:.0%})" + (f"; {store_name(step)} is missing from "
                         f"{last.path.parent.parent}" if last.step != step else "")
                         + "; choose ema_length 0 (the snapshot's half-life EMA) or another length")
    return rebuild


# ---------------------------------------------------------------- a training run's post-hoc EMA bookkeeping


def stores_phema(cfg, done: int) -> bool:
    """Whether step `done` stores the profiles (helpers.phema.stores_at: with every snapshot, so each snapshot's own
    EMA lengths can be rebuilt exactly at its step, every phema_every steps besides, and at max_steps)."""
    return bool(cfg.phema_ema_lengths) and stores_at(done, cfg.max_steps, cfg.snapshot_every, cfg.phema_every)


def resume_phema(phema, unet, state: dict, images_seen: int, verbose: bool) -> None:
    """Restore the post-hoc EMA profiles from a checkpoint's state. A checkpoint without the lengths asked for
    (written with phema off, or other phema_ema_lengths) restarts them from the resumed weights, as if the weights
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
