"""helpers.score: the course's FID / CLIP-T / CLIP-I formulas and preprocessing, stand-in models, the folder
checks and the CLI, all offline."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.score import (OPENAI_MEAN, OPENAI_STD, STATS_SOURCE, ClipScorer, ScorerUnavailable,
                           clip_preprocess, feature_statistics, fid_preprocess, frechet_distance,
                           inception_features, load_clip_scorer, load_inception, load_reference_stats, main,
                           reference_stats_from_folder, score_images, score_results)
from helpers.results import results_problems
from conftest import sprite


def random_stats(n=200, d=8, seed=0, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale + shift
    return feature_statistics(features)


def independent_fd(mu1, s1, mu2, s2):
    """trace sqrtm(s1 s2) = Σ sqrt(eigenvalues of sqrt(s1) s2 sqrt(s1)), a symmetric problem: eigh only."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ s2 @ root
    ev = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(ev, 0, None))))


# ---------------------------------------------------------------- the Fréchet distance


def test_frechet_distance_equals_an_independent_eigenvalue_route_and_is_symmetric():
    a, b = random_stats(seed=0), random_stats(seed=1, shift=0.3, scale=1.5)
    fd = frechet_distance(*a, *b)
    assert fd == pytest.approx(independent_fd(*a, *b), rel=1e-6) and fd > 1
    assert frechet_distance(*b, *a) == pytest.approx(fd, rel=1e-9)
    assert abs(frechet_distance(*a, *a)) < 1e-9 * np.trace(a[1])
    with pytest.raises(ValueError, match="different shapes"):
        frechet_distance(a[0], a[1], np.zeros(7), np.eye(7))


def test_frechet_distance_of_diagonal_covariances_has_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # 5 + (1 + 0 + 4)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    assert expected == 10.0


def test_feature_statistics_are_numpys_mean_and_cov():
    features = np.random.default_rng(3).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    np.testing.assert_array_equal(mu, np.mean(features.astype(np.float64), axis=0))
    np.testing.assert_array_equal(sigma, np.cov(features.astype(np.float64), rowvar=False))
    assert sigma.shape == (6, 6) and mu.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


# ---------------------------------------------------------------- preprocessing


def known_image(size=(256, 256), mode="RGB", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] = [250, 20, 120]  # a flat half and a noisy half: any filter change shows
    return Image.fromarray(arr, "RGB").convert(mode)


def test_fid_preprocess_is_pil_bilinear_to_299_scaled_to_minus_one_one():
    im = known_image()
    x = fid_preprocess(im)
    expected = np.asarray(im.resize((299, 299), Image.BILINEAR), np.float64).transpose(2, 0, 1) / 127.5 - 1
    assert x.shape == (3, 299, 299) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    bicubic = np.asarray(im.resize((299, 299), Image.BICUBIC), np.float64).transpose(2, 0, 1) / 127.5 - 1
    assert np.abs(x.numpy() - bicubic).max() > 0.05  # the filter is really bilinear
    assert float(fid_preprocess(Image.new("RGB", (64, 64), "white")).min()) == 1.0
    assert float(fid_preprocess(Image.new("RGB", (64, 64), "black")).max()) == -1.0


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_fid_and_clip_preprocess_convert_any_mode_to_rgb(mode):
    im = known_image(mode=mode)
    assert torch.equal(fid_preprocess(im), fid_preprocess(im.convert("RGB")))
    assert torch.equal(clip_preprocess(im), clip_preprocess(im.convert("RGB")))


def test_clip_preprocess_is_bicubic_shorter_side_then_center_crop_with_openai_normalisation():
    im = known_image((300, 200))
    x = clip_preprocess(im, 224)
    # shorter side 200 -> 224, longer int(224 * 300 / 200) = 336; crop left round((336 - 224) / 2) = 56
    crop = np.asarray(im.resize((336, 224), Image.BICUBIC), np.float64)[:, 56:280] / 255
    expected = ((crop - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)).transpose(2, 0, 1)
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    square = known_image((224, 224))  # already the size: no resampling at all
    np.testing.assert_allclose(clip_preprocess(square).numpy()[0],
                               (np.asarray(square, np.float64)[..., 0] / 255 - OPENAI_MEAN[0]) / OPENAI_STD[0],
                               atol=1e-5)


# ---------------------------------------------------------------- FID with a stand-in feature module


