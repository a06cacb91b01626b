"""Post-hoc EMA (helpers.phema): the sigma_rel <-> gamma map, tracking, exact resume, and reconstruction.

Tolerance of a reconstruction. Whatever the weights theta_k after step k (k = 1..n), a tracked power EMA is
sum_k w_k theta_k with w_k = (k/n)^(g+1) - ((k-1)/n)^(g+1) (the integral of its profile over step k), and a
reconstruction is sum_i x_i (stored profile i) = sum_k w'_k theta_k. Both weight sets sum to 1, so per element
    |reconstructed - tracked| = |sum_k (w'_k - w_k)(theta_k - m)| <= ||w' - w||_1 * (max_k theta_k - min_k theta_k) / 2
with m the midpoint of the element's range over training, plus the fp16 rounding of the stored profiles
(sum_i |x_i| * |theta_i| * 2^-11). The tests assert exactly this bound, computed from the run itself, and print
the measured error relative to the difference between the two stored lengths (how far apart EMA lengths are).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers.phema import PowerEMA, plan_rebuild, posthoc_fit, sigma_rel_to_gamma, stored_profiles

FP16_HALF_ULP = 2.0 ** -11


def profile_error(stored_t, stored_sigma, t, sigma_rel) -> float:
    """The fit's profile error (helpers.phema.posthoc_fit, which plan_rebuild bounds)."""
    return posthoc_fit(stored_t, stored_sigma, t, sigma_rel)[1]


def reconstruct(stored, sigma_rel, step=None) -> dict:
    """The rebuilt weights as the sweep gets them (helpers.phema.plan_rebuild), with no bound on the error."""
    return plan_rebuild(stored, sigma_rel, step, max_error=None).weights()


def discrete_weights(n_steps: int, sigma_rel: float, at_step: int | None = None) -> np.ndarray:
    """w_k of a power EMA tracked to `at_step` (default n_steps) over steps 1..n_steps (0 after at_step)."""
    at = at_step or n_steps
    g = sigma_rel_to_gamma(sigma_rel)
    k = np.arange(1, n_steps + 1, dtype=np.float64)
    w = (np.minimum(k, at) / at) ** (g + 1) - (np.minimum(k - 1, at) / at) ** (g + 1)
    return w


