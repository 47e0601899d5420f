"""datasets/: digits split, CIFAR and ImageNet folders, synthetic, and the sample pipeline's
contract: order and augmentation depend only on (seed, epoch, index)."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import CorruptImageError, DataError, error_line, get_dataset
from datasets.pipeline import EpochOrder, make_loader
from train.__main__ import main


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


def python2_pickle(data, labels):
    """What Python 2's cPickle.dump(batch, f, 2) wrote for the real CIFAR files (Python 3
    cannot write it): str as BINSTRING, numpy 1's global names, the pixels as one str."""
    def text(value):
        return pickle.BINSTRING + struct.pack("<i", len(value)) + value

    def number(value):
        return pickle.BININT + struct.pack("<i", value)

    def call(module, name, *args):
        return (pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.MARK + b"".join(args)
                + pickle.TUPLE + pickle.REDUCE)

    def build(*state):
        return pickle.MARK + b"".join(state) + pickle.TUPLE + pickle.BUILD

    def items(values):
        return pickle.EMPTY_LIST + pickle.MARK + b"".join(values) + pickle.APPENDS

    dtype = call("numpy", "dtype", text(b"u1"), number(0), number(1)) + build(
        number(3), text(b"|"), pickle.NONE * 3, number(-1), number(-1), number(0))
    array = call("numpy.core.multiarray", "_reconstruct", pickle.GLOBAL + b"numpy\nndarray\n",
                 number(0) + pickle.TUPLE1, text(b"b")) + build(
        number(1), number(len(data)) + number(3072) + pickle.TUPLE2, dtype, pickle.NEWFALSE,
        text(data.tobytes()))
    entries = [text(b"batch_label"), text(b"training batch 1 of 5"), text(b"data"), array,
               text(b"labels"), items(number(label) for label in labels),
               text(b"filenames"), items(text(b"%d.png" % i) for i in range(len(labels)))]
    return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + b"".join(entries)
            + pickle.SETITEMS + pickle.STOP)


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


def test_cifar_reads_every_pickle_flavour_of_the_real_files(tmp_path):
    """The real files (Python 2, protocol 2) and copies written by Python 3 under every
    protocol, with bytes keys, numpy labels or int16 pixels, load to the pixels written."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    data = [rng.integers(0, 256, (3, 3072), dtype=np.uint8) for _ in range(6)]
    labels = [[int(x) for x in rng.integers(0, 10, 3)] for _ in range(6)]
    (folder / "data_batch_1").write_bytes(python2_pickle(data[0], labels[0]))
    flavours = [({b"data": data[1], b"labels": labels[1]}, 0),
                ({"data": data[2], "labels": [np.int64(x) for x in labels[2]]}, 2),
                ({"data": data[3], "labels": np.array(labels[3])}, 5),
                ({"data": data[4].astype(np.int16), "labels": labels[4]}, 4),
                ({"data": data[5], "labels": tuple(labels[5])}, pickle.DEFAULT_PROTOCOL)]
    for name, (batch, protocol) in zip(["data_batch_2", "data_batch_3", "data_batch_4",
                                        "data_batch_5", "test_batch"], flavours):
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    loaded = get_dataset("cifar10", data_path=str(tmp_path))
    images = np.concatenate(data[:5]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(loaded.train.source.images, images)
    assert loaded.train.source.labels.tolist() == sum(labels[:5], [])
    assert np.array_equal(loaded.val.source.images[2],
                          data[5][2].reshape(3, 32, 32).transpose(1, 2, 0))
    assert loaded.val.source.labels.tolist() == labels[5]


class RunsCode:
    """What a tampered pickle can hold: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar_file_that_runs_code_is_refused(tmp_path, protocol):
    write_cifar10(tmp_path)
    path, marker = tmp_path / "cifar-10-batches-py" / "data_batch_3", tmp_path / "MARKER"
    batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3],
             "filenames": ["a.png", RunsCode(marker)]}  # hidden deep in an ordinary file
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    with pytest.raises(DataError) as error:
        get_dataset("cifar10", data_path=str(tmp_path))
    assert str(error.value) == (
        f"cannot read CIFAR file {path}: it refers to {os.system.__module__}.system, which a "
        f"CIFAR file never holds (refused: a data file must not run code)")
    assert not marker.exists()


