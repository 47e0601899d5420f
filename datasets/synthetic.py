"""Random images and labels for throughput work: no files, no decoding.

A fixed pool of random images is reused, so producing a sample costs a lookup and the
loader never limits the measured speed.
"""
import torch
from torch.utils.data import Dataset

from datasets.source import Source

IMAGE_SIZE = 224
IN_CHANNELS = 3
POOL_SIZE = 64


class SyntheticSource(Dataset):
    def __init__(self, num_samples, num_classes, pool):
        self.num_samples, self.num_classes, self.pool = num_samples, num_classes, pool

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        return self.pool[index % len(self.pool)], index % self.num_classes


def load(num_samples, num_classes, image_size=IMAGE_SIZE):
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL_SIZE, IN_CHANNELS, image_size, image_size, generator=generator)
    return Source(SyntheticSource(num_samples, num_classes, pool),
                  SyntheticSource(max(1, num_samples // 4), num_classes, pool),
                  None, None, num_classes, IN_CHANNELS, image_size)
