"""datasets/: digits split, CIFAR and ImageNet folders, synthetic, and the sample pipeline's
contract: order and augmentation depend only on (seed, epoch, index)."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import CorruptImageError, DataError, get_dataset
from datasets.pipeline import EpochOrder, make_loader


def write_cifar10(root, per_batch=4):
    """A tiny copy of CIFAR-10's python version (cifar-10-batches-py pickles)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(x) for x in rng.integers(0, 10, per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def write_image_folder(root, classes=("cat", "dog"), per_class=4, size=(20, 24)):
    """train/ and val/ with one folder per class of real PNG and JPEG files."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
                suffix = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(root / split / c / f"{i}.{suffix}")
    return root


def test_digits_split_is_fixed_and_stratified():
    data = get_dataset("digits")
    assert (len(data.train), len(data.val)) == (1437, 360)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 32)
    labels = torch.tensor([data.val.source[i][1] for i in range(len(data.val))])
    assert torch.bincount(labels, minlength=10).min() >= 35  # every digit, about 36 each
    image, label, skipped = data.val[(0, 0)]
    assert image.shape == (1, 32, 32) and skipped == []
    again = get_dataset("digits", seed=5)  # the split does not follow the run's seed
    assert torch.equal(again.val[(0, 0)][0], image)


def test_augmentation_depends_only_on_seed_epoch_and_index():
    data = get_dataset("digits", seed=1)
    first = data.train[(3, 17)][0]
    torch.manual_seed(123)  # the process's random stream plays no part ...
    torch.rand(5)
    assert torch.equal(data.train[(3, 17)][0], first)
    state = torch.get_rng_state()
    data.train[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left as it was
    assert not torch.equal(data.train[(4, 17)][0], first)  # another epoch, another crop
    assert not torch.equal(get_dataset("digits", seed=2).train[(3, 17)][0], first)


def test_mixup_and_cutmix_give_class_probabilities():
    for options in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0},
                    {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}):
        data = get_dataset("digits", **options)
        for index in range(8):
            image, target, _ = data.train[(0, index)]
            assert image.shape == (1, 32, 32) and target.shape == (10,)
            assert target.sum().item() == pytest.approx(1.0) and target.min() >= 0
        assert torch.equal(data.train[(0, 3)][1], data.train[(0, 3)][1])
        assert data.val[(0, 0)][1] in range(10)  # validation is never mixed


def test_epoch_order_depends_only_on_seed_and_epoch():
    order = EpochOrder(100, global_batch=16, seed=0)
    assert order.steps_per_epoch == 6 and len(order) == 96
    keys = list(order)
    assert len(set(keys)) == 96 and all(epoch == 0 for epoch, _ in keys)
    assert list(EpochOrder(100, 16, seed=0)) == keys
    order.set_epoch(1)
    assert list(order) != [(1, i) for _, i in keys]
    order.set_epoch(0, start_step=2)  # a resumed run continues where it stopped
    assert list(order) == keys[32:]
    assert list(EpochOrder(100, 16, seed=1)) != keys


def test_epoch_order_gives_each_torchrun_process_its_replica_slices():
    """A global batch is laid out [accumulation step, replica, micro-batch]: with 2 steps of
    2 replicas x 4 samples, process r takes samples 4r..4r+3 and 8+4r..8+4r+3 of each batch."""
    keys = list(EpochOrder(100, 16, seed=0))
    shards = [list(EpochOrder(100, 16, seed=0, accumulation=2, rank=rank, world_size=2))
              for rank in (0, 1)]
    assert [len(shard) for shard in shards] == [48, 48]
    for step in range(6):
        batch = keys[16 * step:16 * step + 16]
        assert shards[0][8 * step:8 * step + 8] == batch[0:4] + batch[8:12]
        assert shards[1][8 * step:8 * step + 8] == batch[4:8] + batch[12:16]


def test_epoch_order_keeps_whole_host_calls():
    """An IPU running 4 steps per host call gets epochs of whole calls: 6 batches -> 4."""
    order = EpochOrder(100, 16, seed=0, steps_per_call=4)
    assert order.steps_per_epoch == 4 and list(order) == list(EpochOrder(100, 16, seed=0))[:64]
    with pytest.raises(DataError, match="16 samples x 8 device iterations is larger than"):
        EpochOrder(100, 16, seed=0, steps_per_call=8)


def test_loader_yields_global_batches():
    data = get_dataset("synthetic", synthetic_samples=40, synthetic_num_classes=5, image_size=8)
    order = EpochOrder(len(data.train), 16, seed=0)
    batches = list(make_loader(data.train, 16, order))
    assert [tuple(images.shape) for images, _, _ in batches] == [(16, 3, 8, 8)] * 2
    assert all(targets.max() < 5 for _, targets, _ in batches)
    with pytest.raises(DataError, match="global batch of 64 samples is larger than the training"):
        EpochOrder(40, 64, seed=0)


def test_cifar_folder(tmp_path):
    write_cifar10(tmp_path / "cifar10")
    data = get_dataset("cifar10", data_path=str(tmp_path / "cifar10"))
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (20, 4, 10, 3)
    image, label, _ = data.train[(0, 0)]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_missing_data_paths_say_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError) as error:
        get_dataset("cifar10", data_path=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message
    with pytest.raises(DataError, match="train/ and val/"):
        get_dataset("imagenet", data_path=str(tmp_path / "nowhere"))


def test_image_folder_reads_png_and_jpeg(tmp_path):
    write_image_folder(tmp_path)
    data = get_dataset("imagenet", data_path=str(tmp_path), image_size=16)
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (8, 8, 2, 3)
    for index in range(8):
        assert data.train[(0, index)][0].shape == (3, 16, 16)
        assert data.val[(0, index)][0].shape == (3, 16, 16)


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    write_image_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "1.png"
    bad.write_bytes(b"not an image")
    data = get_dataset("imagenet", data_path=str(tmp_path), image_size=16)
    with pytest.raises(CorruptImageError, match=f"cannot read image {bad}"):
        data.train[(0, 1)]
    data = get_dataset("imagenet", data_path=str(tmp_path), image_size=16, skip_corrupt_images=True)
    image, label, skipped = data.train[(0, 1)]
    assert skipped == [str(bad)] and image.shape == (3, 16, 16)
    order = EpochOrder(len(data.train), 8, seed=0)
    (_, _, batch_skipped), = list(make_loader(data.train, 8, order))
    assert batch_skipped == [str(bad)]  # the batch keeps its size; the file is reported


def test_synthetic():
    data = get_dataset("synthetic", synthetic_samples=12, synthetic_num_classes=7, image_size=16)
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (12, 3, 7, 3)
    assert data.train[(0, 11)][0].shape == (3, 16, 16)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        get_dataset("mnist")


def test_truncated_jpeg_is_corrupt(tmp_path):
    write_image_folder(tmp_path)
    path = tmp_path / "val" / "dog" / "0.jpg"
    path.write_bytes(path.read_bytes()[:200])
    data = get_dataset("imagenet", data_path=str(tmp_path), image_size=16)
    index = data.val.source.samples.index((str(path), 1))
    with pytest.raises(CorruptImageError, match=os.path.basename(str(path))):
        data.val[(0, index)]