class StandInFeatures(torch.nn.Module):
    """A fixed random conv and average pooling in place of Inception: 299×299 in, 8 features out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=13, stride=13)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


def write_sprites(folder, n, seed=0, size=32):
    return [sprite(folder / f"{i}_main.png", seed=seed + i, size=size, mode="RGB") for i in range(n)]


def write_noise(folder, n, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}_main.png")
    return sorted(folder.iterdir())


def test_fid_pipeline_with_a_stand_in_module_is_zero_for_the_same_images_and_large_for_noise(tmp_path):
    model = StandInFeatures()
    real = write_sprites(tmp_path / "real", 24)
    noise = write_noise(tmp_path / "noise", 24)
    real_features = inception_features(real, model, batch_size=10, progress=False)  # 3 batches
    assert real_features.shape == (24, 8) and real_features.dtype == np.float64
    pils = [Image.open(p) for p in real]
    np.testing.assert_allclose(inception_features(pils, model, progress=False), real_features, rtol=1e-6)
    stats = feature_statistics(real_features)
    same = frechet_distance(*stats, *stats)
    far = frechet_distance(*feature_statistics(inception_features(noise, model, progress=False)), *stats)
    assert abs(same) < 1e-9 and far > 0.1


def test_reference_stats_from_folder_writes_reuses_recomputes_and_never_overwrites_the_courses(tmp_path, capsys):
    model = StandInFeatures()
    real = tmp_path / "real"
    write_sprites(real, 6)
    mu, sigma = reference_stats_from_folder(real, tmp_path / "stats", model, progress=False)
    assert "Computing" in capsys.readouterr().out
    loaded = load_reference_stats(tmp_path / "stats")
    np.testing.assert_array_equal(loaded[0], mu) and np.testing.assert_array_equal(loaded[1], sigma)
    assert json.loads((tmp_path / "stats" / STATS_SOURCE).read_text())["features"] == "StandInFeatures"
    reference_stats_from_folder(real, tmp_path / "stats", model, progress=False)
    assert "Reusing" in capsys.readouterr().out
    sprite(real / "extra.png", seed=99, size=32, mode="RGB")
    mu2, _ = reference_stats_from_folder(real, tmp_path / "stats", model, progress=False)
    assert "Recomputing" in capsys.readouterr().out and not np.array_equal(mu, mu2)
    course = tmp_path / "course_stats"
    course.mkdir()
    np.save(course / "test_mu.npy", mu)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        reference_stats_from_folder(real, course, model, progress=False)


def test_load_reference_stats_names_a_missing_file_or_a_bad_shape(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_mu.npy: file not found"):
        load_reference_stats(tmp_path)
    np.save(tmp_path / "test_mu.npy", np.zeros(4))
    np.save(tmp_path / "test_sigma.npy", np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"test_sigma.npy: expected shape \(4, 4\)"):
        load_reference_stats(tmp_path)
    (tmp_path / "test_sigma.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="test_sigma.npy: not a numpy .npy array"):
        load_reference_stats(tmp_path)


def test_load_inception_without_torchvision_is_a_one_line_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as on a machine where it cannot be imported
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ScorerUnavailable) as e:
        load_inception("inception_v3_google-0cc3c7bd.pth")
    assert "torchvision" in str(e.value) and "inception_v3_google-0cc3c7bd.pth" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- CLIP with a tiny CLIP built in-process


def tiny_clip(seed=0):
    """A random 2-layer CLIP (vision 32 px) with MiniLM's offline WordPiece tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from helpers.text import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=tok.vocab_size, max_position_embeddings=77,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                                         eos_token_id=tok.sep_token_id),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    return CLIPModel(config).eval(), tok


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer.from_transformers(*tiny_clip(), batch_size=3, progress=False)  # batches of 3: several


