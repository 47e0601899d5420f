"""Cluttered digits: the construction (geometry, determinism, disjoint splits, labels),
its registration as a dataset with its knobs as options, and `python -m train` on it."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from datasets import DataError, cluttered_digits, digits, get_dataset
from datasets.cluttered_digits import DEFAULTS, build, make_canvases, paste
from train.__main__ import main
from train.build import resolve_config
from train.config import config_names, global_batch_size, load_configs

SMALL = DEFAULTS._replace(train_samples=64, val_samples=32)


def labelled_constants(values, labels):
    """8x8 digits that are constant squares, so a canvas's pixels say which digit it shows."""
    images = torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 8, 8)
    return images.contiguous(), torch.tensor(labels)


def test_paste_scales_and_places_a_patch():
    patch = torch.ones(1, 1, 8, 8)
    canvas = paste(patch, 32, torch.tensor([2.0]), torch.tensor([[4.0, 6.0]]))[0, 0]
    # the 16x16 square with its top-left corner at x=4, y=6: columns 4..19, rows 6..21
    expected = torch.zeros(32, 32)
    expected[6:22, 4:20] = 1.0
    inner = torch.zeros(32, 32, dtype=torch.bool)
    inner[7:21, 5:19] = True  # away from the bilinear edge
    torch.testing.assert_close(canvas[inner], expected[inner])
    outer = torch.ones(32, 32, dtype=torch.bool)
    outer[5:23, 3:21] = False
    assert canvas[outer].abs().max() == 0


def test_paste_is_bilinear_grid_sampling():
    """The separable form gives what grid_sample gives for the same scale and placement."""
    generator = torch.Generator().manual_seed(0)
    patches = torch.rand(50, 1, 3, 5, generator=generator)
    scale = 0.7 + 3 * torch.rand(50, generator=generator)
    corner = 30 * torch.rand(50, 2, generator=generator) - 5  # partly off the canvas too
    theta = torch.zeros(50, 2, 3)
    theta[:, 0, 0] = 32 / (5 * scale)
    theta[:, 1, 1] = 32 / (3 * scale)
    theta[:, 0, 2] = (16 - corner[:, 0] - 5 * scale / 2) * 2 / (5 * scale)
    theta[:, 1, 2] = (16 - corner[:, 1] - 3 * scale / 2) * 2 / (3 * scale)
    grid = F.affine_grid(theta, (50, 1, 32, 32), align_corners=False)
    expected = F.grid_sample(patches, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
    torch.testing.assert_close(paste(patches, 32, scale, corner), expected, rtol=0, atol=1e-5)


def test_same_seed_same_canvases_other_seed_others():
    first, again = build(SMALL), build(SMALL)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = build(SMALL._replace(seed=1))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[2], other[2])
    assert first[0].shape == (64, 1, 32, 32) and first[2].shape == (32, 1, 32, 32)
    assert first[0].min() >= 0 and first[0].max() <= 1


@pytest.mark.parametrize("poisoned", ["train", "val"])
def test_splits_come_from_disjoint_source_digits(monkeypatch, poisoned):
    """One side's digits are NaN: NaN spreads through sampling, maximum and clamping, so a
    single pixel taken from them would make the other side's canvases non-finite."""
    images, labels = labelled_constants([0.5] * 30, [i % 10 for i in range(30)])
    train_index, val_index = torch.arange(20), torch.arange(20, 30)
    images[train_index if poisoned == "train" else val_index] = float("nan")
    monkeypatch.setattr(digits, "split", lambda: (images, labels, train_index, val_index))
    train, _, val, _ = build(SMALL)
    clean, dirty = (val, train) if poisoned == "train" else (train, val)
    assert torch.isfinite(clean).all()
    assert torch.isnan(dirty).any()  # the poison does show where it is used


def test_validation_canvases_do_not_depend_on_the_training_count():
    train, _, val, val_labels = build(SMALL)
    more = build(SMALL._replace(train_samples=100))
    assert torch.equal(more[2], val) and torch.equal(more[3], val_labels)
    assert torch.equal(build(SMALL._replace(val_samples=8))[0], train)


