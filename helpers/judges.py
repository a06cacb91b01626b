"""Who decides which setting is best: the course's scorer (hw6 and any real data) or the demo's probe.

A judge scores a batch of generated images of fixed prompts and ranks the rows it produced:
- `CourseJudge`: FID against reference statistics (the course's test_mu/test_sigma.npy, or ones computed the
  same way from the validation split) and CLIP-T against the prompts, exactly as the course's program
  (helpers.score). Rule: lowest FID; ties: higher CLIP-T. Without Inception: highest CLIP-T.
- `ProbeJudge`: the demo's offline judge (helpers.probe): attribute accuracy on held-out attribute
  combinations, and the probe Fréchet distance to real pictures of the same prompts. Rule: highest mean
  accuracy over colour, shape and action; ties: lower Fréchet distance.
Further ties go to less guidance, then fewer steps (cheaper, more diverse), then the earlier snapshot.
`make_judge` picks the one a run can use and says why the other metrics are missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .data import Prompt, load_prompts, seeded_subset


def _tie_break(row: dict) -> tuple:
    s = row["setting"]
    return (s["guidance"], s["steps"], s["snapshot"])


def probe_rank(row: dict) -> tuple:
    return (-row["mean_accuracy"], row["frechet_distance"], *_tie_break(row))


def course_rank(row: dict) -> tuple:
    if "fid" in row:
        return (row["fid"], -row.get("clip_t", 0.0), *_tie_break(row))
    return (-row["clip_t"], *_tie_break(row))


RANKS = {"probe": probe_rank, "course": course_rank}  # by judge kind: the rule's order of rows, smaller first


@dataclass
class ProbeJudge:
    probe: object  # helpers.probe.Probe
    attributes: list[dict]  # what each prompt asks for
    real: torch.Tensor  # real pictures of the same prompts (test_reference/), [N, 3, R, R] in [-1, 1]
    key: str = "probe"
    _reference: dict | None = field(default=None, repr=False)
    columns = ["accuracy.color", "accuracy.shape", "accuracy.eyes", "accuracy.extra", "accuracy.action",
               "mean_accuracy", "frechet_distance"]
    rule = ("highest mean probe accuracy over colour, shape and action; ties: lower probe Fréchet distance, "
            "then less guidance, fewer steps, earlier snapshot")
    plot_axes = (("frechet_distance", "probe Fréchet distance to real (lower = more realistic)"),
                 ("mean_accuracy", "mean probe accuracy: colour, shape, action"))

    kind = "probe"

    def evaluate(self, images: torch.Tensor) -> dict:
        from .estimators import scores_from

        return scores_from(self.kind, self.reference, self.per_prompt(images))

    def per_prompt(self, images: torch.Tensor, positions: list[int] | None = None) -> dict:
        """Per image (one per judged prompt at `positions`, default all, in order): probe features and whether
        each attribute reads as its prompt asked."""
        from .estimators import PROBE_ATTRIBUTES
        from .probe import label_indices

        attributes = self.attributes if positions is None else [self.attributes[p] for p in positions]
        if len(images) != len(attributes):
            raise ValueError(f"{len(images)} images but {len(attributes)} attribute entries")
        pred, labels = self.probe.predict(images), label_indices(attributes)
        correct = torch.stack([pred[a] == labels[a] for a in PROBE_ATTRIBUTES], 1)
        return {"features": self.probe.features(images).double().numpy(), "correct": correct.numpy()}

    @property
    def reference(self) -> dict:
        """Probe features of the real pictures of the judged prompts (computed once)."""
        if self._reference is None:
            self._reference = {"real_features": self.probe.features(self.real).double().numpy()}
        return self._reference

    def rank(self, row: dict) -> tuple:
        return probe_rank(row)


@dataclass
class CourseJudge:
    prompts: list[str]
    output_size: int  # images are scored as the PNGs that would be handed in
    reference_stats: tuple | None  # (mu, sigma) of real images' Inception features, or None
    inception: object | None
    clip: object | None
    key: str = "course"
    skipped: dict = field(default_factory=dict)  # metric -> why it cannot be computed here

    @property
    def columns(self) -> list[str]:
        return [m for m in ("fid", "clip_t") if m not in self.skipped]

    @property
    def rule(self) -> str:
        if "fid" not in self.skipped:
            return "lowest FID (course scorer); ties: higher CLIP-T, then less guidance, fewer steps, earlier snapshot"
        return "highest CLIP-T (FID unavailable here); ties: less guidance, fewer steps, earlier snapshot"

    @property
    def plot_axes(self):
        return (("fid", "FID, course scorer (lower = closer to real)"), ("clip_t", "CLIP-T (higher = follows the prompt)"))

    kind = "course"

    def evaluate(self, images: torch.Tensor) -> dict:
        from .estimators import scores_from

        return scores_from(self.kind, self.reference, self.per_prompt(images))

    def per_prompt(self, images: torch.Tensor, positions: list[int] | None = None) -> dict:
        """Per image (one per judged prompt at `positions`, default all, in order), scored as the PNGs that would
        be handed in: Inception features (when FID can be computed here) and the CLIP cosine to its prompt."""
        from .sample import to_output_pils
        from .score import inception_features

        prompts = self.prompts if positions is None else [self.prompts[p] for p in positions]
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pils, out = to_output_pils(images, self.output_size), {}
        if "fid" not in self.skipped and self.inception is not None and self.reference_stats is not None:
            out["inception"] = inception_features(pils, self.inception, progress=False)
        if "clip_t" not in self.skipped and self.clip is not None:
            cosine = (self.clip.image_embeddings(pils).double() * self.clip.text_embeddings(prompts).double())
            out["clip_t"] = cosine.sum(-1).cpu().numpy()
        return out

    @property
    def reference(self) -> dict:
        if self.reference_stats is None:
            return {}
        return {"mu": np.asarray(self.reference_stats[0], np.float64),
                "sigma": np.asarray(self.reference_stats[1], np.float64)}

    def rank(self, row: dict) -> tuple:
        return course_rank(row)


@dataclass
class JudgeSet:
    """A judge with the prompts (a fixed subset of test.json) and seeds it judges, as the test set would get them."""

    judge: object
    prompts: list[Prompt]
    seeds: list[int]  # cfg.seed + the prompt's index in test.json: the same image the test set would hold
    note: str

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]


def make_judge(cfg: RunConfig, count: int, *, probe=None, inception=None, clip=None, reference_stats=None,
               skipped: dict | None = None) -> JudgeSet | None:
    """The judge for this run on `count` seeded test prompts (0 = all), or None if nothing can judge here."""
    prompts = load_prompts(cfg.data_path / "test.json")
    pick = seeded_subset(len(prompts), count, cfg.seed)
    chosen, seeds = [prompts[i] for i in pick], [cfg.seed + i for i in pick]
    note = (f"{len(pick)} of {len(prompts)} test prompts" + (f" (a fixed subset drawn with seed {cfg.seed})"
                                                            if len(pick) < len(prompts) else ""))
    if probe is not None:
        from .demo_data import load_attributes
        from .images import load_image_tensor

        attributes = load_attributes(cfg.data_path)
        real = torch.stack([load_image_tensor(cfg.data_path / "test_reference" / p.image_name, cfg.resolution,
                                              crop=cfg.crop_to_content) for p in chosen])
        judge = ProbeJudge(probe, [attributes[p.key] for p in chosen], real, key=f"probe:{Path(probe.path).name}")
        return JudgeSet(judge, chosen, seeds, note)
    skipped = dict(skipped or {})
    if reference_stats is None or inception is None:
        skipped.setdefault("fid", "no Inception network or no reference statistics")
    if clip is None:
        skipped.setdefault("clip_t", "no CLIP model")
    if "fid" in skipped and "clip_t" in skipped:
        return None
    key = "course:" + ",".join(m for m in ("fid", "clip_t") if m not in skipped)
    if reference_stats is not None:  # cells scored against other reference statistics are not reused
        import hashlib

        key += ":" + hashlib.sha256(reference_stats[0].tobytes()).hexdigest()[:12]
    judge = CourseJudge([p.text for p in chosen], cfg.output_size, reference_stats, inception, clip, key, skipped)
    return JudgeSet(judge, chosen, seeds, note)


def judge_for_run(cfg: RunConfig, count: int, *, probe_steps: int = 400, reference_stats_dir=None,
                  inception_weights=None, clip_weights=None, device=None) -> tuple[JudgeSet | None, dict]:
    """The judge this run can have here, and {metric: why it is skipped}. Demo data (attributes.json): the
    probe, trained on real training images only. Otherwise the course scorer with whatever weights load."""
    if (cfg.data_path / "attributes.json").exists():
        from .probe import train_probe

        probe = train_probe(cfg.data_path, resolution=cfg.resolution, cache_dir=cfg.cache_dir, steps=probe_steps,
                            seed=cfg.seed, crop_to_content=cfg.crop_to_content)
        fmt = lambda acc: ", ".join(f"{k} {v:.3f}" for k, v in acc.items())  # noqa: E731
        print(f"probe accuracy on held-out real monsters: {fmt(probe.heldout_accuracy)}\n"
              f"probe accuracy on test_reference (real pictures of the test prompts): {fmt(probe.reference_accuracy)}")
        return make_judge(cfg, count, probe=probe), {}
    from . import score

    skipped, inception, clip, stats = {}, None, None, None
    try:
        inception = score.load_inception(inception_weights, device)
    except score.ScorerUnavailable as e:
        skipped["fid"] = str(e)
    try:
        clip = score.load_clip_scorer(clip_weights or cfg.clip_model, device)
    except score.ScorerUnavailable as e:
        skipped["clip_t"] = skipped["clip_i"] = str(e)
    if inception is not None:
        stats, why = reference_stats(cfg, inception, reference_stats_dir)
        if stats is None:
            skipped["fid"] = why
    return make_judge(cfg, count, inception=inception, clip=clip, reference_stats=stats, skipped=skipped), skipped


def reference_stats(cfg: RunConfig, inception, stats_dir=None) -> tuple[tuple | None, str]:
    """(mu, sigma) to compute FID against: the course's test_mu/test_sigma.npy in `stats_dir` (default
    <data_dir>/score), else the same statistics of the validation split's real images (computed once)."""
    from . import score

    stats_dir = Path(stats_dir) if stats_dir else cfg.data_path / "score"
    if (stats_dir / "test_mu.npy").exists():
        print(f"FID reference: the course's statistics in {stats_dir}")
        return score.load_reference_stats(stats_dir), ""
    try:
        real_dir = validation_images(cfg)
    except (FileNotFoundError, ValueError) as e:
        return None, f"no {stats_dir / 'test_mu.npy'} and no validation images to compute a reference from ({e})"
    print(f"FID reference: no {stats_dir / 'test_mu.npy'}, so the validation split's real images in {real_dir} "
          f"(put the course's test_mu.npy / test_sigma.npy there for leaderboard-comparable FID)")
    return score.reference_stats_from_folder(real_dir, cfg.layout.selection / "val_stats", inception), ""


