"""The course's leaderboard numbers, computed locally: FID, CLIP-T and CLIP-I of a results folder.

Same models, preprocessing and formulas as the course's scorer (see docs/scoring.md):
- FID: torchvision's Inception v3 (IMAGENET1K_V1, `transform_input=False`, `fc` = identity: 2048-d pool
  features) on `Image.open(p).convert("RGB")` resized bilinearly to 299×299 and scaled to [-1, 1]; the
  generated images' mean and covariance against the course's `test_mu.npy` / `test_sigma.npy`.
- CLIP-T: the mean cosine between each image's and its prompt's L2-normalised OpenAI CLIP ViT-B/32 embedding
  (a raw cosine, about 0.3 for good results; not ×100, not clamped).
- CLIP-I: the mean cosine between each generated image and the real image of the same name.

torchvision (for Inception) and open_clip are imported only when a model is loaded: where they cannot be
imported, FID is skipped with what to install, and CLIP falls back to transformers' CLIPModel with the same
OpenAI weights and open_clip's preprocessing reproduced here. Nothing is fatal for a missing model:
`score_images` lists each metric it could not compute under "skipped" with a one-line reason.

    python -m helpers.score --results outputs/runs/<run>/results --test-json data/hw6/test.json --ref-stats data/hw6/score
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy import linalg
from torch import nn
from .progress import progress_bar

from .data import load_prompts, read_json
from .files import atomic_write, atomic_write_json, check_can_write, os_errors_end_in_one_line
from .hub import WeightsUnavailableError, load_pretrained
from .images import BadImageError
from .layout import RunLayout
from .results import results_problems

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"
CLIP_WEIGHTS = "openai/clip-vit-base-patch32"  # the transformers copy of open_clip's ViT-B-32-quickgelu "openai"
OPEN_CLIP_MODEL = "ViT-B-32-quickgelu"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
STATS_FILES = ("test_mu.npy", "test_sigma.npy")
STATS_SOURCE = "fid_stats_source.json"  # beside statistics computed here: what they were computed from
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METRICS = ("fid", "clip_t", "clip_i")


class ScorerUnavailable(RuntimeError):
    """A scoring model cannot be loaded here; the message says what to install or download."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _default_device(device=None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _open(item):
    """A path becomes an RGB PIL image, exactly as the course opens it; anything else passes through."""
    if not isinstance(item, (str, Path)):
        return item
    try:
        with Image.open(item) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{item}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{item}: cannot decode image ({e})") from None


def _batches(items: Iterable, size: int, desc: str, progress: bool):
    total = len(items) if hasattr(items, "__len__") else None
    batch = []
    with progress_bar(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                bar.update(len(batch))
                batch = []
        if batch:
            yield batch
            bar.update(len(batch))


def _normalized_tensor(im: Image.Image, mean, std) -> torch.Tensor:
    """torchvision's ToTensor then Normalize, in the same float32 steps."""
    x = torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    return x.sub(torch.tensor(mean).view(-1, 1, 1)).div(torch.tensor(std).view(-1, 1, 1))


# ---------------------------------------------------------------- FID


def fid_preprocess(im: Image.Image) -> torch.Tensor:
    """3×299×299 in [-1, 1]: the course's Resize((299, 299)) (on a PIL image: PIL bilinear), ToTensor,
    Normalize(0.5, 0.5)."""
    return _normalized_tensor(im.convert("RGB").resize((299, 299), Image.BILINEAR), (0.5,) * 3, (0.5,) * 3)


def load_inception(weights: str | None = None, device=None) -> nn.Module:
    """torchvision's Inception v3 (IMAGENET1K_V1) with `fc` = identity, in eval mode: [N, 3, 299, 299] -> [N, 2048].

    `weights`: a local `inception_v3_google-0cc3c7bd.pth` state dict; None downloads it (or takes it from the
    torch hub cache). Raises ScorerUnavailable saying what to install or download.
    """
    try:
        from torchvision.models import Inception_V3_Weights, inception_v3
    except Exception as e:  # ImportError, or RuntimeError "operator torchvision::nms does not exist" (CUDA wheel)
        raise ScorerUnavailable(
            f"FID needs torchvision, which cannot be imported here [{_first_line(e)}]: on a machine where it "
            f"works, `pip install torchvision` (the build matching your torch), then pass --inception-weights "
            f"{INCEPTION_FILE} or let it download ({INCEPTION_URL}, ~104 MB)") from None
    try:
        if weights:
            model = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        else:
            model = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1, transform_input=False)
    except Exception as e:  # a failed download: URLError, OSError, RuntimeError...
        where = f"from {weights}" if weights else f"(download of {INCEPTION_URL} failed)"
        raise ScorerUnavailable(
            f"FID needs the Inception v3 weights {INCEPTION_FILE} (~104 MB), which could not be loaded {where} "
            f"[{_first_line(e)}]: download that file on a machine with internet and pass "
            f"--inception-weights FILE (or put it in {torch.hub.get_dir()}/checkpoints/)") from None
    model.fc = nn.Identity()
    return model.eval().requires_grad_(False).to(_default_device(device))


