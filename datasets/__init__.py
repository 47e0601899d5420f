"""Datasets by name: digits and cluttered digits (embedded, real), CIFAR-10/100 and ImageNet
folders, synthetic.

`get_dataset(name, ...)` returns a `Data`: training and validation sets ready for
`datasets.pipeline.make_loader`, and what the model needs to know (num_classes,
in_channels, image_size). Each source yields untransformed samples; the pipeline applies
the transforms with a seed per (epoch, sample), so augmentation, like the sample order,
depends only on the run's seed and never on how batches are split or loaded.
"""
from collections import namedtuple

from datasets.source import (  # noqa: F401 (the package's names)
    CorruptImageError, DataError, Source, TensorSource, error_line)

DATASETS = ("digits", "cluttered_digits", "cifar10", "cifar100", "imagenet", "synthetic")

Data = namedtuple("Data", "train val num_classes in_channels image_size")


def get_dataset(name, data_path=None, image_size=None, seed=0, skip_corrupt_images=False,
                mixup_alpha=0.0, cutmix_alpha=0.0, synthetic_samples=1024,
                synthetic_num_classes=1000, clutter_options=None):
    """The named dataset's training and validation sets.

    data_path defaults to data/NAME; image_size to the dataset's own. mixup/cutmix apply to
    the training set only (targets become class probabilities when either is on).
    clutter_options: cluttered_digits' knobs by option name (clutter, clutter_size, ...; see
    cluttered_digits.OPTIONS), the rest at their defaults; image_size is its canvas size.
    """
    from datasets import cluttered_digits, digits, folders, synthetic
    from datasets.pipeline import SampleView

    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; valid: {', '.join(DATASETS)}")
    data_path = data_path or f"data/{name}"
    if name == "digits":
        source = digits.load(image_size or digits.IMAGE_SIZE)
    elif name == "cluttered_digits":
        knobs = cluttered_digits.knobs(image_size, **(clutter_options or {}))
        source = cluttered_digits.load(knobs)
    elif name in ("cifar10", "cifar100"):
        source = folders.load_cifar(name, data_path, image_size or folders.CIFAR_IMAGE_SIZE)
    elif name == "imagenet":
        source = folders.load_imagenet(data_path, image_size or folders.IMAGENET_IMAGE_SIZE)
    else:
        source = synthetic.load(synthetic_samples, synthetic_num_classes,
                                image_size or synthetic.IMAGE_SIZE)
    train = SampleView(source.train, source.train_transform, seed, source.num_classes,
                       skip_corrupt_images, mixup_alpha, cutmix_alpha)
    val = SampleView(source.val, source.val_transform, seed, source.num_classes,
                     skip_corrupt_images)
    return Data(train, val, source.num_classes, source.in_channels, source.image_size)