def validation_images(cfg: RunConfig) -> Path:
    """<run>/selection/val_real/<key>.png: each validation key's real first frame as the course would see a real
    image (on white, cropped if crop_to_content, output_size²), written once; usable as `--real` of helpers.score."""
    from .files import atomic_save_image
    from .images import crop_to_content, load_rgb, square_resize
    from .metrics import validation_set

    out = cfg.layout.selection / "val_real"
    val = validation_set(cfg)
    for key, path in zip(val.keys, val.paths):
        target = out / f"{key}.png"
        if not target.exists():
            im = load_rgb(path)
            atomic_save_image(square_resize(crop_to_content(im) if cfg.crop_to_content else im, cfg.output_size),
                              target)
    return out


def same_judge(cfg: RunConfig, judge, count: int) -> JudgeSet:
    """The same judge (same probe or networks and reference) on `count` test prompts (0 = all of them)."""
    if isinstance(judge, ProbeJudge):
        return make_judge(cfg, count, probe=judge.probe)
    return make_judge(cfg, count, inception=judge.inception, clip=judge.clip, reference_stats=judge.reference_stats,
                      skipped=judge.skipped)


def on_sweep_prompts(cfg: RunConfig, judge, images: torch.Tensor, count: int) -> dict:
    """The judge's scores of `images` (one per test prompt, in test.json's order) on the sweep's prompt subset:
    the chosen setting's sweep row, measured again on the images as handed in."""
    pick = seeded_subset(len(images), count, cfg.seed)
    return same_judge(cfg, judge, count).judge.evaluate(images[pick])


