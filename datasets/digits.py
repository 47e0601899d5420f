"""scikit-learn's 1,797 real 8x8 handwritten digits (bundled: no download), upsampled.

The offline default. A fixed stratified split keeps a fifth of the images (360) for
validation whatever the run's seed, so results of different runs are comparable.
"""
import torch
import torch.nn.functional as F
from torchvision import transforms

from datasets.source import Source, TensorSource

IMAGE_SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def split():
    """(images (1797, 1, 8, 8) in [0, 1], labels, train_index, val_index): the fixed
    stratified split every digits-based dataset uses."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # 0..16 -> 0..1
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_index, val_index = stratified_split(torch.arange(len(labels)), labels)
    return images, labels, train_index, val_index


def stratified_split(index, labels):
    """`index` split into (rest, a stratified VAL_FRACTION of it), fixed by SPLIT_SEED."""
    from sklearn.model_selection import train_test_split

    rest, held_out = train_test_split(index.numpy(), test_size=VAL_FRACTION,
                                      stratify=labels[index].numpy(), random_state=SPLIT_SEED)
    return torch.from_numpy(rest), torch.from_numpy(held_out)


def load(image_size=IMAGE_SIZE):
    images, labels, train_index, val_index = split()
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False)
    mean, std = images[train_index].mean().item(), images[train_index].std().item()
    normalise = transforms.Normalize((mean,), (std,))
    # light augmentation: shifts of up to 2 pixels (1/16 of the side) with blank padding
    train_transform = transforms.Compose([
        transforms.RandomCrop(image_size, padding=image_size // 16), normalise])
    return Source(TensorSource(images[train_index], labels[train_index]),
                  TensorSource(images[val_index], labels[val_index]),
                  train_transform, normalise, num_classes=10, in_channels=1,
                  image_size=image_size)