def test_label_is_the_class_of_the_placed_digit():
    # digit k is the constant (k + 1) / 10 with label k; with no clutter and no noise a
    # canvas's brightest pixel (inside the scaled digit) names its digit
    values = [(k + 1) / 10 for k in range(10)]
    images, labels = labelled_constants(values, list(range(10)))
    knobs = SMALL._replace(clutter=0, noise=0.0)
    canvases, canvas_labels, which = make_canvases(images, labels, 200, knobs,
                                                   torch.Generator().manual_seed(0))
    brightest = canvases.amax(dim=(1, 2, 3))
    torch.testing.assert_close(brightest, (canvas_labels + 1) / 10)
    assert len(canvas_labels.unique()) == 10
    assert torch.equal(labels[which], canvas_labels)


def test_clutter_adds_pixels_from_other_digits():
    images, labels = labelled_constants([0.5, 1.0], [0, 1])
    knobs = SMALL._replace(clutter=3, noise=0.0)
    canvases, canvas_labels, _ = make_canvases(images, labels, 100, knobs,
                                               torch.Generator().manual_seed(0))
    # the brighter digit's patches stay visible on the dimmer digit's canvases (patches are
    # combined by maximum): every such canvas holds the value of the other digit
    dim = canvases[canvas_labels == 0]
    assert len(dim) > 20
    assert ((dim - 1.0).abs() < 1e-6).flatten(1).any(1).all()


@pytest.mark.parametrize("change,message", [
    ({"scale_max": 5.0}, "40 pixels wide, larger than the 32-pixel canvas"),
    ({"scale_min": 3.5, "scale_max": 3.0}, "clutter_scale_min <= clutter_scale_max"),
    ({"clutter_size": 9}, "clutter_size must be 1..8"),
    ({"noise": -0.1}, "must be >= 0"),
])
def test_impossible_knobs_raise_one_line(change, message):
    with pytest.raises(DataError, match=message) as error:
        cluttered_digits.check(SMALL._replace(**change))
    assert "\n" not in str(error.value)


def test_holdout_splits_the_training_digits_and_never_shows_a_validation_digit(monkeypatch):
    images, labels, train_index, val_index = digits.split()
    rest, held_out = digits.stratified_split(train_index, labels)
    assert (len(rest), len(held_out)) == (1149, 288)
    assert sorted(torch.cat([rest, held_out]).tolist()) == sorted(train_index.tolist())
    assert torch.bincount(labels[held_out]).min() >= 28  # every class, about a fifth of each
    drawn = []

    def record(side_images, side_labels, count, knobs, generator):
        drawn.append(side_images)
        return make_canvases(side_images, side_labels, count, knobs, generator)

    monkeypatch.setattr(cluttered_digits, "make_canvases", record)
    canvases = build(SMALL._replace(holdout=True))
    assert torch.equal(drawn[0], images[rest]) and torch.equal(drawn[1], images[held_out])
    assert canvases[2].shape == (SMALL.val_samples, 1, 32, 32)
    assert not torch.equal(canvases[2], build(SMALL)[2])
    config = resolve_config("cluttered_digits_preact_resnet20_batch", {"clutter_holdout": True})
    assert cluttered_digits.knobs(**cluttered_digits.options_of(config)).holdout


def test_more_validation_canvases_show_the_validation_digits_anew():
    knobs = SMALL._replace(clutter=0, noise=0.0)
    images, labels, _, val_index = digits.split()
    canvases, canvas_labels, which = cluttered_digits.more_validation(knobs, 300, stream=0)
    assert canvases.shape == (300, 1, 32, 32)
    assert torch.equal(canvas_labels, labels[val_index][which])
    assert len(which.unique()) > 200  # most of the 360 validation digits
    # without clutter or noise a canvas is its digit scaled and placed: its brightest pixel
    # is at most the digit's, and its ink comes from that digit alone
    assert (canvases.amax(dim=(1, 2, 3)) <= images[val_index][which].amax(dim=(1, 2, 3))
            + 1e-6).all()
    again, _, _ = cluttered_digits.more_validation(knobs, 300, stream=0)
    other, _, _ = cluttered_digits.more_validation(knobs, 300, stream=1)
    assert torch.equal(again, canvases) and not torch.equal(other, canvases)
    validation = build(knobs)[2]
    assert not any(torch.equal(canvas, validation[0]) for canvas in canvases)
    with pytest.raises(ValueError, match="stream must be >= 0"):
        cluttered_digits.more_validation(knobs, 1, stream=-1)


