"""Datasets read from a local folder (never downloaded at run time): CIFAR-10/100, ImageNet.

CIFAR is read from the "python version" archives' pickle files (the files torchvision's
CIFAR10/CIFAR100 read), without torchvision's md5 check of every file, which rejects any
copy that is not byte-identical to the original archive (subsets, test fixtures).
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


def read_cifar_files(folder, names, label_key):
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[label_key])
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
            raise DataError(f"cannot read CIFAR file {path}: {error}") from None
    return np.concatenate(images).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


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
    return Source(ArraySource(*read_cifar_files(folder, train_files, label_key)),
                  ArraySource(*read_cifar_files(folder, val_files, label_key)),
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