def validation_scores(cfg: RunConfig, model, setting, judge, *, batch_size: int) -> dict:
    """CLIP-I, CLIP-T (and FID against the validation images) of the chosen setting on the held-out validation
    monsters: the only place CLIP-I can be measured locally (it needs the real image of each prompt)."""
    if isinstance(judge, ProbeJudge) or judge.clip is None:
        return {"skipped": {"clip_i": "no CLIP model" if not isinstance(judge, ProbeJudge) else
                            "demo data: the probe judges instead (see selection and chosen)"}}
    from PIL import Image

    from .metrics import validation_set
    from .sample import sample_images, to_output_pils
    from .score import score_images

    val, real_dir = validation_set(cfg), validation_images(cfg)
    images = sample_images(model, val.prompts, val.seeds, setting, batch_size=batch_size, progress=True)
    real = [Image.open(real_dir / f"{key}.png").convert("RGB") for key in val.keys]
    return {**score_images(to_output_pils(images, cfg.output_size), val.prompts, real_images=real,
                           reference_stats=judge.reference_stats, inception=judge.inception, clip=judge.clip),
            "images": len(val)}


def probe_verdict_grid(judged: JudgeSet, images: torch.Tensor, n: int = 8, per_row: int = 4):
    """matplotlib Figure: for n spread prompts, the real picture over the generated one (nearest-neighbour
    enlarged: pixels stay crisp), with the probe's reading of the generated image for every attribute it probes
    (✓ where it matches the prompt), in rows of `per_row` prompts at a readable size."""
    import matplotlib.pyplot as plt

    from .images import image_grid, pixel_cell, tensor_to_pil
    from .probe import CLASSES

    judge = judged.judge
    n = min(n, len(images))
    pick = [round(i * (len(images) - 1) / max(n - 1, 1)) for i in range(n)]
    fake = images[pick]
    if fake.shape[-2:] != judge.real.shape[-2:]:  # area = the box average, exact for whole factors
        fake = torch.nn.functional.interpolate(fake, size=judge.real.shape[-2:], mode="area")
    read = judge.probe.predict(fake)
    rows = -(-n // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(3.2 * per_row, 5.0 * rows), squeeze=False)
    cell = pixel_cell(fake.shape[-1], 128)
    for j, (ax, i) in enumerate(zip(axes.flat, pick)):
        pair = image_grid([tensor_to_pil(judge.real[i]), tensor_to_pil(fake[j])], cols=1, cell=cell)
        ax.imshow(pair, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([cell // 2, cell + cell // 2], ["real", "generated"], fontsize=10)
        lines = []
        for a in CLASSES:
            said, wanted = CLASSES[a][read[a][j]], judge.attributes[i].get(a)
            lines.append(f"{a}: {said} " + ("✓" if said == wanted else f"✗ (asked: {wanted})"))
        ax.set_xlabel("\n".join(lines), fontsize=10, loc="left")
        ax.set_title(judged.prompts[i].key, fontsize=11)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("real (top) vs generated (bottom), with the probe's reading of the generated one", fontsize=12)
    fig.tight_layout()
    for i in pick:
        print(f"{judged.prompts[i].key}: {judged.prompts[i].text!r}")
    return fig
