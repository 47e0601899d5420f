"""Cluttered digits: a harder offline benchmark built from scikit-learn's real digits.

In the spirit of Cluttered MNIST (Jaderberg et al. 2015): each canvas holds one real 8x8
digit, scaled and placed at random, plus patches cut from other digits and Gaussian noise;
the label is the whole digit's class. Training and validation canvases are built from the
two sides of the digits dataset's fixed stratified split, so no validation digit (nor a
patch of one) is ever seen in training. The construction is seeded by `clutter_seed` alone,
so every run, whatever its own seed, trains and validates on the same canvases. It is
vectorised (one grid_sample per layer of the canvas) and kept in memory, never on disk.
"""
from collections import namedtuple

import torch
import torch.nn.functional as F
from torchvision import transforms

from datasets import DataError, Source, TensorSource
from datasets import digits

DIGIT_SIZE = 8  # scikit-learn's digits are 8x8

Knobs = namedtuple("Knobs", "canvas_size scale_min scale_max clutter clutter_size noise "
                            "train_samples val_samples seed")
DEFAULTS = Knobs(canvas_size=32, scale_min=1.5, scale_max=3.0, clutter=6, clutter_size=4,
                 noise=0.15, train_samples=10000, val_samples=2000, seed=0)


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


def paste(patches, canvas_size, scale, corner):
    """Each (P, 1, h, w) patch scaled by `scale` (P,) and placed with its top-left corner at
    `corner` (P, 2) pixels (x, y) on a blank canvas; bilinear, zero outside the patch."""
    count, _, height, width = patches.shape
    # affine_grid maps canvas coordinates in [-1, 1] to patch coordinates in [-1, 1]
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = canvas_size / (width * scale)
    theta[:, 1, 1] = canvas_size / (height * scale)
    centre = corner + torch.stack([width * scale, height * scale], dim=1) / 2
    theta[:, 0, 2] = (canvas_size / 2 - centre[:, 0]) * 2 / (width * scale)
    theta[:, 1, 2] = (canvas_size / 2 - centre[:, 1]) * 2 / (height * scale)
    grid = F.affine_grid(theta, (count, 1, canvas_size, canvas_size), align_corners=False)
    return F.grid_sample(patches, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def make_canvases(images, labels, count, knobs, generator):
    """`count` canvases, each one of `images` (N, 1, 8, 8) in [0, 1], scaled and placed,
    under `knobs.clutter` patches cut from the others, plus noise; and their labels."""
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
        patch_scale = uniform(knobs.scale_min, knobs.scale_max, n)
        clutter = paste(patches, size, patch_scale, corners(side * patch_scale))
        canvas = torch.maximum(canvas, clutter.view(count, knobs.clutter, size, size)
                               .amax(dim=1, keepdim=True))
    noisy = canvas + knobs.noise * torch.randn(canvas.shape, generator=generator)
    return noisy.clamp(0, 1), labels[which]


def build(knobs=DEFAULTS):
    """(train_images, train_labels, val_images, val_labels): canvases from the two sides of
    the digits split, the validation side under its own generator stream."""
    check(knobs)
    images, labels, train_index, val_index = digits.split()
    generator = torch.Generator().manual_seed(knobs.seed)
    train = make_canvases(images[train_index], labels[train_index], knobs.train_samples,
                          knobs, generator)
    val = make_canvases(images[val_index], labels[val_index], knobs.val_samples, knobs,
                        generator)
    return (*train, *val)


_cache = {}


def load(knobs=DEFAULTS):
    if knobs not in _cache:
        _cache[knobs] = build(knobs)
    train_images, train_labels, val_images, val_labels = _cache[knobs]
    mean, std = train_images.mean().item(), train_images.std().item()
    normalise = transforms.Normalize((mean,), (std,))
    return Source(TensorSource(train_images, train_labels),
                  TensorSource(val_images, val_labels), normalise, normalise,
                  num_classes=10, in_channels=1, image_size=knobs.canvas_size)
