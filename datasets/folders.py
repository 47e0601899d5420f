"""Datasets read from a local folder (never downloaded at run time): CIFAR-10/100, ImageNet.

CIFAR is read from the "python version" archives' pickle files (the files torchvision's
CIFAR10/CIFAR100 read), without torchvision's md5 check of every file, which rejects any
copy that is not byte-identical to the original archive (subsets, test fixtures). So that a
tampered file cannot run code, they are read with an allow-list unpickler (a dict, lists,
strings, ints and numpy arrays only), and each file's images and labels are checked.
ImageNet is torchvision's ImageFolder over train/ and val/, one folder per class.
"""
import os
import pickle

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from datasets import CorruptImageError, DataError, Source

CIFAR_IMAGE_SIZE = 32
IMAGENET_IMAGE_SIZE = 224

CIFAR = {  # folder, training files, validation files, label key, classes, mean, std
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_CROP_FRACTION = 0.875  # validation: resize to size / 0.875, centre crop


class ArraySource(Dataset):
    """(PIL image, label) from a (N, H, W, 3) uint8 array."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return Image.fromarray(self.images[index]), int(self.labels[index])


def _latin1_bytes(text, encoding):
    """Python 3 writes bytes in protocol 0-2 pickles as _codecs.encode(text, "latin1"); the
    real codecs.encode would look up whatever codec the file names, so only latin1 here."""
    if encoding != "latin1":
        raise ValueError(f"bytes encoded as {encoding!r}, not latin1")
    return text.encode("latin1")


# Every global a CIFAR file may name: what numpy's own pickles of an array or scalar call,
# named numpy.core.* by numpy 1 (the real files) and numpy._core.* by numpy 2. The callables
# are taken from numpy's reduce, which works under both without importing either name.
_reconstruct = np.zeros(1).__reduce__()[0]  # an ndarray
_frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # an ndarray in a protocol-5 pickle
_scalar = np.int64(0).__reduce__()[0]  # a numpy scalar, e.g. an np.int64 label
CIFAR_GLOBALS = {}
for _module in ("numpy.core", "numpy._core"):
    CIFAR_GLOBALS.update({(f"{_module}.multiarray", "_reconstruct"): _reconstruct,
                          (f"{_module}.multiarray", "scalar"): _scalar,
                          (f"{_module}.numeric", "_frombuffer"): _frombuffer})
CIFAR_GLOBALS.update({("numpy", "ndarray"): np.ndarray,  # the class _reconstruct builds
                      ("numpy", "dtype"): np.dtype,  # the array's element type
                      ("_codecs", "encode"): _latin1_bytes})  # bytes, Python 3, protocol <= 2


class CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only CIFAR_GLOBALS: a pickle runs whatever callable it
    names, so a tampered data file could otherwise run any code."""

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")  # Python 2 str (the real files) -> str
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in CIFAR_GLOBALS:
            raise DataError(f"cannot read CIFAR file {self.path}: it refers to {module}.{name}, "
                            f"which a CIFAR file never holds (refused: a data file must not "
                            f"run code)")
        return CIFAR_GLOBALS[module, name]


def read_cifar_file(path, label_key, num_classes):
    """(N, 3072) uint8 pixels and N labels in 0..num_classes-1 from one CIFAR pickle file;
    DataError naming the file for anything else, so that images never pair with the wrong
    labels and a bad label is not an IndexError deep in training."""
    def failure(problem):
        return DataError(f"cannot read CIFAR file {path}: {problem}")

    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as error:  # a damaged pickle can raise almost any exception type
        raise failure(f"{type(error).__name__}: {error}") from None
    if not isinstance(batch, dict):
        raise failure(f"it holds a {type(batch).__name__}, not a dict")
    # Python 2's str keys load as str; keys written as Python 3 bytes are the same keys
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise failure(f"it has no {key!r} entry (its keys: {', '.join(map(repr, batch))})")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray):
        raise failure(f"'data' is a {type(data).__name__}, not a numpy array")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise failure(f"'data' has shape {data.shape}, not (N, 3072): N images of 3x32x32 "
                      f"pixels")
    if data.dtype != np.uint8:  # other integer types are fine if every value is a pixel
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise failure(f"'data' is {data.dtype} and not pixel values 0..255")
        data = data.astype(np.uint8)
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise failure(f"{label_key!r} is a {type(labels).__name__}, not a list of integers")
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise failure(f"{label_key!r} is not a list of integers")
    if len(labels) != len(data):
        raise failure(f"it holds {len(data)} images and {len(labels)} labels; each image "
                      f"needs one")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise failure(f"image {bad[0]} has label {labels[bad[0]]}, outside 0..{num_classes - 1} "
                      f"({num_classes} classes)")
    return data, labels.astype(np.int64)


def read_cifar_files(folder, names, label_key, num_classes):
    """(N, 32, 32, 3) uint8 images and N int64 labels from the named files, in order."""
    files = [read_cifar_file(os.path.join(folder, name), label_key, num_classes)
             for name in names]
    images = np.concatenate([data for data, _ in files]).reshape(-1, 3, 32, 32)
    return images.transpose(0, 2, 3, 1), np.concatenate([labels for _, labels in files])


def load_cifar(name, data_path, image_size=CIFAR_IMAGE_SIZE):
    folder_name, train_files, val_files, label_key, num_classes, mean, std, url = CIFAR[name]
    folder = os.path.join(data_path, folder_name)
    missing = [f for f in train_files + val_files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(
            f"{name} not found: {os.path.join(folder, missing[0])} is missing; download {url} and "
            f"extract it into {data_path} (or pass --data-path)")
    resize = [transforms.Resize(image_size)] if image_size != CIFAR_IMAGE_SIZE else []
    normalise = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_transform = transforms.Compose(resize + [
        transforms.RandomCrop(image_size, padding=image_size // 8),
        transforms.RandomHorizontalFlip()] + normalise)
    return Source(ArraySource(*read_cifar_files(folder, train_files, label_key, num_classes)),
                  ArraySource(*read_cifar_files(folder, val_files, label_key, num_classes)),
                  train_transform, transforms.Compose(resize + normalise), num_classes,
                  in_channels=3, image_size=image_size)


def read_image(path):
    """An RGB PIL image; CorruptImageError naming the file if it cannot be decoded."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")  # convert() decodes the whole file
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot read image {path}: {error}", path=path) from None


def image_folder(root, data_path):
    if not os.path.isdir(root):
        raise DataError(
            f"ImageNet not found: {root} is not a folder; {data_path} must hold train/ and val/, "
            f"each with one folder of images per class (or pass --data-path)")
    try:
        return tv_datasets.ImageFolder(root, loader=read_image)
    except (FileNotFoundError, OSError) as error:  # no class folders, or no images in them
        raise DataError(f"ImageNet folder {root}: {error}") from None


def load_imagenet(data_path, image_size=IMAGENET_IMAGE_SIZE):
    train = image_folder(os.path.join(data_path, "train"), data_path)
    val = image_folder(os.path.join(data_path, "val"), data_path)
    if train.classes != val.classes:
        raise DataError(f"{data_path}: train/ has {len(train.classes)} class folders and val/ has "
                        f"{len(val.classes)}; they must have the same names")
    normalise = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()] + normalise)
    val_transform = transforms.Compose([
        transforms.Resize(round(image_size / IMAGENET_CROP_FRACTION)),
        transforms.CenterCrop(image_size)] + normalise)
    return Source(train, val, train_transform, val_transform, len(train.classes),
                  in_channels=3, image_size=image_size)
