"""Cluttered digits: a harder offline benchmark built from scikit-learn's real digits.

In the spirit of Cluttered MNIST (Jaderberg et al. 2015): each canvas holds one real 8x8
digit, scaled and placed at random, plus patches cut from other digits at the same scale
(pieces of strokes as thick as the digit's, anywhere, also over it) and Gaussian noise;
the label is the whole digit's class. Training and validation canvases are built from the
two sides of the digits dataset's fixed stratified split, so no validation digit (nor a
patch of one) is ever seen in training. The construction is seeded by `clutter_seed` alone,
so every run, whatever its own seed, trains and validates on the same canvases, and each
side has its own stream, so the validation canvases do not change with the number of
training canvases. `clutter_holdout` is for tuning a recipe without looking at the
validation digits: it splits the training digits again (a fixed stratified fifth) and
validates on canvases of that fifth, training on canvases of the rest. It is vectorised
(two batched matmuls per layer of the canvas) and kept in memory, never on disk.

`python -m datasets.cluttered_digits --grid docs/cluttered_digits.png` draws samples.
"""
import argparse
import os
from collections import namedtuple

import torch

from datasets.source import DataError, Source, TensorSource

DIGIT_SIZE = 8  # scikit-learn's digits are 8x8

Knobs = namedtuple("Knobs", "canvas_size scale_min scale_max clutter clutter_size noise "
                            "train_samples val_samples seed holdout")
DEFAULTS = Knobs(canvas_size=32, scale_min=1.5, scale_max=3.0, clutter=4, clutter_size=3,
                 noise=0.1, train_samples=10000, val_samples=2000, seed=0, holdout=False)
# The knobs as training options (configs.yml keys and flags): option name -> Knobs field.
# The canvas size is the option image_size.
OPTIONS = {"clutter": "clutter", "clutter_size": "clutter_size",
           "clutter_scale_min": "scale_min", "clutter_scale_max": "scale_max",
           "clutter_noise": "noise", "clutter_train_samples": "train_samples",
           "clutter_val_samples": "val_samples", "clutter_seed": "seed",
           "clutter_holdout": "holdout"}


def options_of(config):
    """A training config's cluttered-digits options, by their names in OPTIONS."""
    return {name: config[name] for name in OPTIONS}


