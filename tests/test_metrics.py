"""helpers.metrics: skips with reasons offline, the real CLIP path on a tiny random CLIP, the sweep, metrics.json."""
import json
import math
import time

import pytest
import torch

from helpers.config import open_run
from helpers.metrics import (best_guidance, clip_scores, demo_test_set, fid_kid_is, guidance_sweep, sweep_table,
                             validation_set, write_metrics)


def tiny_clip():
    """A random 2-layer CLIP (vision 32 px) with MiniLM's offline tokenizer and a real CLIPProcessor."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from helpers.text import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=tok.vocab_size, max_position_embeddings=77,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                                         eos_token_id=tok.sep_token_id),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tok)


def images(n, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- offline: skipped with reasons, quickly


def test_inception_metrics_are_skipped_with_what_to_install():
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed here; the skip path is not reachable")
    except ImportError:
        pass
    start = time.perf_counter()
    out = fid_kid_is(images(4), images(4, 1))
    assert time.perf_counter() - start < 2
    assert set(out["skipped"]) == {"fid", "kid", "inception_score"}
    assert all("torch-fidelity" in r and "pt_inception-2015-12-05" in r for r in out["skipped"].values())
    assert "fid" not in out


@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"},
                                         {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_clip_metrics_with_the_real_model_id_are_skipped_offline(monkeypatch, tmp_path, offline_env):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache even where CLIP was downloaded
    for k, v in offline_env.items():
        monkeypatch.setenv(k, v)
    start = time.perf_counter()
    out = clip_scores(images(2), ["a red monster", "a blue monster"], images(2, 1), "openai/clip-vit-base-patch32")
    assert time.perf_counter() - start < 10  # no 30 s of download retries
    assert set(out["skipped"]) == {"clip_t", "clip_i"}
    assert all("openai/clip-vit-base-patch32" in r and "huggingface-cli download" in r for r in out["skipped"].values())
    assert "clip_t" not in out


# ---------------------------------------------------------------- the real metric code paths, tiny weights


def test_clip_scores_run_the_torchmetrics_path_on_a_tiny_clip():
    clip = tiny_clip()
    fake, real = images(6), images(6, 1)
    prompts = [f"a monster number {i}." for i in range(6)]
    out = clip_scores(fake, prompts, real, clip=clip, batch_size=4)  # two batches
    assert out["skipped"] == {}
    assert 0.0 <= out["clip_t"] <= 100.0 and math.isfinite(out["clip_t"])
    assert -1.0 <= out["clip_i"] < 0.9999
    same = clip_scores(fake, prompts, fake, clip=clip)  # every image against itself: cosine 1
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-4)
    assert "clip_i" not in clip_scores(fake, prompts, clip=clip)  # no real images: CLIP-T only
    with pytest.raises(ValueError, match="6 images, 5 prompts"):
        clip_scores(fake, prompts[:5], clip=clip)


def test_frechet_distance_via_torchmetrics_with_a_custom_tiny_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class MeanColour(torch.nn.Module):  # what the probe does, in miniature: no torch-fidelity involved
        num_features = 3

        def forward(self, x):
            return x.mean((2, 3)).double()

    real = images(64)
    shifted = (images(64, 1) + 1.0).clamp(-1, 1)
    fid = FrechetInceptionDistance(feature=MeanColour())
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert float(fid.compute()) == pytest.approx(0.0, abs=1e-6)
    fid.reset()
    fid.update(real, real=True)
    fid.update(shifted, real=False)
    assert float(fid.compute()) > 0.1


# ---------------------------------------------------------------- guidance sweep and choosing the best


def test_guidance_sweep_samples_each_scale_with_the_same_seeds_and_evaluates():
    calls = []

    def fake_sample(model, prompts, seeds, *, guidance, steps, scheduler, batch_size):
        calls.append((tuple(prompts), tuple(seeds), guidance, steps, scheduler))
        return torch.full((len(prompts), 3, 4, 4), guidance / 10)

    kept = {}
    rows = guidance_sweep(None, ["a", "b"], [7, 8], [1, 3.0], steps=5, scheduler="ddim", batch_size=2,
                          evaluate=lambda im: {"mean": float(im.mean())}, sample=fake_sample, images_out=kept,
                          progress=False)
    assert rows == [{"guidance": 1.0, "mean": pytest.approx(0.1)}, {"guidance": 3.0, "mean": pytest.approx(0.3)}]
    assert [c[1] for c in calls] == [(7, 8), (7, 8)] and [c[2] for c in calls] == [1.0, 3.0]
    assert sorted(kept) == [1.0, 3.0] and kept[3.0].shape == (2, 3, 4, 4)


def test_guidance_sweep_with_the_real_sampler_on_a_tiny_model(tmp_path):
    from helpers.model import TextToImage, load_frozen_parts, new_unet, noise_scheduler

    cfg = open_run("t", "tiny", str(tmp_path))
    text_encoder, autoencoder = load_frozen_parts(cfg, "cpu")
    model = TextToImage(cfg, new_unet(cfg, text_encoder, autoencoder).eval(), text_encoder, autoencoder,
                        dict(noise_scheduler(cfg).config))
    kept = {}
    rows = guidance_sweep(model, ["a red monster", "a blue monster"], [0, 1], [1.0, 4.0], steps=2,
                          scheduler="ddim", batch_size=2, evaluate=lambda im: {"std": float(im.std())},
                          images_out=kept, progress=False)
    assert [r["guidance"] for r in rows] == [1.0, 4.0]
    assert kept[1.0].shape == (2, 3, cfg.resolution, cfg.resolution)
    assert not torch.equal(kept[1.0], kept[4.0])  # guidance changed the images


def test_best_guidance_prefers_accuracy_then_lower_distance_then_less_guidance():
    sweep = [{"guidance": 1.0, "acc": {"mean": 0.5}, "fd": 3.0},
             {"guidance": 3.0, "acc": {"mean": 0.9}, "fd": 5.0},
             {"guidance": 5.0, "acc": {"mean": 0.9}, "fd": 4.0},
             {"guidance": 7.5, "acc": {"mean": 0.9}, "fd": 4.0}]
    assert best_guidance(sweep, "acc.mean") == 3.0  # tie without tie-break: the smaller guidance
    assert best_guidance(sweep, "acc.mean", tie_break="fd") == 5.0
    assert best_guidance(sweep, "fd", higher_is_better=False) == 1.0
    with pytest.raises(ValueError):
        best_guidance([], "fd")
    table = sweep_table(sweep, ["acc.mean", "fd"]).splitlines()
    assert table[0].split() == ["guidance", "acc.mean", "fd"] and table[4].split() == ["5", "0.900", "4.000"]


# ---------------------------------------------------------------- metrics.json


def test_write_metrics_merges_nested_values_and_writes_valid_json(tmp_path):
    write_metrics(tmp_path, {"best_guidance": 3.0, "probe": {"accuracy": {"color": 0.9}, "guidance": 3.0}})
    path = write_metrics(tmp_path, {"probe": {"frechet_distance": torch.tensor(1.5), "accuracy": {"shape": 0.8}},
                                    "validation": {"fid": float("nan")}})
    data = json.loads(path.read_text())
    assert data == {"best_guidance": 3.0, "validation": {"fid": None},
                    "probe": {"accuracy": {"color": 0.9, "shape": 0.8}, "guidance": 3.0, "frechet_distance": 1.5}}
    assert not list(tmp_path.glob("*.tmp"))
    path.write_text("{broken")
    with pytest.raises(ValueError, match="metrics.json: malformed JSON"):
        write_metrics(tmp_path, {"x": 1})


# ---------------------------------------------------------------- what is evaluated


def test_validation_set_is_one_first_frame_per_held_out_key(tmp_path, course_dir):
    from helpers.cache import write_split
    from helpers.data import load_course_data

    cfg = open_run("v", "tiny", str(tmp_path), data_dir=str(course_dir), val_fraction=0.34)
    records, _ = load_course_data(course_dir)
    split = write_split(cfg, records)
    vs = validation_set(cfg)
    assert vs.keys and all(k.split("_")[0] in split["val"] for k in vs.keys)
    assert len(set(vs.keys)) == len(vs.keys) == len({r.key for r in records if r.group in split["val"]})
    captions = {r.key: r.captions for r in records}
    assert all(p in captions[k] for k, p in zip(vs.keys, vs.prompts))
    from helpers.images import load_image_tensor
    assert torch.equal(vs.real[0], load_image_tensor(course_dir / "train" / f"{vs.keys[0]}_0.png", cfg.resolution))
    assert len(validation_set(cfg, max_images=1)) == 1 and validation_set(cfg).prompts == vs.prompts


def test_demo_test_set_pairs_prompts_with_attributes_and_reference_images(tmp_path):
    from helpers.demo_data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", num_monsters=8, num_test_monsters=2, frames_per_action=1)
    cfg = open_run("d", "tiny", str(tmp_path), data_dir=str(data))
    ts = demo_test_set(cfg)
    assert len(ts) == 12 and ts.real.shape == (12, 3, 16, 16) and len(ts.seeds) == len(set(ts.seeds)) == 12
    assert all(a["color"] in p.lower() for a, p in zip(ts.attributes, ts.prompts))
    assert len(demo_test_set(cfg, max_images=5)) == 5


# ---------------------------------------------------------------- the notebook, hw6 profile, hub unreachable


@pytest.mark.slow
def test_05_eval_on_hw6_offline_reports_every_skipped_metric(tmp_path, course_dir, monkeypatch):
    import papermill

    from helpers.cache import write_split
    from helpers.config import PROJECT_ROOT
    from helpers.data import load_course_data
    from helpers.model import noise_scheduler, save_model
    from helpers.unet import build_unet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: as on a fresh offline machine
    cfg = open_run("hw6-offline", "hw6", str(tmp_path), data_dir=str(course_dir), val_fraction=0.34)
    write_split(cfg, load_course_data(course_dir)[0])
    unet = build_unet("tiny", 4, 512, 32, seed=0)  # a stand-in trained U-Net; the CLIP text encoder is what's missing
    save_model(cfg, unet, unet, noise_scheduler(cfg))
    papermill.execute_notebook(PROJECT_ROOT / "notebooks" / "05_eval.ipynb", tmp_path / "05.ipynb",
                               parameters=dict(run_name="hw6-offline", outputs_dir=str(tmp_path)),
                               cwd=str(PROJECT_ROOT / "notebooks"), progress_bar=False)
    metrics = json.loads((cfg.run_dir / "metrics.json").read_text())
    skipped = metrics["validation"]["skipped"]
    assert set(skipped) == {"fid", "kid", "inception_score", "clip_t", "clip_i"}
    assert "torch-fidelity" in skipped["fid"] and "openai/clip-vit-base-patch32" in skipped["clip_t"]
    assert "probe" not in metrics and "best_guidance" not in metrics
    out = (tmp_path / "05.ipynb").read_text()
    assert "clip_t: SKIPPED" in out and "the model could not be loaded" in out
