"""A judge's scores from per-prompt records, on any subset of the prompts, and the unbiased screening estimator.

A judge (helpers.judges) turns each generated image into a per-prompt record (features and per-image scores, see
`per_prompt` there). Everything it reports is a function of those records, so a cell's images are judged once and
its scores on any subset of prompts (a stage of the staged selection, a bootstrap resample, a replayed prompt
order) follow without sampling or judging again:
- "probe" (the demo): attribute accuracy = the mean of per-prompt hits; probe Fréchet distance between the probe
  features of the generated images and of the real pictures of the same prompts.
- "course" (hw6): FID of the Inception features against the reference (mu, sigma); CLIP-T = the mean of
  per-prompt cosines.

Screening (`screen_score`) must not favour low-diversity settings. A mean of per-image values (accuracy, CLIP-T)
is unbiased at any N; the probe's Fréchet distance is replaced by KID against the real pictures' probe features.
FID is not: FID_N ~ FID_inf + k/N with k growing with the set's spread (Chong & Forsyth 2020),
so small-N FID rewards sets with little spread. The course's reference is only (mu, sigma), so the screen is
KID (Bińkowski et al. 2018: squared MMD, cubic polynomial kernel k(x, y) = (x.y/d + 1)^3) against the Gaussian
N(mu, sigma) that FID itself assumes: the generated-generated term is a U-statistic (pairs i != j) and the
generated-reference and reference-reference terms are exact Gaussian expectations, so its expectation is the same
at every N for every setting; only its variance shrinks with N.
"""
from __future__ import annotations

import numpy as np

from .probe import CLASSES, GATED

PROBE_ATTRIBUTES = tuple(CLASSES)  # the order of a probe record's hits columns


def frechet(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    from .score import feature_statistics, frechet_distance

    return frechet_distance(*feature_statistics(features), mu, sigma)


def kid_to_gaussian(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Unbiased squared MMD between the distribution of `features` [N, d] (N >= 2) and N(mu, sigma), with the
    cubic polynomial kernel of KID; its expectation does not depend on N."""
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"KID needs at least 2 images, got {n}")
    gram = (x @ x.T / d + 1.0) ** 3
    xx = (gram.sum() - np.trace(gram)) / (n * (n - 1))
    m = x @ mu / d + 1.0  # x.y/d + 1 for y ~ N(mu, sigma) is normal with mean m and variance v
    v = np.einsum("ij,jk,ik->i", x, sigma, x) / d ** 2
    xy = np.mean(m ** 3 + 3 * m * v)
    return float(xx - 2 * xy + _gaussian_self_term(mu, sigma, d))


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD (KID's estimator) between samples x [N, d] and y [M, d], N, M >= 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    d = x.shape[1]
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(x)} and {len(y)}")

    def pairs(a):  # the mean kernel over pairs i != j: what makes the estimate unbiased
        gram = (a @ a.T / d + 1.0) ** 3
        return (gram.sum() - np.trace(gram)) / (len(a) * (len(a) - 1))

    return float(pairs(x) + pairs(y) - 2 * np.mean((x @ y.T / d + 1.0) ** 3))


def _gaussian_self_term(mu: np.ndarray, sigma: np.ndarray, d: int) -> float:
    """E (y.y'/d + 1)^3 for independent y, y' ~ N(mu, sigma) (Gaussian moments up to the third)."""
    c, s2 = mu @ mu, mu @ sigma @ mu
    second = sigma + np.outer(mu, mu)
    e1 = c / d
    e2 = np.sum(second * second.T) / d ** 2
    e3 = (c ** 3 + 3 * c * s2 + 3 * (c * (s2 + np.sum(sigma * sigma.T)) + 2 * mu @ sigma @ sigma @ mu)) / d ** 3
    return float(1 + 3 * e1 + 3 * e2 + e3)


def scores_from(kind: str, reference: dict, records: dict, index=None) -> dict:
    """The judge's scores (what its `evaluate` returns) of the prompts `index` (positions; None = all, repeats
    allowed) from per-prompt `records` and the judge's `reference` arrays."""
    records = _take(records, index)
    if kind == "probe":
        hits = records["correct"].astype(np.float64)
        accuracy = {a: float(hits[:, i].mean()) for i, a in enumerate(PROBE_ATTRIBUTES)}
        real = _take(reference, index)["real_features"]
        from .score import feature_statistics

        if len(real) < 2:
            raise ValueError(f"the Fréchet distance needs at least 2 real and 2 generated images, got {len(real)}")
        return {"accuracy": accuracy, "mean_accuracy": sum(accuracy[a] for a in GATED) / len(GATED),
                "frechet_distance": max(frechet(records["features"], *feature_statistics(real)), 0.0)}
    if kind == "course":
        out = {}
        if "inception" in records:
            out["fid"] = frechet(records["inception"], reference["mu"], reference["sigma"])
        if "clip_t" in records:
            out["clip_t"] = float(records["clip_t"].mean())
        return out
    raise ValueError(f"unknown judge kind {kind!r} (probe or course)")


def screen_score(kind: str, reference: dict, records: dict, index=None):
    """Smaller is better (tuples compare in order); estimators whose bias is the same for every setting.

    probe: (minus the mean accuracy, KID of the probe features to the real pictures of the same prompts), the
    order of the probe's rule (accuracy, then Fréchet distance), each term unbiased; accuracy often ties at 1.0
    on the demo, and then the spread of the features decides, as the Fréchet distance does at full N."""
    records = _take(records, index)
    if kind == "probe":
        hits = records["correct"].astype(np.float64)
        accuracy = float(np.mean([hits[:, PROBE_ATTRIBUTES.index(a)].mean() for a in GATED]))
        return (-accuracy, kid(records["features"], _take(reference, index)["real_features"]))
    if kind == "course":
        if "inception" in records:
            return kid_to_gaussian(records["inception"], reference["mu"], reference["sigma"])
        return -float(records["clip_t"].mean())
    raise ValueError(f"unknown judge kind {kind!r} (probe or course)")


SCREEN_NAMES = {"probe": "mean probe accuracy (a mean of per-image hits: unbiased), ties: KID to the real pictures",
                "course": "KID against the reference Gaussian (unbiased; CLIP-T, a mean, without Inception)"}


def _take(arrays: dict, index) -> dict:
    if index is None:
        return arrays
    index = np.asarray(index, dtype=np.int64)
    return {k: np.asarray(v)[index] for k, v in arrays.items()}