def _module_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def inception_features(images, model: nn.Module, *, batch_size: int = 50, device=None, progress: bool = True,
                       preprocess: Callable = fid_preprocess) -> np.ndarray:
    """[N, F] float64 features of `images` (PIL images or paths; F = 2048 for Inception).

    Any module giving a fixed-size vector per image works (tests use a small stand-in); `preprocess`
    maps one image to the module's input (default: the course's FID preprocessing).
    """
    device = torch.device(device) if device else _module_device(model)
    model.to(device)
    out = []
    for batch in _batches(images, batch_size, "Inception features", progress):
        x = torch.stack([preprocess(_open(im)) for im in batch]).to(device)
        out.append(model(x).reshape(len(batch), -1).double().cpu())
    if not out:
        raise ValueError("no images to compute features of")
    return torch.cat(out).numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The course's `np.mean(axis=0)` and `np.cov(rowvar=False)`."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature statistics need an [N, F] array with N >= 2, got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The course's formula: |mu1 - mu2|² + trace(sigma1 + sigma2 - 2·sqrtm(sigma1·sigma2)), real part of sqrtm."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    n = len(mu1)
    if mu2.shape != (n,) or sigma1.shape != (n, n) or sigma2.shape != (n, n):
        raise ValueError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape} (features from different models?)")
    diff = mu1 - mu2
    # the course calls sqrtm(..., disp=False)[0]: the same matrix (SciPy 1.18 drops `disp`), and no warning either:
    # a singular product is expected when a stage of the selection judges fewer prompts than there are features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            # Only for degenerate statistics (a few images, rank-deficient covariances), where sqrtm can return NaN:
            # pytorch-fid's remedy, a 1e-6 ridge on both covariances. Full-size runs never take this branch.
            ridge = np.eye(n) * 1e-6
            covmean = linalg.sqrtm((sigma1 + ridge).dot(sigma2 + ridge))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1 + sigma2 - 2 * covmean))


