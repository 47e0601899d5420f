"""How samples reach the training loop: sample order, seeded augmentation, mixup/cutmix.

The contract that makes execution plans comparable: the samples of each global batch, and
what is done to them, depend only on the run's seed, the epoch and the global batch size.
So the order is a permutation per (seed, epoch), cut into global batches; each sample is
transformed (and mixed) under its own seed, from (seed, epoch, index); and the loader
hands the engine whole global batches, which the engine splits into micro-batches,
accumulation steps and replicas. None of that can change which numbers are computed.

Mixing is per sample (a partner drawn from the whole training set, as the seed says), not
within a batch as timm's Mixup does: mixing inside a micro-batch would make the result
depend on how the global batch is split.
"""
import contextlib
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from datasets.source import CorruptImageError, DataError


def sample_seed(seed, epoch, index):
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2 ** 63)


@contextlib.contextmanager
def seeded(seed):
    """Runs the block under torch's CPU generator seeded with `seed`, then restores it.

    torchvision's random transforms draw from that generator; restoring it keeps the
    training process's own random stream (dropout, stochastic depth) unaffected by data
    loading in the same process.
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class SampleView(Dataset):
    """A source's samples, transformed, indexed by (epoch, index) keys.

    Returns (image, target, skipped): target is the class index, or class probabilities
    when mixup/cutmix are on; skipped lists the unreadable files replaced by the next
    readable sample (only with skip_corrupt_images: the batch keeps its size, which
    static-graph engines need).
    """

    def __init__(self, source, transform, seed, num_classes, skip_corrupt_images=False,
                 mixup_alpha=0.0, cutmix_alpha=0.0):
        self.source, self.transform, self.seed = source, transform, seed
        self.num_classes, self.skip_corrupt_images = num_classes, skip_corrupt_images
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

    @property
    def mixing(self):
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        with seeded(sample_seed(self.seed, epoch, index)):
            image, label, skipped = self.load(index)
            if not self.mixing:
                return image, label, skipped
            partner = int(torch.randint(len(self.source), ()))
            other, other_label, more_skipped = self.load(partner)
            image, weight = self.mix(image, other)
            target = torch.zeros(self.num_classes)
            target[label] += weight
            target[other_label] += 1.0 - weight
            return image, target, skipped + more_skipped

    def load(self, index):
        skipped = []
        for attempt in range(len(self.source)):
            try:
                image, label = self.source[(index + attempt) % len(self.source)]
                break
            except CorruptImageError as error:
                if not self.skip_corrupt_images:
                    raise
                skipped.append(error.path)
        else:
            raise DataError("no image of the dataset could be read")
        if self.transform is not None:
            image = self.transform(image)
        return image, label, skipped

    def mix(self, image, other):
        """(mixed image, weight of `image` in the target)."""
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or torch.rand(()) < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        weight = float(torch.distributions.Beta(alpha, alpha).sample())
        if not use_cutmix:
            return weight * image + (1.0 - weight) * other, weight
        # cutmix: a box of area (1 - weight) from `other`, clipped at the borders; the
        # target weight is the area actually kept
        height, width = image.shape[-2:]
        cut = (1.0 - weight) ** 0.5
        box_h, box_w = int(height * cut), int(width * cut)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
        left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
        image = image.clone()
        image[..., top:bottom, left:right] = other[..., top:bottom, left:right]
        return image, 1.0 - (bottom - top) * (right - left) / (height * width)


class EpochOrder(Sampler):
    """Training keys: a permutation of the samples per (seed, epoch), cut into global batches.

    Each epoch yields steps_per_epoch x global_batch keys (the rest of the permutation is
    left for that epoch), starting after `start_step` batches when a run resumes mid-epoch.
    steps_per_epoch is a multiple of `steps_per_call` (an IPU's device iterations).

    Under torchrun a process yields only its own replica's share: a global batch is laid
    out [accumulation step, replica, micro-batch], and process `rank` of `world_size` takes
    the `rank`-th replica slice of every accumulation step.
    """

    def __init__(self, num_samples, global_batch, seed, steps_per_call=1, accumulation=1,
                 rank=0, world_size=1):
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.accumulation, self.rank, self.world_size = accumulation, rank, world_size
        self.steps_per_epoch = num_samples // global_batch // steps_per_call * steps_per_call
        if self.steps_per_epoch == 0:
            calls = f" x {steps_per_call} device iterations" if steps_per_call > 1 else ""
            raise DataError(f"the global batch of {global_batch} samples{calls} is larger than "
                            f"the training set ({num_samples} samples)")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.num_samples, generator=generator)
        start, end = self.start_step * self.global_batch, self.steps_per_epoch * self.global_batch
        order = order[start:end]
        if self.world_size > 1:
            order = order.view(-1, self.accumulation, self.world_size,
                               self.global_batch // (self.accumulation * self.world_size))
            order = order[:, :, self.rank].flatten()
        return ((self.epoch, int(i)) for i in order)

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.global_batch // self.world_size


def collate(samples):
    images, targets = default_collate([(image, target) for image, target, _ in samples])
    return images, targets, [path for _, _, skipped in samples for path in skipped]


def ignore_interrupts(worker_id):
    """Ctrl-C reaches the whole process group: the training process handles it (checkpoint,
    clean exit) and its workers must not die first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(view, batch_size, sampler, num_workers=0, pin_memory=False, seed=0):
    """A DataLoader of (images, targets, skipped) batches in the sampler's order.

    It gets its own generator, so creating an iterator does not draw from the training
    process's random stream (which a resumed run restores exactly).
    """
    return DataLoader(view, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, worker_init_fn=ignore_interrupts,
                      generator=torch.Generator().manual_seed(seed))