def test_registered_with_its_knobs_as_options():
    options = {"clutter": 2, "clutter_size": 2, "clutter_scale_min": 1.0,
               "clutter_scale_max": 2.0, "clutter_noise": 0.0, "clutter_train_samples": 48,
               "clutter_val_samples": 16, "clutter_seed": 3}
    data = get_dataset("cluttered_digits", image_size=24, clutter_options=options)
    assert (len(data.train), len(data.val)) == (48, 16)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 24)
    image, label, _ = data.train[(0, 5)]
    assert image.shape == (1, 24, 24) and label in range(10)
    canvases = build(cluttered_digits.knobs(24, **options))
    assert torch.equal(data.train.source.images, canvases[0])
    # normalised by the training canvases' statistics, the same for validation
    mean, std = canvases[0].mean(), canvases[0].std()
    torch.testing.assert_close(data.val[(0, 3)][0], (canvases[2][3] - mean) / std)
    default = get_dataset("cluttered_digits", clutter_options={"clutter_train_samples": 64,
                                                               "clutter_val_samples": 32})
    assert default.image_size == 32 and torch.equal(default.val.source.images, build(SMALL)[2])
    with pytest.raises(TypeError, match="unknown cluttered_digits options: clutters"):
        cluttered_digits.knobs(clutters=2)


def test_configs_cover_every_norm_at_global_batch_64():
    configs = load_configs()
    names = [name for name in config_names(configs) if name.startswith("cluttered_digits_")]
    norms = {resolve_config(name, configs=configs)["norm"] for name in names}
    assert norms == {"batch", "sync_batch", "group", "layer", "instance", "group_pn",
                     "layer_pn", "none"}
    for name in names:
        config = resolve_config(name, configs=configs)
        assert (config["data"], config["model"]) == ("cluttered_digits", "cifar_preact_resnet20")
        assert global_batch_size(config) == 64


def train(run_dir, *flags, config="cluttered_digits_preact_resnet20_group_pn"):
    return main(["--config", config, "--output-dir", str(run_dir), "--wandb-mode", "disabled",
                 *[str(flag) for flag in flags]])


def test_train_runs_on_cluttered_digits(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, "--max-steps", 2, "--clutter-train-samples", 128,
                 "--clutter-val-samples", 64, "--clutter", 2) == 0
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 2 and summary["status"] == "max_steps"
    assert summary["epochs"] == 1  # 128 canvases: two global batches of 64
    assert summary["val_accuracy"] is not None
    config = summary["config"]
    assert (config["clutter_train_samples"], config["clutter_val_samples"]) == (128, 64)
    assert config["clutter"] == 2 and config["clutter_size"] == DEFAULTS.clutter_size
    out = capsys.readouterr().out
    assert "on cluttered_digits (128 training, 64 validation images)" in out


@pytest.mark.parametrize("flags, message", [
    (["--clutter-scale-max", 5],
     "error: a digit scaled by clutter_scale_max=5.0 is 40 pixels wide, larger than the "
     "32-pixel canvas (image_size)"),
    (["--image-size", 16],
     "error: a digit scaled by clutter_scale_max=3.0 is 24 pixels wide, larger than the "
     "16-pixel canvas (image_size)"),
    (["--clutter-scale-min", 2.5, "--clutter-scale-max", 2],
     "error: clutter scales must satisfy 0 < clutter_scale_min <= clutter_scale_max, got 2.5 "
     "and 2.0"),
    (["--clutter-size", 9], "error: --clutter-size must be >= 1 and <= 8, got 9"),
    (["--clutter-noise", -1], "error: --clutter-noise must be >= 0, got -1.0"),
])
def test_impossible_knobs_on_the_command_line_are_one_line(tmp_path, capsys, flags, message):
    assert train(tmp_path / "run", *flags) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [message]
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_sample_grid(tmp_path):
    path = tmp_path / "grid.png"
    cluttered_digits.save_grid(str(path), SMALL, rows=2, cols=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["grid.png"]
