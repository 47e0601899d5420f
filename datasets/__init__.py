"""Datasets by name: digits and cluttered digits (embedded, real), CIFAR-10/100 and ImageNet
folders, synthetic.

`get_dataset(name, ...)` returns a `Data`: training and validation sets ready for
`datasets.pipeline.make_loader`, and what the model needs to know (num_classes,
in_channels, image_size). Each source yields untransformed samples; the pipeline applies
the transforms with a seed per (epoch, sample), so augmentation, like the sample order,
depends only on the run's seed and never on how batches are split or loaded.
"""
from collections import namedtuple

from torch.utils.data import Dataset

DATASETS = ("digits", "cluttered_digits", "cifar10", "cifar100", "imagenet", "synthetic")

Data = namedtuple("Data", "train val num_classes in_channels image_size")
# What a dataset module loads: untransformed training/validation samples and their transforms.
Source = namedtuple("Source", "train val train_transform val_transform num_classes in_channels "
                              "image_size")


class DataError(Exception):
    """The data the user pointed at is missing or unreadable: printed as one line."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names the file.

    One positional argument, as the DataLoader re-raises a worker's exception with its
    message only.
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def error_line(error):
    """The one-line message of an error, for the app's one-line reports: its first line, or
    its type's name when it has no message. A DataLoader worker's error arrives wrapped in
    its traceback ('Caught ErrorType in DataLoader worker process 0.' ... 'module.ErrorType:
    message'): its last line, without the type."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    if not (lines[0].startswith("Caught ") and "Traceback" in str(error)):
        return lines[0]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return lines[-1][len(prefix):] if lines[-1].startswith(prefix) else lines[-1]


class TensorSource(Dataset):
    """(images[i], labels[i]) from tensors in memory."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


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
