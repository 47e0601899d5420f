"""What every dataset module builds on: `Source` (untransformed samples and their
transforms), `TensorSource`, and the errors bad data raises. Its own module, below
datasets/__init__.py, so that the dataset modules need not import the package that
imports them."""
from collections import namedtuple

from torch.utils.data import Dataset

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