class LinearNet(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


def test_sigma_rel_and_gamma_are_inverse_and_match_the_paper():
    # EDM2 Sec. 3: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> gamma 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.025, 0.07, 0.13, 0.25):
        g = sigma_rel_to_gamma(s)  # the inverse: EDM2's width of the profile of exponent gamma
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(s, rel=1e-12)
    for bad in (0.0, -0.1, 0.3, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


def test_tracking_weights_each_step_by_the_integral_of_the_profile():
    n, net = 50, LinearNet(50)
    ema = PowerEMA(net, [0.05, 0.10])
    for k in range(1, n + 1):
        with torch.no_grad():
            net.w.zero_()
            net.w[k - 1] = 1.0  # theta_k = e_k: the average's element k is its weight of step k
        ema.update(net, images=8)
    for s in (0.05, 0.10):
        got = ema.weights(s)["w"].double().numpy()
        np.testing.assert_allclose(got, discrete_weights(n, s), atol=1e-6)
        assert got.sum() == pytest.approx(1.0, abs=1e-5)


def test_state_dict_resumes_exactly():
    torch.manual_seed(0)
    net = LinearNet(7)
    full, resumed = PowerEMA(net, [0.05, 0.1]), None
    for k in range(20):
        with torch.no_grad():
            net.w.add_(torch.randn(7))
        full.update(net, 4)
        if k == 9:
            resumed = PowerEMA(LinearNet(7), [0.05, 0.1])
            resumed.load_state_dict({k2: v.clone() for k2, v in full.state_dict().items()})
        elif k > 9:
            resumed.update(net, 4)
    for s in (0.05, 0.1):
        assert torch.equal(full.weights(s)["w"], resumed.weights(s)["w"])
    with pytest.raises(ValueError, match="0.200"):
        PowerEMA(net, [0.2]).load_state_dict(full.state_dict())


def random_walk_run(tmp_path, n_steps=120, store_every=10, extra=(0.07, 0.13), dim=2000, seed=0):
    """A synthetic training trajectory (drift + noise, as SGD's): tracked profiles stored every `store_every`
    steps, plus the `extra` lengths tracked directly; returns (tracked extras, per-element range, stored)."""
    gen = torch.Generator().manual_seed(seed)
    net = LinearNet(dim)
    drift = torch.randn(dim, generator=gen) * 0.05
    stored_ema, direct = PowerEMA(net, [0.05, 0.10]), PowerEMA(net, list(extra))
    lo, hi = torch.full((dim,), float("inf")), torch.full((dim,), float("-inf"))
    for k in range(1, n_steps + 1):
        with torch.no_grad():
            net.w.add_(drift + 0.2 * torch.randn(dim, generator=gen))
        lo, hi = torch.minimum(lo, net.w.detach()), torch.maximum(hi, net.w.detach())
        stored_ema.update(net, 16)
        direct.update(net, 16)
        if k % store_every == 0:
            stored_ema.store(tmp_path, step=k)
    return direct, hi - lo, stored_profiles(tmp_path)


def bound(stored, n_steps, sigma_rel, spread, at_step=None):
    """The error bound of the module docstring for one reconstruction, per element."""
    at = at_step or n_steps
    usable = [p for p in stored if p.step <= at]
    x, _ = posthoc_fit([p.images for p in usable], [p.sigma_rel for p in usable], usable[-1].images * at
                       / usable[-1].step, sigma_rel)
    w_rec = sum(xi * discrete_weights(n_steps, p.sigma_rel, p.step) for xi, p in zip(x, usable))
    l1 = float(np.abs(w_rec - discrete_weights(n_steps, sigma_rel, at)).sum())
    return l1 * spread / 2, float(np.abs(x).sum())


def storage_bound(stored, x_l1, name="w"):
    """Per element: fp16 rounding of the stored profiles, summed with the coefficients' weights (+ fp32 sums)."""
    from safetensors.torch import load_file

    biggest = torch.stack([load_file(str(p.path))[name].float().abs() for p in stored]).amax(0)
    return (x_l1 * FP16_HALF_ULP * biggest + 1e-6 * x_l1 * biggest + 1e-7).double().numpy()


def test_a_stored_profiles_own_length_returns_its_weights(tmp_path):
    _, _, stored = random_walk_run(tmp_path)
    from safetensors.torch import load_file

    for p in stored:
        want = load_file(str(p.path))["w"].float()
        got = reconstruct(stored, p.sigma_rel, step=p.step)["w"]
        # float64 least squares picks x = e_i (to ~1e-10); fp32 accumulation of the other terms adds ~1e-7
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("sigma_rel", [0.07, 0.13])
def test_a_reconstructed_length_matches_one_tracked_directly(tmp_path, sigma_rel):
    n = 120
    direct, spread, stored = random_walk_run(tmp_path, n_steps=n)
    got = reconstruct(stored, sigma_rel)["w"]
    want = direct.weights(sigma_rel)["w"]
    profile_bound, x_l1 = bound(stored, n, sigma_rel, spread.double().numpy())
    err = (got - want).abs().double().numpy()
    assert (err <= profile_bound + storage_bound(stored, x_l1)).all()
    # and in plain numbers: the error is a small part of the difference between the stored lengths
    from safetensors.torch import load_file

    last = [load_file(str(p.path))["w"].float() for p in stored if p.step == n]
    relative = float((got - want).norm() / (last[0] - last[1]).norm())
    fit = profile_error([p.images for p in stored], [p.sigma_rel for p in stored], stored[-1].images, sigma_rel)
    print(f"sigma_rel {sigma_rel}: |rec - tracked| / |ema0.05 - ema0.10| = {relative:.4f}, profile error {fit:.4f}")
    assert relative < 0.1


def test_reconstruction_at_an_earlier_step_uses_only_profiles_stored_by_then(tmp_path):
    n = 120
    _, spread, stored = random_walk_run(tmp_path, n_steps=n)
    # at step 60, tracked directly: rerun the same walk to step 60 only
    direct60, _, _ = random_walk_run(tmp_path / "to60", n_steps=60)
    got = reconstruct(stored, 0.07, step=60)["w"]
    want = direct60.weights(0.07)["w"]
    profile_bound, x_l1 = bound(stored, n, 0.07, spread.double().numpy(), at_step=60)
    err = (got - want).abs().double().numpy()
    assert (err <= profile_bound + storage_bound([p for p in stored if p.step <= 60], x_l1)).all()
    with pytest.raises(ValueError, match="at or before step 5"):
        reconstruct(stored, 0.07, step=5)


def test_profile_error_is_zero_for_stored_profiles_and_shrinks_with_denser_snapshots():
    def err(every, s, n=900):
        times = [t for t in range(every, n + 1, every) for _ in (0, 1)]
        return profile_error(times, [0.05, 0.10] * (len(times) // 2), n, s)

    assert err(300, 0.05) < 1e-6 and err(300, 0.10) < 1e-6
    for s in (0.025, 0.07, 0.13):
        assert err(50, s) < err(100, s) < err(300, s)


@pytest.mark.parametrize("dtype, relative_limit", [(torch.float32, 0.02), (torch.float16, 0.15)])
def test_a_tiny_training_run_reconstructs_a_length_it_also_tracked(tmp_path, dtype, relative_limit):
    """A real (tiny) U-Net trained with AdamW on a fixed toy task; 0.07 tracked directly and reconstructed.
    Measured: the error is 0.4 % (fp32 storage) and 8.5 % (fp16) of the difference between the stored lengths,
    which after 40 steps is only 0.2 % of the weights: fp16 rounding (2^-11) dominates here; the limits allow
    about 2x."""
    from safetensors.torch import load_file

    from helpers.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny", in_channels=3, cross_attention_dim=32, sample_size=8, seed=0)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    stored_ema, direct = PowerEMA(unet, [0.05, 0.10]), PowerEMA(unet, [0.07])
    flat = lambda: torch.cat([p.detach().flatten() for p in unet.parameters()])  # noqa: E731
    lo = hi = flat()
    x, ctx = torch.randn(4, 3, 8, 8), torch.randn(4, 4, 32)
    n, every = 40, 5
    for k in range(1, n + 1):
        t = torch.randint(0, 1000, (4,))
        loss = (unet(x, t, encoder_hidden_states=ctx).sample - x.flip(0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lo, hi = torch.minimum(lo, flat()), torch.maximum(hi, flat())
        stored_ema.update(unet, 4)
        direct.update(unet, 4)
        if k % every == 0:
            stored_ema.store(tmp_path, step=k, dtype=dtype)
    stored = stored_profiles(tmp_path)
    rec = reconstruct(stored, 0.07)
    got = torch.cat([rec[name].flatten() for name in direct.names])
    want = torch.cat([w.flatten() for w in direct.weights(0.07).values()])
    profile_bound, x_l1 = bound(stored, n, 0.07, (hi - lo).double().numpy())
    err = (got - want).abs().double().numpy()
    files = [load_file(str(p.path)) for p in stored]
    biggest = torch.stack([torch.cat([f[name].float().abs().flatten() for name in direct.names])
                           for f in files]).amax(0)
    assert (err <= profile_bound + (x_l1 * (FP16_HALF_ULP + 1e-6) * biggest + 1e-7).double().numpy()).all()
    a, b = (torch.cat([w.flatten() for w in stored_ema.weights(s).values()]) for s in (0.05, 0.10))
    relative = float((got - want).norm() / (a - b).norm())
    print(f"tiny U-Net, {dtype}: |rec - tracked| / |ema0.05 - ema0.10| = {relative:.4f}")
    assert relative < relative_limit


# ---------------------------------------------------------------- exact about the step (issue 24, item 4)


def test_stores_come_with_every_snapshot_and_the_disk_plan_counts_each_step_once():
    from helpers.disk import store_count
    from helpers.phema import stores_at

    for max_steps in (1, 7, 12):
        for snapshot_every in (0, 1, 3, 5):
            for phema_every in (0, 2, 3, 4):
                steps = [d for d in range(1, max_steps + 1) if stores_at(d, max_steps, snapshot_every, phema_every)]
                snapshots = [d for d in range(1, max_steps + 1)
                             if d == max_steps or (snapshot_every and d % snapshot_every == 0)]
                assert set(snapshots) <= set(steps)  # every snapshot's own step is stored, whatever phema_every
                assert all(d in snapshots or d % phema_every == 0 for d in steps)
                for start in range(max_steps + 1):
                    for end in range(start, max_steps + 1):
                        want = len([d for d in steps if start < d <= end])
                        assert store_count(start, end, max_steps, snapshot_every, phema_every) == want


def test_a_missing_own_store_is_fitted_at_the_snapshots_step_and_refused_above_the_bound(tmp_path):
    import shutil

    from helpers.phema import MAX_PROFILE_ERROR, plan_rebuild

    _, _, stored = random_walk_run(tmp_path, n_steps=120, store_every=10)
    exact = plan_rebuild(stored, 0.05, step=120)
    assert exact.error < 1e-6
    assert "step 120 rebuilt from 24 stored profiles: its weight profile is 0.0% off" in exact.line()
    shutil.rmtree(tmp_path / "step-000120")
    stored = stored_profiles(tmp_path)
    loose = plan_rebuild(stored, 0.05, step=120, max_error=None)
    last_stored = profile_error([p.images for p in loose.used], [p.sigma_rel for p in loose.used],
                                loose.used[-1].images, 0.05)
    assert last_stored < 1e-6  # what was printed before: the fit at step 110, where 0.05 is stored: "0.0 % off"
    at_step = profile_error([p.images for p in loose.used], [p.sigma_rel for p in loose.used], 16 * 120, 0.05)
    assert loose.error == pytest.approx(at_step) and loose.error > MAX_PROFILE_ERROR  # 60 %: stores every 10 steps
    assert "step 120 has no store of its own, the last one used is 110" in loose.line()
    with pytest.raises(ValueError, match=r"^post-hoc EMA length 0.05 at step 120 cannot be rebuilt faithfully: from "
                                         r"the stores up to step 110 its weight profile is \d+% off .*bound is 40%\); "
                                         r"step-000120 is missing from") as refused:
        plan_rebuild(stored, 0.05, step=120)
    assert "\n" not in str(refused.value)
    # the numbers MAX_PROFILE_ERROR's comment states
    def fit(times, t, s):
        return profile_error([x for x in times for _ in (0, 1)], [0.05, 0.10] * len(times), t, s)
    assert fit([10], 10, 0.025) == pytest.approx(0.345, abs=0.001)
    assert fit([10], 10, 0.07) == pytest.approx(0.056, abs=0.001)
    assert fit(range(100, 501, 100), 600, 0.05) == pytest.approx(1.45, abs=0.01)


def test_a_store_file_in_another_steps_folder_or_under_another_name_is_refused_by_name(tmp_path):
    import shutil

    _, _, stored = random_walk_run(tmp_path, n_steps=20, store_every=10, dim=10)
    copied = tmp_path / "step-000020" / "phema-0.050.safetensors"
    shutil.copy(tmp_path / "step-000010" / "phema-0.050.safetensors", copied)
    with pytest.raises(ValueError, match=r"step-000020/phema-0.050.safetensors: holds the post-hoc EMA profile of step "
                                         r"10, sigma_rel 0.05, not the one its folder and name say"):
        stored_profiles(tmp_path)
    shutil.copy(tmp_path / "step-000010" / "phema-0.100.safetensors", copied)  # same step, other length's name
    own = tmp_path / "step-000010"
    shutil.copy(own / "phema-0.100.safetensors", own / "phema-0.050.safetensors")
    with pytest.raises(ValueError, match=r"step-000010/phema-0.050.safetensors: holds .* step 10, sigma_rel 0.1,"):
        stored_profiles(tmp_path)


def test_a_store_written_from_a_checkpoints_state_is_the_store_training_writes(tmp_path):
    from safetensors import safe_open

    from helpers.phema import store_state

    torch.manual_seed(0)
    net = LinearNet(9)
    ema = PowerEMA(net, [0.05, 0.0725])
    for _ in range(5):
        with torch.no_grad():
            net.w.add_(torch.randn(9))
        ema.update(net, 4)
    written = ema.store(tmp_path / "a", 5)
    rewritten = store_state(tmp_path / "b", 5, ema.state_dict(), sigma_rels=[0.05, 0.0725])
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in rewritten.iterdir())
    for name in (p.name for p in written.iterdir()):
        with safe_open(str(written / name), "pt") as a, safe_open(str(rewritten / name), "pt") as b:
            assert a.metadata() == b.metadata()  # sigma_rel 0.0725 exactly, not the key's 0.072
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
