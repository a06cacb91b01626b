"""A small CNN that reads a demo monster's attributes off its picture: the offline judge of the demo (docs/design.md#the-probe).

It is trained only on REAL demo training images (never on generated ones), with a few monsters held
out to check its own accuracy, and cached under `<cache_dir>/probe-<hash12>/` keyed by the dataset
files, the resolution and the probe settings. Its judge (helpers.judges.ProbeJudge) reads generated images two ways,
scored from per-prompt records by helpers.estimators.scores_from:
- attribute accuracy: does the picture show the colour, shape, eyes, extra and action the prompt asked
  for? (the demo's analogue of CLIP-T);
- probe Fréchet distance between the probe features of real and generated pictures of the same prompts (the
  demo's FID).

    probe = train_probe(cfg.data_path, resolution=cfg.resolution, cache_dir=cfg.cache_dir)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from .progress import progress_bar

from .data import ImageRecord, load_course_data, split_by_group
from .demo_data import ACTIONS, COLORS, EXTRAS, EYES, SHAPES, load_attributes
from .files import atomic_save_tensors, atomic_write_json, read_json
from .images import load_image_tensor

PROBE_VERSION = 1  # bump when the architecture, training or augmentation changes
CLASSES: dict[str, tuple] = {"color": COLORS, "shape": SHAPES, "eyes": EYES, "extra": EXTRAS,
                             "action": tuple(ACTIONS)}
# what the quality bar and the sanity test hold the probe to, and what a judge's mean_accuracy averages
GATED = ("color", "shape", "action")


class ProbeNet(nn.Module):
    """Two branches, so that an attribute is read only from what shows it.

    - colour: per-pixel 1×1 convolutions averaged over the image, a learned colour histogram that
      cannot see shape;
    - form (shape, eyes, extra, action): three conv stages, trained on channel-permuted images so
      that colour is no cue to shape. Flattening the 1/4-resolution map (instead of pooling it
      away) keeps *where* things are, which is how "moving" (shifted) and "dying" (lying low) differ.
    Without the split the probe learns colour–shape pairs and misreads the test set's unseen pairs.
    """

    def __init__(self, resolution: int, width: int = 16, num_features: int = 64, color_width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.SiLU())

        self.resolution, self.num_features = resolution, num_features + 2 * color_width
        self.color = nn.Sequential(nn.Conv2d(3, 64, 1), nn.SiLU(), nn.Conv2d(64, color_width, 1), nn.SiLU())
        self.form = nn.Sequential(block(3, width, 1), block(width, width, 1), block(width, 2 * width, 2),
                                  block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                  nn.Dropout(0.1), nn.Linear(4 * width * 16, num_features), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(2 * color_width if name == "color" else num_features, len(c))
                                    for name, c in CLASSES.items()})

    def color_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean and max over pixels: the body's colour even when faded (dying) or flashing (hit)."""
        f = self.color(x)
        return torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.color_features(x), self.form(x)], 1)

    def forward(self, x: torch.Tensor, x_form: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits per attribute; `x_form` (training: colour-permuted x) feeds the form branch instead of x."""
        c, f = self.color_features(x), self.form(x if x_form is None else x_form)
        return {name: head(c if name == "color" else f) for name, head in self.heads.items()}


@dataclass
class Probe:
    net: ProbeNet
    resolution: int
    heldout_accuracy: dict = field(default_factory=dict)  # on real images of monsters it never trained on
    reference_accuracy: dict = field(default_factory=dict)  # on test_reference/: real pictures of the test prompts
    path: Path | None = None

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Float [-1, 1] at the probe's resolution (antialiased resize if the caller's differs)."""
        x = images.float().clamp(-1, 1)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """{attribute: LongTensor [N] of class indices into CLASSES[attribute]} for images in [-1, 1]."""
        self.net.eval()
        with one_thread():
            outs = [self.net(self._prepare(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return {name: torch.cat([o[name] for o in outs]).argmax(1) for name in CLASSES}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """[N, F] probe features (the input of its heads), what the probe Fréchet distance compares."""
        self.net.eval()
        with one_thread():
            return torch.cat([self.net.features(self._prepare(images[i:i + batch_size]))
                              for i in range(0, len(images), batch_size)])


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread for a while. The probe's convolutions are tiny: a second thread gains
    nothing, and on a busy CPU OpenMP's spin-waiting made them 10–20× slower (measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- labels and images


def label_indices(attributes: list[dict]) -> dict[str, torch.Tensor]:
    """attributes.json entries -> {attribute: LongTensor of class indices}; unknown values are errors."""
    out = {}
    for name, classes in CLASSES.items():
        try:
            out[name] = torch.tensor([classes.index(a[name]) for a in attributes], dtype=torch.long)
        except (KeyError, ValueError) as e:
            raise ValueError(f"attribute {name!r}: {e} (known values: {classes})") from None
    return out


def _load_images(paths: list[Path], resolution: int, progress: bool, crop: bool) -> torch.Tensor:
    """Composited on white, cropped (if `crop`) and resized exactly as the model's training images are."""
    return torch.stack([load_image_tensor(p, resolution, crop)
                        for p in progress_bar(paths, desc="probe: loading images", disable=not progress, leave=False)])


def _real_set(records: list[ImageRecord], attrs: dict, resolution: int, progress: bool, crop: bool):
    images = _load_images([r.path for r in records], resolution, progress, crop)
    return images, label_indices([attrs[r.key] for r in records])


def dataset_hash(data_dir: Path, resolution: int, settings: dict) -> str:
    """12 hex digits over the dataset's files (contents), the resolution and the probe settings."""
    h = hashlib.sha256(json.dumps([PROBE_VERSION, resolution, settings], sort_keys=True).encode())
    files = [data_dir / "train_info.json", data_dir / "attributes.json"]
    files += sorted((data_dir / "train").iterdir())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- training


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random whole-pixel shifts of up to ±max_shift, padding with the white background."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=1.0)
    choice = torch.randint(0, (2 * max_shift + 1) ** 2, (n,), generator=gen)
    out = torch.empty_like(x)
    for c in choice.unique().tolist():  # one slice per distinct offset, not per image
        dy, dx = divmod(c, 2 * max_shift + 1)
        idx = (choice == c).nonzero().squeeze(1)
        out[idx] = padded[idx, :, dy:dy + h, dx:dx + w]
    return out


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light: small shifts and a little pixel noise, so slightly off generated sprites are still read."""
    x = _shift(x, 1, gen)
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def _permute_channels(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image with its RGB channels in a random order: a red square may become a green or blue one."""
    perm = _PERMUTATIONS[torch.randint(0, 6, (len(x),), generator=gen)]
    return x[torch.arange(len(x))[:, None], perm]


def _fit(net: ProbeNet, images: torch.Tensor, labels: dict, *, steps: int, batch_size: int, lr: float,
         seed: int, progress: bool) -> None:
    """`steps` optimizer steps over shuffled epochs: a fixed budget, whatever the dataset size."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.train()
    with one_thread():
        _train_loop(net, images, labels, opt, sched, steps, batch_size, gen, progress)
    net.eval()


def _train_loop(net, images, labels, opt, sched, steps: int, batch_size: int, gen, progress: bool) -> None:
    bar = progress_bar(total=steps, desc="probe: training", disable=not progress, leave=False)
    done = 0
    while done < steps:
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            if done == steps:
                break
            done += 1
            idx = order[start:start + batch_size]
            x = _augment(images[idx], gen)
            logits = net(x, _permute_channels(x, gen))
            loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in CLASSES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


def accuracy(probe: Probe, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction correct per attribute."""
    if len(images) == 0:
        return {}
    pred = probe.predict(images)
    return {k: float((pred[k] == labels[k]).float().mean()) for k in CLASSES}


def _reference_set(data_dir: Path, attrs: dict, resolution: int, crop: bool):
    """test_reference/<key>.png: the generator's own pictures of the test prompts (held-out combinations)."""
    folder = data_dir / "test_reference"
    paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
    paths = [p for p in paths if p.stem in attrs]
    if not paths:
        return torch.zeros(0, 3, resolution, resolution), {}
    return _load_images(paths, resolution, False, crop), label_indices([attrs[p.stem] for p in paths])


PROBE_STEPS = 400  # notebook 04's probe_steps default


def probe_settings(steps: int = PROBE_STEPS, batch_size: int = 64, lr: float = 1e-2, width: int = 16,
                   heldout_fraction: float = 0.1, seed: int = 0, crop_to_content: bool = False) -> dict:
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, width=width, heldout_fraction=heldout_fraction,
                    seed=seed)
    if crop_to_content:  # only named when on, so probes cached before the option existed keep their hash
        settings["crop_to_content"] = True
    return settings


def probe_folder(data_dir: Path, resolution: int, cache_dir, settings: dict) -> Path:
    """Where the probe of these dataset files, resolution and settings is cached."""
    return Path(cache_dir) / f"probe-{dataset_hash(Path(data_dir), resolution, settings)}"


def probe_seconds(data_dir, *, resolution: int, cache_dir, seed: int = 0, crop_to_content: bool = False,
                  steps: int = PROBE_STEPS) -> float:
    """Estimated seconds of train_probe with these settings: 0 when cached; else loading the real images (timed on
    the first 16) and `steps` training steps (8 timed on random images of the resolution)."""
    from time import perf_counter

    data_dir = Path(data_dir)
    settings = probe_settings(steps, seed=seed, crop_to_content=crop_to_content)
    if (probe_folder(data_dir, resolution, cache_dir, settings) / "probe.json").exists():
        return 0.0
    paths = sorted((data_dir / "train").glob("*.png")) + sorted((data_dir / "test_reference").glob("*.png"))
    start = perf_counter()
    _load_images(paths[:16], resolution, False, crop_to_content)
    load = (perf_counter() - start) / max(min(16, len(paths)), 1) * len(paths)
    net, batch = ProbeNet(resolution, settings["width"]), settings["batch_size"]
    images, gen = torch.rand(batch, 3, resolution, resolution), torch.Generator().manual_seed(0)
    labels = {k: torch.zeros(batch, dtype=torch.long) for k in CLASSES}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    with one_thread():
        _train_loop(net, images, labels, opt, sched, 2, batch, gen, False)  # warm-up
        start = perf_counter()
        _train_loop(net, images, labels, opt, sched, 8, batch, gen, False)
    return load + steps * (perf_counter() - start) / 8


def train_probe(data_dir, *, resolution: int, cache_dir, steps: int = PROBE_STEPS, batch_size: int = 64, lr: float = 1e-2,
                width: int = 16, heldout_fraction: float = 0.1, seed: int = 0, progress: bool = True,
                crop_to_content: bool = False) -> Probe:
    """The probe for the demo dataset in `data_dir` at `resolution`: loaded from cache, else trained and cached.

    `crop_to_content`: prepare the real images as a run with that option trains on (config field of that name).

    Trains on real train images only. A `heldout_fraction` of the monsters is held out and gives
    `heldout_accuracy`; `reference_accuracy` is on test_reference/ (the test prompts' unseen combinations).
    """
    data_dir = Path(data_dir)
    attrs = load_attributes(data_dir)
    settings = probe_settings(steps, batch_size, lr, width, heldout_fraction, seed, crop_to_content)
    out = probe_folder(data_dir, resolution, cache_dir, settings)
    if (out / "probe.safetensors").exists() and (out / "probe.json").exists():
        meta = read_json(out / "probe.json")
        net = ProbeNet(resolution, width)
        net.load_state_dict(load_file(out / "probe.safetensors"))
        print(f"Reusing the probe in {out.parent.name}/{out.name} (same dataset files, resolution and settings)")
        return Probe(net.eval(), resolution, meta["heldout_accuracy"], meta["reference_accuracy"], out)

    records, _ = load_course_data(data_dir)
    records = [r for r in records if r.key in attrs]
    train_idx, held_idx = split_by_group(records, heldout_fraction, seed)
    images, labels = _real_set(records, attrs, resolution, progress, crop_to_content)
    torch.manual_seed(seed)
    net = ProbeNet(resolution, width)
    _fit(net, images[train_idx], {k: v[train_idx] for k, v in labels.items()}, steps=steps,
         batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    probe = Probe(net, resolution)
    probe.heldout_accuracy = accuracy(probe, images[held_idx], {k: v[held_idx] for k, v in labels.items()})
    probe.reference_accuracy = accuracy(probe, *_reference_set(data_dir, attrs, resolution, crop_to_content))

    atomic_save_tensors({k: v.contiguous() for k, v in net.state_dict().items()}, out / "probe.safetensors")
    meta = dict(settings, resolution=resolution, version=PROBE_VERSION, train_images=len(train_idx),
                heldout_images=len(held_idx), heldout_accuracy=probe.heldout_accuracy,
                reference_accuracy=probe.reference_accuracy)
    atomic_write_json(out / "probe.json", meta, indent=2)  # last: marks it complete
    probe.path = out
    return probe