BAD_BATCHES = [  # (what the file holds, what the one-line error says)
    ({"data": [[0] * 3072] * 4, "labels": [0, 1, 2, 3]}, "'data' is a list, not a numpy array"),
    ({"data": np.zeros((20, 3072), np.uint8), "labels": list(range(10))},
     "it holds 20 images and 10 labels; each image needs one"),
    ({"data": np.zeros((4, 1024), np.uint8), "labels": [0, 1, 2, 3]},
     "'data' has shape (4, 1024), not (N, 3072)"),
    ({"data": np.full((4, 3072), 300), "labels": [0, 1, 2, 3]},
     "'data' is int64 and not pixel values 0..255"),
    ({"data": np.zeros((4, 3072), np.float32), "labels": [0, 1, 2, 3]},
     "'data' is float32 and not pixel values 0..255"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 10, 3]},
     "image 2 has label 10, outside 0..9 (10 classes)"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, -1, 2, 3]},
     "image 1 has label -1, outside 0..9"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": ["cat", "dog", "cat", "dog"]},
     "'labels' is not a list of integers"),
    ({"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 2, 3]},
     "it has no 'labels' entry (its keys: 'data', 'fine_labels')"),
    ([np.zeros((4, 3072), np.uint8)], "it holds a list, not a dict"),
]


@pytest.mark.parametrize("batch,message", BAD_BATCHES)
def test_invalid_cifar_file_is_one_line_naming_it(tmp_path, batch, message):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DataError) as error:
        get_dataset("cifar10", data_path=str(tmp_path))
    assert str(error.value).startswith(f"cannot read CIFAR file {path}: {message}")
    assert "\n" not in str(error.value)


def test_truncated_cifar_file_is_one_line_naming_it(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"^cannot read CIFAR file {path}: "):
        get_dataset("cifar10", data_path=str(tmp_path))


@pytest.mark.parametrize("batch", [{"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2],
                                    "filenames": []}, RunsCode("MARKER")])