def knobs(image_size=None, **options):
    """Knobs from training options (names as in OPTIONS); the rest keep their defaults."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown cluttered_digits options: {', '.join(sorted(unknown))}")
    return DEFAULTS._replace(canvas_size=image_size or DEFAULTS.canvas_size,
                             **{OPTIONS[name]: value for name, value in options.items()})


def check(knobs):
    """One clear line for a knob no canvas can satisfy."""
    if not 0 < knobs.scale_min <= knobs.scale_max:
        raise DataError(f"clutter scales must satisfy 0 < clutter_scale_min <= "
                        f"clutter_scale_max, got {knobs.scale_min} and {knobs.scale_max}")
    largest = DIGIT_SIZE * knobs.scale_max
    if largest > knobs.canvas_size:
        raise DataError(f"a digit scaled by clutter_scale_max={knobs.scale_max} is "
                        f"{largest:g} pixels wide, larger than the {knobs.canvas_size}-pixel "
                        f"canvas (image_size)")
    if not 1 <= knobs.clutter_size <= DIGIT_SIZE:
        raise DataError(f"clutter_size must be 1..{DIGIT_SIZE} (pixels of an 8x8 digit), "
                        f"got {knobs.clutter_size}")
    if knobs.clutter < 0 or knobs.noise < 0:
        raise DataError(f"clutter and clutter_noise must be >= 0, got {knobs.clutter} and "
                        f"{knobs.noise}")
    if knobs.train_samples < 1 or knobs.val_samples < 1:
        raise DataError("clutter_train_samples and clutter_val_samples must be >= 1")


def tent(canvas_size, length, scale, start):
    """(P, canvas_size, length): the bilinear weight of patch pixel j at canvas pixel r, for
    P patches of `length` pixels scaled by `scale` (P,) and starting at pixel `start` (P,)."""
    canvas_centres = torch.arange(canvas_size) + 0.5
    position = (canvas_centres - start[:, None]) / scale[:, None]  # in patch pixels
    return (1 - (position[:, :, None] - (torch.arange(length) + 0.5)).abs()).clamp(min=0)


def paste(patches, canvas_size, scale, corner):
    """Each (P, 1, h, w) patch scaled by `scale` (P,) and placed with its top-left corner at
    `corner` (P, 2) pixels (x, y) on a blank canvas; bilinear, zero outside the patch.

    What grid_sample (bilinear, zero padding, align_corners=False) gives for an axis-aligned
    scale and shift, computed as rows @ patch @ cols^T: a scale and a shift make bilinear
    interpolation separable, and two small matmuls are several times faster than building
    and sampling a full grid per patch.
    """
    _, _, height, width = patches.shape
    rows = tent(canvas_size, height, scale, corner[:, 1])
    cols = tent(canvas_size, width, scale, corner[:, 0])
    return (rows @ patches[:, 0] @ cols.transpose(1, 2))[:, None]


def make_canvases(images, labels, count, knobs, generator):
    """`count` canvases, each one of `images` (N, 1, 8, 8) in [0, 1], scaled and placed,
    under `knobs.clutter` patches cut from the others, plus noise; their labels; and which
    of `images` each shows."""
    size = knobs.canvas_size

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    def corners(extent):  # top-left corners keeping an extent-pixel square on the canvas
        return uniform(0, 1, len(extent), 2) * (size - extent)[:, None]

    which = torch.randint(len(images), (count,), generator=generator)
    scale = uniform(knobs.scale_min, knobs.scale_max, count)
    canvas = paste(images[which], size, scale, corners(DIGIT_SIZE * scale))
    if knobs.clutter:
        n, side = count * knobs.clutter, knobs.clutter_size
        donor = torch.randint(len(images), (n,), generator=generator)
        # a donor other than the canvas's own digit, so clutter never repeats the answer
        own = which.repeat_interleave(knobs.clutter)
        donor = torch.where(donor == own, (donor + 1) % len(images), donor)
        top = torch.randint(DIGIT_SIZE - side + 1, (n, 2), generator=generator)
        rows = (top[:, 1, None] + torch.arange(side))[:, :, None]
        cols = (top[:, 0, None] + torch.arange(side))[:, None, :]
        patches = images[donor, 0][torch.arange(n)[:, None, None], rows, cols][:, None]
        patch_scale = scale.repeat_interleave(knobs.clutter)  # pieces at their digit's scale
        clutter = paste(patches, size, patch_scale, corners(side * patch_scale))
        canvas = torch.maximum(canvas, clutter.view(count, knobs.clutter, size, size)
                               .amax(dim=1, keepdim=True))
    noisy = canvas + knobs.noise * torch.randn(canvas.shape, generator=generator)
    return noisy.clamp(0, 1), labels[which], which


def sides(knobs):
    """(images, labels, train_index, val_index): the digits and the indices of the two sides
    of their split (with `knobs.holdout`, of the training side's own split)."""
    from datasets import digits  # here: it imports torchvision, which `--help` can do without

    check(knobs)
    images, labels, train_index, val_index = digits.split()
    if knobs.holdout:
        train_index, val_index = digits.stratified_split(train_index, labels)
    return images, labels, train_index, val_index


def stream_generator(knobs, stream):
    """The generator of one stream of canvases: 0 the training side, 1 the validation side,
    2 on more validation canvases (more_validation)."""
    return torch.Generator().manual_seed((knobs.seed * 1_000_003 + stream) % 2 ** 63)


def build(knobs=DEFAULTS):
    """(train_images, train_labels, val_images, val_labels): canvases from the two sides of
    the digits split, each side under its own generator stream."""
    images, labels, *indices = sides(knobs)
    built = []
    for stream, (index, count) in enumerate(zip(indices, (knobs.train_samples,
                                                          knobs.val_samples))):
        built += make_canvases(images[index], labels[index], count, knobs,
                               stream_generator(knobs, stream))[:2]
    return tuple(built)


def more_validation(knobs, count, stream):
    """(images, labels, digits): `count` new canvases of the validation digits, drawn as the
    validation set's are, from stream 2 + `stream` (stream >= 0; each stream its own
    canvases); digits: which validation digit each shows (0 .. number of them - 1). Not
    normalised. For measuring how much a validation set's size limits its accuracies
    (analysis.validation_noise)."""
    if stream < 0:
        raise ValueError(f"stream must be >= 0, got {stream}")
    images, labels, _, val_index = sides(knobs)
    return make_canvases(images[val_index], labels[val_index], count, knobs,
                         stream_generator(knobs, 2 + stream))


_cache = {}


def load_canvases(knobs=DEFAULTS):
    """build(knobs), built once per process (a run, or a test session, asks again)."""
    if knobs not in _cache:
        _cache[knobs] = build(knobs)
    return _cache[knobs]


def load(knobs=DEFAULTS):
    from torchvision import transforms  # here, as in build()

    train_images, train_labels, val_images, val_labels = load_canvases(knobs)
    mean, std = train_images.mean().item(), train_images.std().item()
    normalise = transforms.Normalize((mean,), (std,))
    return Source(TensorSource(train_images, train_labels),
                  TensorSource(val_images, val_labels), normalise, normalise,
                  num_classes=10, in_channels=1, image_size=knobs.canvas_size)


def save_grid(path, knobs=DEFAULTS, rows=4, cols=8):
    """A PNG of the first rows x cols training canvases of `knobs`, each titled with its
    label, pixels upscaled without smoothing; written to a temporary name, then renamed."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to touch

    images, labels, _, _ = load_canvases(knobs)
    figure = Figure(figsize=(1.2 * cols, 1.4 * rows))
    axes = figure.subplots(rows, cols, squeeze=False)
    for axis, image, label in zip(axes.flat, images, labels):
        axis.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(str(int(label)), fontsize=11)
        axis.axis("off")
    figure.tight_layout(pad=0.3)
    temporary = f"{path}.tmp"
    figure.savefig(temporary, dpi=100, format="png")
    os.replace(temporary, path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m datasets.cluttered_digits",
        description="Draw cluttered-digits samples (the default knobs) with their labels.")
    parser.add_argument("--grid", required=True, metavar="PNG", help="the image to write")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--cols", type=int, default=8)
    args = parser.parse_args(argv)
    save_grid(args.grid, rows=args.rows, cols=args.cols)
    print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
