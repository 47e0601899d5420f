"""The cluttered-digits construction: geometry, determinism, disjoint splits, labels."""
import pytest
import torch

from datasets import DataError, cluttered_digits, digits
from datasets.cluttered_digits import DEFAULTS, build, make_canvases, paste

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


def test_same_seed_same_canvases_other_seed_others():
    first, again = build(SMALL), build(SMALL)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = build(SMALL._replace(seed=1))
    assert not torch.equal(first[0], other[0])
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


def test_label_is_the_class_of_the_placed_digit():
    # digit k is the constant (k + 1) / 10 with label k; with no clutter and no noise a
    # canvas's brightest pixel (inside the scaled digit) names its digit
    values = [(k + 1) / 10 for k in range(10)]
    images, labels = labelled_constants(values, list(range(10)))
    knobs = SMALL._replace(clutter=0, noise=0.0)
    canvases, canvas_labels = make_canvases(images, labels, 200, knobs,
                                            torch.Generator().manual_seed(0))
    brightest = canvases.amax(dim=(1, 2, 3))
    torch.testing.assert_close(brightest, (canvas_labels + 1) / 10)
    assert len(canvas_labels.unique()) == 10


def test_clutter_adds_pixels_from_other_digits():
    images, labels = labelled_constants([0.5, 1.0], [0, 1])
    knobs = SMALL._replace(clutter=3, noise=0.0)
    canvases, canvas_labels = make_canvases(images, labels, 100, knobs,
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