def noise_images(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = [f"a monster number {i}. The monster is attacking." for i in range(7)]


def clip_t(images, prompts, scorer) -> float:
    """CLIP-T as the scorer computes it (helpers.score.score_images)."""
    return score_images(images, prompts, clip=scorer, progress=False)["clip_t"]


def clip_i(images, real_images, scorer) -> float:
    """CLIP-I as the scorer computes it (helpers.score.score_images)."""
    return score_images(images, [""] * len(images), real_images=real_images, clip=scorer, progress=False)["clip_i"]


def test_clip_i_of_images_with_themselves_is_one(scorer):
    images = noise_images(7)
    assert scorer.backend == "transformers"
    assert clip_i(images, images, scorer) == pytest.approx(1.0, abs=1e-6)
    assert clip_i(images, noise_images(7, seed=1), scorer) < 0.9999


def test_clip_t_is_the_mean_raw_cosine_computed_by_hand(scorer):
    model, tok = tiny_clip()
    images = noise_images(7)
    with torch.no_grad():
        pixels = torch.stack([clip_preprocess(im, 32) for im in images])
        img = model.get_image_features(pixel_values=pixels).pooler_output
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        txt = model.get_text_features(input_ids=ids).pooler_output
    cosines = torch.nn.functional.cosine_similarity(img, txt, dim=-1).double()
    value = clip_t(images, PROMPTS, scorer)
    assert value == pytest.approx(float(cosines.mean()), abs=1e-6)
    assert -1 <= value <= 1  # a cosine, not 100 × cosine
    assert scorer.image_embeddings(images).norm(dim=-1).sub(1).abs().max() < 1e-6
    with pytest.raises(ValueError, match="7 images, 6 prompts"):
        clip_t(images, PROMPTS[:6], scorer)


def test_clip_t_is_not_clamped_at_zero():
    model, tok = tiny_clip()
    flipped = ClipScorer.from_transformers(model, tok, progress=False)
    encode_text = flipped.encode_text
    flipped.encode_text = lambda ids: -encode_text(ids)  # every cosine changes sign
    images = noise_images(7)
    positive = clip_t(images, PROMPTS, ClipScorer.from_transformers(model, tok, progress=False))
    assert clip_t(images, PROMPTS, flipped) == pytest.approx(-positive, abs=1e-6) and positive != 0


def test_load_clip_scorer_reads_a_local_transformers_folder_and_explains_a_bad_one(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    model, tok = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    loaded = load_clip_scorer(str(tmp_path / "clip"), device="cpu")
    images = noise_images(2)
    assert loaded.backend == "transformers"
    ref = ClipScorer.from_transformers(model, tok, progress=False)
    loaded.progress = False
    assert torch.allclose(loaded.image_embeddings(images), ref.image_embeddings(images), atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScorerUnavailable, match="empty") as e:
        load_clip_scorer(str(tmp_path / "empty"))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- score_images / score_results / CLI


def test_score_images_computes_all_three_with_stand_in_models_and_skips_what_is_missing(tmp_path, scorer):
    real = write_sprites(tmp_path / "real", 6)
    fake = write_sprites(tmp_path / "fake", 6, seed=50)
    stats = reference_stats_from_folder(tmp_path / "real", tmp_path / "stats", StandInFeatures(), progress=False)
    out = score_images(fake, PROMPTS[:6], reference_stats=stats, real_images=real, inception=StandInFeatures(),
                       clip=scorer, progress=False)
    assert out["skipped"] == {} and out["images"] == 6 and out["clip_backend"] == "transformers"
    assert out["fid"] > 0 and -1 <= out["clip_t"] <= 1
    fakes = scorer.image_embeddings(fake).double()
    assert out["clip_i"] == pytest.approx(float((fakes * scorer.image_embeddings(real).double()).sum(-1).mean()), abs=1e-9)
    assert out["clip_t"] == pytest.approx(float((fakes * scorer.text_embeddings(PROMPTS[:6]).double()).sum(-1).mean()),
                                          abs=1e-9)
    bare = score_images(fake, PROMPTS[:6], progress=False)
    assert bare["fid"] is None and set(bare["skipped"]) == {"fid", "clip_t", "clip_i"}


@pytest.fixture
def results(tmp_path, course_dir):
    """A results folder of 256×256 PNGs for the conftest course test.json (12 entries)."""
    from helpers.data import load_prompts

    prompts = load_prompts(course_dir / "test.json")
    for i, p in enumerate(prompts):
        sprite(tmp_path / "results" / p.image_name, seed=i, size=256, mode="RGB")
    return tmp_path / "results", course_dir / "test.json", prompts


def test_results_folder_problems_name_missing_extra_and_wrong_size_pngs(results):
    folder, test_json, prompts = results
    assert results_problems(folder, prompts, require_manifest=False) == []
    (folder / "0_main.png").unlink()
    sprite(folder / "99_main.png", seed=0, size=256, mode="RGB")
    sprite(folder / "1_main.png", seed=0, size=128, mode="RGB")
    (folder / "notes.txt").write_text("not a PNG: the course counts PNGs only")
    problems = results_problems(folder, prompts, require_manifest=False)
    assert problems == [f"{len(prompts)} PNGs, test.json names {len(prompts)} images", "missing: 0_main.png",
                        "unexpected file: 99_main.png (not in test.json; move it out of the folder)",
                        "1_main.png: size 128×128, expected 256×256"]
    assert results_problems(folder, prompts, size=None, require_manifest=False) == problems[:3]
    with pytest.raises(ValueError, match="4 problem") as e:
        score_results(folder, test_json)
    assert "missing: 0_main.png" in str(e.value) and "99_main.png" in str(e.value)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No torchvision, no open_clip, an empty Hugging Face cache and no hub: a fresh offline machine."""
    for name in ("torchvision", "torchvision.models", "open_clip"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_stats(folder, d=4):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "test_mu.npy", np.zeros(d))
    np.save(folder / "test_sigma.npy", np.eye(d))
    return folder


def test_score_results_offline_skips_every_metric_with_a_one_line_reason(results, offline, tmp_path):
    folder, test_json, _ = results
    start = time.perf_counter()
    out = score_results(folder, test_json, reference_stats_dir=write_stats(tmp_path / "score"), real_dir=folder)
    assert time.perf_counter() - start < 10
    assert out["fid"] is None and out["clip_t"] is None and out["images"] == 12
    assert set(out["skipped"]) == {"fid", "clip_t", "clip_i"}
    assert all("\n" not in r and "Traceback" not in r for r in out["skipped"].values())
    assert "torchvision" in out["skipped"]["fid"]
    assert "huggingface-cli download openai/clip-vit-base-patch32" in out["skipped"]["clip_t"]
    assert "open_clip_torch" in out["skipped"]["clip_t"]
    no_ref = score_results(folder, test_json)
    assert "--ref-stats" in no_ref["skipped"]["fid"] and "validation split" in no_ref["skipped"]["clip_i"]


def test_cli_exits_0_printing_skipped_lines_and_writes_json(results, offline, tmp_path, capsys):
    folder, test_json, _ = results
    out_json = tmp_path / "score.json"
    argv = ["--results", str(folder), "--test-json", str(test_json), "--ref-stats", str(write_stats(tmp_path / "s")),
            "--out", str(out_json)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fid: SKIPPED: " in printed and "clip_t: SKIPPED: " in printed and "clip_i: SKIPPED: " in printed
    data = json.loads(out_json.read_text())
    assert data["images"] == 12 and data["fid"] is None and set(data["skipped"]) == {"fid", "clip_t", "clip_i"}
    assert main(argv) == 0 and "replacing the previous one" in capsys.readouterr().out


def test_cli_exits_2_with_one_line_naming_a_bad_test_json_or_folder(results, tmp_path, capsys):
    folder, _, _ = results
    bad = tmp_path / "bad.json"
    bad.write_text('{"0_main": ')
    assert main(["--results", str(folder), "--test-json", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.json: malformed JSON at line 1" in err and "\n" not in err
    (folder / "0_main.png").unlink()
    assert main(["--results", str(folder), "--test-json", str(results[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing: 0_main.png" in err and "\n" not in err


@pytest.mark.slow
def test_python_dash_m_helpers_score_runs_as_a_program(tmp_path):
    bad = tmp_path / "missing.json"
    run = subprocess.run([sys.executable, "-m", "helpers.score", "--results", str(tmp_path), "--test-json",
                          str(bad)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "missing.json: file not found" in run.stderr and "Traceback" not in run.stderr


def test_frechet_distance_of_degenerate_statistics_is_finite():
    """Two real and three generated images: rank-deficient covariances, where plain sqrtm can return NaN."""
    rng = np.random.default_rng(0)
    real = np.abs(rng.normal(size=(2, 8))) * [1, 1, 0, 1, 1, 0, 1, 1]
    mu1, s1 = feature_statistics(real)
    mu2, s2 = feature_statistics(rng.normal(size=(3, 8)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # like the course's sqrtm(disp=False): no "Matrix is singular" under a cell
        fd = frechet_distance(mu2, s2, mu1, s1)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-4)