def _load_array(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found (the course gives it in public_data/score/)")
    try:
        return np.load(path, allow_pickle=False).astype(np.float64)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a numpy .npy array ({_first_line(e)})") from None


SYMMETRY_TOLERANCE = 1e-6  # max |sigma - sigma.T| relative to max |sigma|: np.cov is symmetric to ~1e-16


def load_reference_stats(stats_dir) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from `<stats_dir>/test_mu.npy` and `test_sigma.npy`, checked: mu a [D] vector, sigma [D, D],
    every value finite, sigma symmetric within SYMMETRY_TOLERANCE. A ValueError names the file and the problem
    (otherwise a NaN surfaces as "Internal error in scipy.linalg.sqrtm")."""
    mu_path, sigma_path = (Path(stats_dir) / name for name in STATS_FILES)
    mu, sigma = _load_array(mu_path), _load_array(sigma_path)
    if mu.ndim != 1 or len(mu) == 0:
        raise ValueError(f"{mu_path}: expected a vector of feature means, got shape {mu.shape}")
    if sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{sigma_path}: expected shape {(len(mu), len(mu))} to match {mu_path.name}, "
                         f"got {sigma.shape}")
    for path, array in ((mu_path, mu), (sigma_path, sigma)):
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise ValueError(f"{path}: {bad} of {array.size} values are NaN or infinite: not usable FID statistics "
                             f"(copy the course's file again)")
    asymmetry = float(np.abs(sigma - sigma.T).max()) / max(float(np.abs(sigma).max()), np.finfo(float).tiny)
    if asymmetry > SYMMETRY_TOLERANCE:
        raise ValueError(f"{sigma_path}: not a covariance matrix: not symmetric (max |sigma - sigma.T| is "
                         f"{asymmetry:.1e} of its largest value, tolerance {SYMMETRY_TOLERANCE:g})")
    return mu, sigma


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder of real images not found")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no PNG/JPG images in it")
    return files


def _save_array(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save adds no ".npy" to the temporary name
            np.save(f, array)

    atomic_write(path, write)


def reference_stats_from_folder(real_dir, out_dir, model: nn.Module, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the real images in `real_dir`, computed like the course's, saved as test_mu.npy and
    test_sigma.npy in `out_dir` and reused while the folder, its file list (names, sizes) and the model's class
    are unchanged.

    `kw` goes to `inception_features`. Statistics in `out_dir` that were not computed here (the course's)
    are never overwritten.
    """
    real_dir, out_dir = Path(real_dir), Path(out_dir)
    files = _image_files(real_dir)
    source = {"real_dir": str(real_dir.resolve()), "features": type(model).__name__,
              "files": [[f.name, f.stat().st_size] for f in files]}
    source_path = out_dir / STATS_SOURCE
    stats_there = any((out_dir / name).exists() for name in STATS_FILES)
    if stats_there and not source_path.exists():
        raise ValueError(f"{out_dir}: holds {' / '.join(STATS_FILES)} that were not computed from a folder here "
                         f"(the course's?); refusing to overwrite them: choose another folder for the statistics")
    if stats_there and read_json(source_path) == source and all((out_dir / n).exists() for n in STATS_FILES):
        print(f"Reusing the FID reference statistics in {out_dir} ({len(files)} images of {real_dir}, unchanged)")
        return load_reference_stats(out_dir)
    print(f"Recomputing the FID reference statistics in {out_dir} (the images in {real_dir} changed; replacing "
          f"the old ones)" if stats_there else
          f"Computing the FID reference statistics of {len(files)} images in {real_dir} into {out_dir}")
    mu, sigma = feature_statistics(inception_features(files, model, **kw))
    for name, array in zip(STATS_FILES, (mu, sigma)):
        _save_array(out_dir / name, array)
    atomic_write_json(source_path, source)
    return mu, sigma


# ---------------------------------------------------------------- CLIP-T and CLIP-I


def _resized_shorter_side(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(size) output (width, height): the shorter side becomes `size`, the longer is truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def clip_preprocess(im: Image.Image, size: int = 224) -> torch.Tensor:
    """open_clip's preprocessing for the OpenAI models, in PIL: Resize(size, bicubic) of the shorter side,
    CenterCrop(size), ToTensor, Normalize(OpenAI mean, std). 3×size×size."""
    im = im.convert("RGB")
    width, height = _resized_shorter_side(*im.size, size)
    if (width, height) != im.size:  # torchvision returns the image untouched when the size already fits
        im = im.resize((width, height), Image.BICUBIC)
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return _normalized_tensor(im.crop((left, top, left + size, top + size)), OPENAI_MEAN, OPENAI_STD)


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features, older versions tensors."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """L2-normalised CLIP embeddings of images and texts, as the course's scorer computes them.

    `backend` is "open_clip" (the course's own code) or "transformers" (the same OpenAI weights, open_clip's
    preprocessing and 77-token truncation reproduced).
    """

    def __init__(self, backend: str, encode_image: Callable, encode_text: Callable, preprocess: Callable,
                 tokenize: Callable, device=None, batch_size: int = 64, progress: bool = True):
        self.backend, self.device = backend, torch.device(device or "cpu")
        self.encode_image, self.encode_text = encode_image, encode_text
        self.preprocess, self.tokenize = preprocess, tokenize
        self.batch_size, self.progress = batch_size, progress

    @classmethod
    def from_transformers(cls, model, tokenizer, device=None, context_length: int = 77, **kw) -> "ClipScorer":
        model = model.eval().requires_grad_(False).to(device or "cpu")
        size = model.config.vision_config.image_size

        def tokenize(texts):
            return tokenizer(list(texts), padding="max_length", max_length=context_length, truncation=True,
                             return_tensors="pt")["input_ids"]

        return cls("transformers", lambda x: _pooled(model.get_image_features(pixel_values=x)),
                   lambda ids: _pooled(model.get_text_features(input_ids=ids)),
                   lambda im: clip_preprocess(im, size), tokenize, device, **kw)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """[N, D] float32 on the CPU, unit length; `images` are PIL images or paths."""
        out = [self.encode_image(torch.stack([self.preprocess(_open(im)) for im in batch]).to(self.device))
               for batch in _batches(images, self.batch_size, "CLIP images", self.progress)]
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts) -> torch.Tensor:
        out = [self.encode_text(self.tokenize(batch).to(self.device))
               for batch in _batches(list(texts), self.batch_size, "CLIP texts", self.progress)]
        return F.normalize(torch.cat(out).float().cpu(), dim=-1)


def _open_clip_scorer(weights: str, device) -> ClipScorer:
    import open_clip

    pretrained = "openai" if weights == CLIP_WEIGHTS else weights
    model, _, preprocess = open_clip.create_model_and_transforms(OPEN_CLIP_MODEL, pretrained=pretrained,
                                                                 device=device)
    model = model.eval().requires_grad_(False)
    return ClipScorer("open_clip", model.encode_image, model.encode_text, preprocess,
                      open_clip.get_tokenizer(OPEN_CLIP_MODEL), device)


def _transformers_scorer(weights: str, device) -> ClipScorer:
    from transformers import AutoTokenizer, CLIPModel

    what = "CLIP model (for CLIP-T / CLIP-I)"
    try:
        model = load_pretrained(CLIPModel.from_pretrained, weights, what)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, weights, "CLIP tokenizer (for CLIP-T)")
    except (OSError, ValueError) as e:  # a local folder that is not a CLIP model
        raise WeightsUnavailableError(f"Cannot load the {what} from {weights} [{_first_line(e)}]") from None
    return ClipScorer.from_transformers(model, tokenizer, device)


def load_clip_scorer(weights: str = CLIP_WEIGHTS, device=None) -> ClipScorer:
    """open_clip's ViT-B-32-quickgelu "openai" (course-exact) when open_clip imports, else transformers'
    CLIPModel of `weights` (a hub id or local folder). A `.pt`/`.bin` file goes to open_clip as its weights.
    Raises ScorerUnavailable with what to download or install."""
    device = _default_device(device)
    note = ""
    if weights == CLIP_WEIGHTS or Path(weights).is_file():
        try:
            return _open_clip_scorer(weights, device)
        except ImportError as e:
            note = (f" (open_clip, the course's own backend, is not importable here [{_first_line(e)}]: "
                    f"`pip install open_clip_torch` where torchvision works)")
        except Exception as e:  # torchvision's RuntimeError, a failed download...
            note = f" (open_clip failed too: {_first_line(e)})"
    if Path(weights).is_file():
        raise ScorerUnavailable(f"CLIP weights file {weights} needs open_clip{note}")
    try:
        return _transformers_scorer(weights, device)
    except WeightsUnavailableError as e:
        raise ScorerUnavailable(f"{str(e).splitlines()[0]}{note}") from None


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum(-1).mean())


def _same_length(**lists) -> None:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("different lengths: " + ", ".join(f"{n} {k}" for k, n in lengths.items()))


# ---------------------------------------------------------------- all three


def score_images(images: list, prompts: list[str], *, reference_stats=None, real_images=None, inception=None,
                 clip: ClipScorer | None = None, progress: bool = True) -> dict:
    """{"fid", "clip_t", "clip_i", "images", "clip_backend", "skipped": {metric: reason}}.

    `images` (PIL or paths) and `prompts` in the same order; `reference_stats` = (mu, sigma); `real_images`
    the real image of each entry (CLIP-I). A metric without its model or input is None and in "skipped".
    """
    images = list(images)
    _same_length(images=images, prompts=prompts, **({} if real_images is None else {"real_images": real_images}))
    out = {"fid": None, "clip_t": None, "clip_i": None, "images": len(images),
           "clip_backend": clip.backend if clip else None, "skipped": {}}
    skipped = out["skipped"]
    if inception is None:
        skipped["fid"] = "no Inception model given (helpers.score.load_inception)"
    elif reference_stats is None:
        skipped["fid"] = "no reference statistics (the course's test_mu.npy / test_sigma.npy) given"
    elif len(images) < 2:
        skipped["fid"] = f"FID needs at least 2 images, got {len(images)}"
    else:
        features = inception_features(images, inception, progress=progress)
        out["fid"] = frechet_distance(*feature_statistics(features), *reference_stats)
    no_clip = "no CLIP model given (helpers.score.load_clip_scorer)"
    if real_images is None:
        skipped["clip_i"] = ("no real images to compare with (locally only on the validation split: "
                             "the real test images are not public)")
    elif clip is None:
        skipped["clip_i"] = no_clip
    if clip is None:
        skipped["clip_t"] = no_clip
        return out
    embeddings = clip.image_embeddings(images)
    out["clip_t"] = _mean_cosine(embeddings, clip.text_embeddings(prompts))
    if real_images is not None:
        out["clip_i"] = _mean_cosine(embeddings, clip.image_embeddings(real_images))
    return out


def _fid_reference(reference_stats_dir, real_dir, model, device) -> tuple[tuple, Path]:
    """((mu, sigma), folder): the course's statistics when given, else those of `real_dir` (computed once)."""
    if reference_stats_dir is not None:
        stats_dir = Path(reference_stats_dir)
        not_ours = (stats_dir / STATS_FILES[0]).exists() and not (stats_dir / STATS_SOURCE).exists()
        if real_dir is None or not_ours:
            if real_dir is not None:
                print(f"FID against the statistics in {stats_dir}; {real_dir} is used for CLIP-I only")
            return load_reference_stats(stats_dir), stats_dir
    stats_dir = Path(reference_stats_dir) if reference_stats_dir is not None else Path(real_dir) / ".fid_stats"
    return reference_stats_from_folder(real_dir, stats_dir, model, device=device), stats_dir


def score_results(results_dir, test_json, *, reference_stats_dir=None, real_dir=None, inception_weights=None,
                  clip_weights: str = CLIP_WEIGHTS, size: int | None = 256, device=None) -> dict:
    """Score a results folder like the course: refuse it (ValueError listing every problem) where the course
    would, then `score_images` with every model that loads here ("skipped" says why for the others).

    FID is against `reference_stats_dir` (test_mu.npy / test_sigma.npy) or, without it, against the images
    of `real_dir` (statistics kept in `<real_dir>/.fid_stats/`). CLIP-I compares each result with
    `<real_dir>/<image_name>`.
    """
    prompts = load_prompts(test_json)
    problems = results_problems(results_dir, prompts, size, require_manifest=False)
    real = None if real_dir is None else [Path(real_dir) / p.image_name for p in prompts]
    problems += [f"real image missing: {p}" for p in real or [] if not p.is_file()]
    if problems:
        shown = problems[:50] + ([f"… and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise ValueError(f"{results_dir}: {len(problems)} problem(s) against {test_json}:\n  " + "\n  ".join(shown))
    device = _default_device(device)
    reasons, inception, reference, stats_dir, clip = {}, None, None, None, None
    if reference_stats_dir is None and real_dir is None:
        reasons["fid"] = ("no reference statistics: pass --ref-stats DIR holding the course's test_mu.npy and "
                          "test_sigma.npy (public_data/score/), or --real DIR of real images")
    else:
        try:
            inception = load_inception(inception_weights, device)
            reference, stats_dir = _fid_reference(reference_stats_dir, real_dir, inception, device)
        except (ScorerUnavailable, OSError, ValueError) as e:
            reasons["fid"] = str(e).splitlines()[0]
    try:
        clip = load_clip_scorer(clip_weights, device)
    except ScorerUnavailable as e:
        reasons.update({"clip_t": str(e), **({"clip_i": str(e)} if real is not None else {})})
    results_dir = Path(results_dir)
    out = score_images([results_dir / p.image_name for p in prompts], [p.text for p in prompts],
                       reference_stats=reference, real_images=real, inception=inception, clip=clip)
    out["skipped"].update(reasons)  # the real reason, rather than "no model given"
    return {**out, "fid_reference": None if stats_dir is None else str(stats_dir)}


def scores_as_text(result: dict) -> str:
    """The scores, one per line, then one "metric: SKIPPED: reason" line per skipped metric."""
    lines = [f"{result['images']} images, CLIP backend: {result.get('clip_backend') or '-'}"]
    for name in METRICS:
        value = result.get(name)
        lines.append(f"  {name:<7}{value:>10.4f}" if value is not None else f"  {name:<7}{'SKIPPED':>10}")
    order = sorted(result["skipped"], key=lambda n: METRICS.index(n) if n in METRICS else len(METRICS))
    lines += [f"{name}: SKIPPED: {result['skipped'][name]}" for name in order]
    return "\n".join(lines)


def _one_line(message: str) -> str:
    head, *rest = str(message).splitlines() or [""]
    return head + (" " + "; ".join(r.strip() for r in rest) if rest else "")


def out_problem(out: Path, results: Path) -> str | None:
    """Why the score JSON must not be written at `out` (None: fine): never into the results folder it scores
    (which must hold only its PNGs) nor over an image."""
    if out.suffix.lower() in IMAGE_SUFFIXES:
        return f"is an image file name ({out.suffix}); the scores are JSON: give a .json path"
    if out.resolve().is_relative_to(results.resolve()):
        return f"is inside the results folder {results}, which must hold only its images: write it elsewhere"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.score", description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="folder of one PNG per test.json entry")
    parser.add_argument("--test-json", required=True, help="the course's test.json (or one in its format)")
    parser.add_argument("--ref-stats", help="folder with the course's test_mu.npy and test_sigma.npy")
    parser.add_argument("--real", help="folder of real images named like the results (CLIP-I; FID without --ref-stats)")
    parser.add_argument("--inception-weights", help=f"local {INCEPTION_FILE} (else downloaded)")
    parser.add_argument("--clip-weights", default=CLIP_WEIGHTS, help="hub id or local folder (default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="required image size; 0: any (default %(default)s)")
    parser.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    parser.add_argument("--out", help="JSON file to write (default: score.json beside the results folder)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else RunLayout(Path(args.results).resolve().parent).score
    refused = out_problem(out, Path(args.results))
    if refused:
        print(f"helpers.score: --out {out}: {refused}", file=sys.stderr)
        return 2
    with os_errors_end_in_one_line("helpers.score"):
        check_can_write(out)  # before the scoring, which can take many minutes
    try:
        result = score_results(args.results, args.test_json, reference_stats_dir=args.ref_stats, real_dir=args.real,
                               inception_weights=args.inception_weights, clip_weights=args.clip_weights,
                               size=args.size or None, device=args.device)
    except (ValueError, OSError) as e:  # a bad folder, test.json or image (BadImageError is a ValueError)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(scores_as_text(result))
    replaced = out.exists()
    with os_errors_end_in_one_line("helpers.score"):  # atomic: a failed write leaves the old file, or none
        atomic_write_json(out, result, indent=2)
    print(f"wrote {out}" + (" (replacing the previous one)" if replaced else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
