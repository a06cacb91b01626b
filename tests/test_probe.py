"""helpers.probe: the demo's offline judge must read real monsters reliably, and its distance must mean something."""
import pytest
import torch

from helpers.demo_data import make_demo_dataset
from helpers.images import load_image_tensor
from helpers.judges import ProbeJudge
from helpers.probe import CLASSES, GATED, label_indices, train_probe

# Small enough to train in seconds on 2 CPU cores, large enough that every colour meets 3 shapes in training.
DEMO = dict(num_monsters=48, num_test_monsters=8, frames_per_action=2, resolution=16)
STEPS = 250


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = make_demo_dataset(root / "demo", **DEMO)
    probe = train_probe(data, resolution=16, cache_dir=root / "cache", steps=STEPS, progress=False)
    return data, root / "cache", probe


def reference(data):
    """test_reference/: real pictures of the held-out (colour, shape) combinations, with their attributes."""
    import json

    attrs = json.loads((data / "attributes.json").read_text())
    paths = sorted((data / "test_reference").glob("*.png"))
    return torch.stack([load_image_tensor(p, 16) for p in paths]), [attrs[p.stem] for p in paths]


def test_probe_reads_held_out_real_monsters_and_unseen_combinations(demo):
    _, _, probe = demo
    for attr in GATED:
        assert probe.heldout_accuracy[attr] >= 0.95, (attr, probe.heldout_accuracy)
        assert probe.reference_accuracy[attr] >= 0.95, (attr, probe.reference_accuracy)
    assert set(probe.heldout_accuracy) == set(CLASSES)  # eyes and extra are reported too, not gated


def accuracy(probe, images, attrs) -> dict:
    """The judge's accuracy of `images` against the attributes their prompts asked for."""
    return ProbeJudge(probe, attrs, images).evaluate(images)["accuracy"]


def test_the_judges_accuracy_compares_against_the_prompts_attributes(demo):
    data, _, probe = demo
    images, attrs = reference(data)
    right = ProbeJudge(probe, attrs, images).evaluate(images)
    assert right["mean_accuracy"] >= 0.95
    colours = list(CLASSES["color"])
    wrong = [dict(a, color=colours[(colours.index(a["color"]) + 1) % len(colours)]) for a in attrs]
    assert accuracy(probe, images, wrong)["color"] <= 0.1
    with pytest.raises(ValueError, match="3 images but 2"):
        ProbeJudge(probe, attrs[:2], images).per_prompt(images[:3])
    with pytest.raises(ValueError, match="'color'.*known values"):
        label_indices([dict(attrs[0], color="magenta")])


def test_the_judges_frechet_distance_is_near_zero_for_real_vs_real_and_large_for_noise(demo):
    data, _, probe = demo
    images, attrs = reference(data)
    real = torch.cat([images] * (256 // len(images) + 1))[:256]  # the real pictures each judged prompt has
    attrs = (attrs * (256 // len(attrs) + 1))[:256]

    def distance(reals, fakes, asked):
        return ProbeJudge(probe, asked, reals).evaluate(fakes)["frechet_distance"]
    same = distance(real, real, attrs)
    noise = distance(real, torch.rand_like(real) * 2 - 1, attrs)
    train = torch.stack([load_image_tensor(p, 16) for p in sorted((data / "train").glob("*.png"))[:256]])
    halves = distance(train[0::2], train[1::2], attrs[:128])  # two samples of the same distribution
    assert same < 1e-3
    assert noise > 20 * halves, (halves, noise)
    with pytest.raises(ValueError, match="at least 2"):
        distance(real[:1], real[:1], attrs[:1])


def test_probe_is_cached_per_dataset_and_settings(demo, capsys):
    data, cache, probe = demo
    again = train_probe(data, resolution=16, cache_dir=cache, steps=STEPS, progress=False)
    assert "Reusing the probe" in capsys.readouterr().out
    assert again.path == probe.path and again.heldout_accuracy == probe.heldout_accuracy
    x = reference(data)[0]
    assert torch.equal(again.predict(x)["shape"], probe.predict(x)["shape"])
    assert (probe.path / "probe.safetensors").exists()
    from helpers.probe import dataset_hash
    settings = dict(steps=STEPS)
    assert dataset_hash(data, 16, settings) != dataset_hash(data, 32, settings)
    assert dataset_hash(data, 16, settings) != dataset_hash(data, 16, dict(steps=STEPS + 1))


def test_probe_reads_images_at_another_resolution_and_feeds_the_sweep(demo):
    data, _, probe = demo
    images, attrs = reference(data)
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")  # e.g. 32 px samples
    assert accuracy(probe, big, attrs)["color"] >= 0.9
    row = ProbeJudge(probe, attrs, images).evaluate(images)
    mean = sum(row["accuracy"][a] for a in GATED) / len(GATED)
    assert row["frechet_distance"] < 1e-3 and row["mean_accuracy"] == pytest.approx(mean)
    assert probe.features(images).shape == (len(images), probe.net.num_features)