def test_bad_cifar_file_exits_2_with_one_line(tmp_path, capsys, monkeypatch, batch):
    monkeypatch.chdir(tmp_path)  # where RunsCode would touch MARKER
    write_cifar10(tmp_path / "cifar")
    path = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_5"
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    assert main(["--config", "cifar10_preact_resnet20_group_pn", "--data-path",
                 str(tmp_path / "cifar"), "--output-dir", str(tmp_path / "run"),
                 "--wandb-mode", "disabled"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read CIFAR file {path}: ")
    assert not (tmp_path / "MARKER").exists()


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


def ops(*parts):
    """A protocol-2 pickle of the opcodes given: bytes as is, ints as BININT, str as
    BINUNICODE, ("module", "name") as GLOBAL."""
    out = b""
    for part in parts:
        if isinstance(part, bytes):
            out += part
        elif isinstance(part, int):
            out += pickle.BININT + struct.pack("<i", part) if -2**31 <= part < 2**31 else \
                pickle.LONG1 + bytes([8]) + struct.pack("<q", part)
        elif isinstance(part, str):
            out += pickle.BINUNICODE + struct.pack("<I", len(part.encode())) + part.encode()
        else:
            out += pickle.GLOBAL + f"{part[0]}\n{part[1]}\n".encode()
    return pickle.PROTO + b"\x02" + out + pickle.STOP


def call(function, *args):
    return (function, pickle.MARK, *args, pickle.TUPLE, pickle.REDUCE)


def ndarray_call(count, *buffer):
    """A batch whose data is numpy.ndarray((count, 3072), 'u1', *buffer) and count labels:
    numpy's constructor, which its own pickles never call."""
    labels = (pickle.EMPTY_LIST, pickle.MARK, *[0] * count, pickle.APPENDS) if count < 100 else \
        call(("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"))  # never reached
    return ops(pickle.EMPTY_DICT, pickle.MARK, "data",
               *call(("numpy", "ndarray"), count, 3072, pickle.TUPLE2, "u1", *buffer),
               "labels", *labels, pickle.SETITEMS)


def cifar_folder_with(tmp_path, name, content):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / name
    path.write_bytes(content)
    return path


NDARRAY_REFUSED = ("it calls numpy.ndarray, which numpy's pickles never do (refused: an array "
                   "is made only from the bytes the file holds)")


def test_a_cifar_file_calling_numpy_ndarray_exits_2_and_reads_no_memory(tmp_path):
    """numpy.ndarray((1, 3072), 'u1', 200 bytes, -2**40) read from 1 TB before its buffer
    (the trainer died of SIGSEGV, exit 139, without a word); a negative offset of one batch
    trained on the process's heap. Run in a process of its own, which the old code killed."""
    import subprocess
    import sys

    for offset, count in ((-2 ** 40, 1), (-16 * 3072, 16)):
        path = cifar_folder_with(tmp_path / str(count), "data_batch_1", ndarray_call(
            count, *call(("_codecs", "encode"), "\0" * 200, "latin1"), offset))
        result = subprocess.run(
            [sys.executable, "-m", "train", "--config", "cifar10_preact_resnet20_group_pn",
             "--data-path", str(tmp_path / str(count)), "--output-dir", str(tmp_path / "run"),
             "--wandb-mode", "disabled", "--max-steps", "1"],
            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert (result.returncode, result.stderr) == (
            2, f"error: cannot read CIFAR file {path}: {NDARRAY_REFUSED}\n")
        assert not (tmp_path / "run").exists()


def test_a_cifar_array_is_made_only_from_the_bytes_the_file_holds(tmp_path):
    """numpy.ndarray((N, 3072), 'u1') of a few bytes of pickle was N images of whatever
    memory held (a 93-byte file made 1,048,736 training images, 4.5 GB); an array's bytes
    must be exactly those its shape needs; nothing is made past the file's size."""
    path = cifar_folder_with(tmp_path, "data_batch_2", ndarray_call(20))
    assert path.stat().st_size < 200
    with pytest.raises(DataError) as error:
        get_dataset("cifar10", data_path=str(tmp_path))
    assert str(error.value) == f"cannot read CIFAR file {path}: {NDARRAY_REFUSED}"

    def array(shape, data, reuse=False):  # numpy's pickle of an array, its bytes as Python 2's str
        head = call(("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), 0,
                    pickle.TUPLE1, *call(("_codecs", "encode"), "b", "latin1"))
        dtype = (*call(("numpy", "dtype"), "u1", pickle.NEWFALSE, pickle.NEWTRUE), pickle.MARK,
                 3, "|", pickle.NONE * 3, -1, -1, 0, pickle.TUPLE, pickle.BUILD)
        content = (pickle.BINGET + b"\x07",) if reuse else (data, pickle.BINPUT + b"\x07")
        return (*head, pickle.MARK, 1, *shape, pickle.TUPLE2, *dtype, pickle.NEWFALSE,
                *content, pickle.TUPLE, pickle.BUILD)

    for shape, size in (((4, 3072), 200), ((1, 3072), 3073)):  # too few bytes, too many
        path.write_bytes(ops(pickle.EMPTY_DICT, pickle.MARK, "data", *array(shape, "\0" * size),
                             "labels", pickle.EMPTY_LIST, pickle.MARK, *[0] * shape[0],
                             pickle.APPENDS, pickle.SETITEMS))
        with pytest.raises(DataError) as error:
            get_dataset("cifar10", data_path=str(tmp_path))
        assert str(error.value) == (
            f"cannot read CIFAR file {path}: it holds an array of shape {shape} and dtype uint8 "
            f"({shape[0] * 3072} bytes) with {size} bytes of data")
    # one image's bytes, in the file once, made into 40 arrays of 3 KB: memo'd by reference
    path.write_bytes(ops(pickle.EMPTY_DICT, pickle.MARK, "data", *array((1, 3072), "\0" * 3072),
                         "labels", pickle.EMPTY_LIST, pickle.MARK, 0, pickle.APPENDS,
                         "filenames", pickle.EMPTY_LIST, pickle.MARK,
                         *sum((array((1, 3072), None, reuse=True) for _ in range(40)), ()),
                         pickle.APPENDS, pickle.SETITEMS))
    assert path.stat().st_size < 4 * 3072
    with pytest.raises(DataError) as error:
        get_dataset("cifar10", data_path=str(tmp_path))
    assert str(error.value) == (f"cannot read CIFAR file {path}: it makes more bytes of data "
                                f"than the file holds")


@pytest.mark.parametrize("module, name", [("_codecs", "encode"),
                                          ("numpy._core.numeric", "_frombuffer")])
def test_a_cifar_file_cannot_change_an_allowed_function(tmp_path, module, name):
    """BUILD on a global sets its attributes: the file changed the defaults of
    _codecs.encode's stand-in, or numpy's own _frombuffer, for the whole process, and was
    only refused later, at a global outside the allow-list."""
    from datasets import folders

    functions = [np.zeros(1).__reduce_ex__(5)[0]] + [
        value for value in vars(folders).values() if callable(value)
        and getattr(value, "__name__", "") in ("_latin1_bytes", "_frombuffer")]
    before = [(f, f.__defaults__, dict(f.__dict__)) for f in functions]
    path = cifar_folder_with(tmp_path, "data_batch_4", ops(
        (module, name), pickle.MARK, pickle.NONE, pickle.EMPTY_DICT, "__defaults__", "utf-8",
        pickle.TUPLE1, pickle.SETITEM, pickle.TUPLE, pickle.BUILD, pickle.POP, ("os", "system")))
    try:
        with pytest.raises(DataError) as error:
            get_dataset("cifar10", data_path=str(tmp_path))
        assert str(error.value) == (f"cannot read CIFAR file {path}: it changes the state of "
                                    f"{module}.{name} (BUILD), which numpy's pickles never do")
        assert [(f, f.__defaults__, f.__dict__) for f in functions] == before
    finally:  # the old code's change must not leak into the tests that follow
        for f, defaults, attributes in before:
            f.__defaults__ = defaults
            f.__dict__.update(attributes)


@pytest.mark.parametrize("link, target, message", [
    ("train/cat/loop", "..", "train/cat/loop is {root}/train again"),  # back up the tree
    ("train/cat/deeper/loop", "../../../train", "train/cat/deeper/loop is {root}/train again"),
    ("train/cat/dogs", "../dog", "train/dog is {root}/train/cat/dogs again"),  # read twice
])
def test_an_image_folder_reads_each_folder_once(tmp_path, link, target, message):
    """os.walk followed a symlink back up the tree at every level: 8 images became 328."""
    write_image_folder(tmp_path)
    (tmp_path / link).parent.mkdir(exist_ok=True)
    os.symlink(target, tmp_path / link)
    with pytest.raises(DataError) as error:
        get_dataset("imagenet", data_path=str(tmp_path), image_size=16)
    assert str(error.value) == (
        f"ImageNet folder {tmp_path}/train: {tmp_path}/{message.format(root=tmp_path)} (a "
        f"symlink to a folder already read, or a loop); each folder may be read once")
    os.remove(tmp_path / link)
    os.symlink(tmp_path / "val" / "dog", tmp_path / link)  # elsewhere: read as part of cat
    data = get_dataset("imagenet", data_path=str(tmp_path), image_size=16)
    assert (len(data.train), len(data.val)) == (12, 8)


def test_an_image_name_that_is_not_a_file_is_refused(tmp_path):
    """A FIFO named x.png hung the first read of it in open(), past SIGTERM."""
    write_image_folder(tmp_path)
    fifo = tmp_path / "train" / "dog" / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError) as error:
        get_dataset("imagenet", data_path=str(tmp_path), image_size=16)
    assert str(error.value) == (f"ImageNet folder {tmp_path}/train: {fifo} is a FIFO, not an "
                                f"image file; remove it")
    os.remove(fifo)
    os.symlink(tmp_path / "missing.png", fifo)  # a broken link is an unreadable image, as before
    data = get_dataset("imagenet", data_path=str(tmp_path), image_size=16)
    assert len(data.train) == 9


def test_reading_an_image_never_blocks_on_a_fifo(tmp_path):
    """An image replaced by a FIFO or a device after the folder was listed is an unreadable
    image: opened without blocking, it is refused before it is read."""
    import threading

    from datasets.folders import read_image

    device = tmp_path / "zero.png"
    os.symlink("/dev/zero", device)
    with pytest.raises(CorruptImageError) as error:
        read_image(str(device))
    assert str(error.value) == f"cannot read image {device}: it is a character device, not a file"
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    # a writer that opens and closes at once, so that a reader which waits for one (the old
    # code) reads an empty file instead of waiting forever
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True)
    writer.start()
    try:
        with pytest.raises(CorruptImageError) as error:
            read_image(str(fifo))
        assert str(error.value) == f"cannot read image {fifo}: it is a FIFO, not a file"
    finally:  # a reader held open lets the writer's open return, whenever it began
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join()
        os.close(reader)


def test_error_line_is_the_message_or_a_workers_last_line():
    """The app's one-line reports: an error's first line (a state_dict mismatch lists its
    keys below), its type without a message, and, for an error a DataLoader worker raised,
    the original message torch wraps below the worker's traceback."""
    assert error_line(RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s)")) == \
        "Error(s) in loading state_dict:"
    assert error_line(ValueError("")) == "ValueError"
    try:
        raise DataError("cannot read image a.png: truncated")
    except DataError:
        wrapped = torch._utils.ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapped.reraise()
    except DataError as error:
        assert str(error).startswith("Caught DataError in DataLoader worker process 0.")
        assert error_line(error) == "cannot read image a.png: truncated"
