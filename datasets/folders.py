"""Datasets read from a local folder (never downloaded at run time): CIFAR-10/100, ImageNet.

CIFAR is read from the "python version" archives' pickle files (the files torchvision's
CIFAR10/CIFAR100 read), without torchvision's md5 check of every file, which rejects any
copy that is not byte-identical to the original archive (subsets, test fixtures). So that a
tampered file cannot run code, they are read with an allow-list unpickler (a dict, lists,
strings, ints and numpy arrays made from the file's own bytes only), and each file's images
and labels are checked.
ImageNet is torchvision's ImageFolder over train/ and val/, one folder per class.
"""
import math
import os
import pickle
import stat

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from datasets.source import CorruptImageError, DataError, Source

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


class Refused(Exception):
    """A CIFAR file asks for something numpy's own pickles never do; the message says what."""


# The globals a CIFAR file may name are stand-ins for what numpy's pickles call: numpy.ndarray
# is never called (its constructor takes a shape, a buffer and an offset of the file's own, so
# reads process memory or allocates gigabytes from a few bytes of pickle), and an array is
# made only from the bytes the file carries, exactly as many as its shape and dtype need.
# Every object a global gives is the unpickler's own and refuses BUILD (pickle's setstate:
# on a function it sets attributes, __defaults__ included, for the whole process), but for
# the arrays and dtypes being made, each built once.
DTYPE_CODES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")


class _Stub:
    """Base of the unpickler's own objects: no BUILD unless a subclass takes one."""

    def __setstate__(self, state):
        raise Refused(f"it changes the state of {self} (BUILD), which numpy's pickles never do")


class _Global(_Stub):
    """An allowed global: calls its stand-in."""

    def __init__(self, name, function):
        self.name, self.function = name, function

    def __call__(self, *args):
        return self.function(*args)

    def __str__(self):
        return self.name


class _Dtype(_Stub):
    """numpy.dtype(code, align, copy) and its one BUILD (byte order)."""

    def __init__(self, code, align=False, copy=True):
        if code not in DTYPE_CODES:
            raise Refused(f"it holds an array of dtype {code!r}; a CIFAR file holds integers "
                          f"or floats")
        self.dtype, self.built = np.dtype(code), False

    def __setstate__(self, state):  # (version, byte order, None, None, None, -1, -1, flags)
        if self.built:
            super().__setstate__(state)
        if (not isinstance(state, tuple) or len(state) not in (8, 9)
                or state[1] not in ("<", ">", "|", "=") or state[2:5] != (None, None, None)):
            raise Refused(f"it holds a dtype with the state {state!r:.80}, not a plain number "
                          f"type")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])
        self.built = True

    def __str__(self):
        return f"numpy.dtype {self.dtype}"


class _Array(_Stub):
    """An array being made: numpy's _reconstruct gives an empty one, BUILD its content."""

    def __init__(self, unpickler):
        self.unpickler, self.array = unpickler, None

    def __setstate__(self, state):  # ([1,] shape, dtype, is_fortran, bytes)
        if self.array is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            super().__setstate__(state)
        if len(state) == 5 and state[0] != 1:
            raise Refused(f"it holds an array of pickle version {state[0]!r}, not 1")
        shape, dtype, fortran, data = state[-4:]
        if not isinstance(fortran, (bool, int)):
            raise Refused("it holds an array whose order is not true or false")
        self.array = self.unpickler.array(data, dtype, shape, "F" if fortran else "C")

    def __str__(self):
        return "numpy.ndarray"


class CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only CIFAR_GLOBALS: a pickle runs whatever callable it
    names, so a tampered data file could otherwise run any code. It makes at most as many
    bytes of arrays and strings as the file holds."""

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")  # Python 2 str (the real files) -> str
        self.path = path
        self.budget = os.fstat(file.fileno()).st_size

    def find_class(self, module, name):
        if (module, name) not in CIFAR_GLOBALS:
            raise DataError(f"cannot read CIFAR file {self.path}: it refers to {module}.{name}, "
                            f"which a CIFAR file never holds (refused: a data file must not "
                            f"run code)")
        return _Global(f"{module}.{name}", getattr(self, CIFAR_GLOBALS[module, name]))

    def load(self):
        """The file's object, its arrays made (a stub without its BUILD is refused)."""
        batch = super().load()
        if isinstance(batch, dict):
            batch = {key: self.made(value) for key, value in batch.items()}
        return batch

    @staticmethod
    def made(value):
        if isinstance(value, _Array):
            if value.array is None:
                raise Refused("it holds an array without its content")
            return value.array
        return value

    def spend(self, size):
        """Counts `size` bytes made from the file's: refused past the file's size."""
        self.budget -= size
        if self.budget < 0:
            raise Refused("it makes more bytes of data than the file holds")

    def raw(self, data):
        """Bytes the file carries: bytes (shared, not copied), or a latin1 str (Python 2's
        str, or Python 3's bytes in protocols 0-2), encoded into a copy."""
        if isinstance(data, (bytes, bytearray)):
            return data
        if isinstance(data, str):
            self.spend(len(data))
            return data.encode("latin1")
        raise Refused(f"it holds array data of type {type(data).__name__}, not bytes")

    def array(self, data, dtype, shape, order):
        """An array of exactly the bytes given: no more, no fewer."""
        if not isinstance(dtype, _Dtype):
            raise Refused(f"it holds an array whose dtype is a {type(dtype).__name__}")
        if (not isinstance(shape, tuple) or len(shape) > 32
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise Refused(f"it holds an array of shape {shape!r:.80}")
        data = self.raw(data)
        size = math.prod(shape) * dtype.dtype.itemsize
        if size != len(data):
            raise Refused(f"it holds an array of shape {shape} and dtype {dtype.dtype} "
                          f"({size} bytes) with {len(data)} bytes of data")
        return np.frombuffer(data, dtype.dtype).reshape(shape, order=order)

    # the stand-ins, by the name CIFAR_GLOBALS gives them
    def ndarray(self, *args):
        raise Refused("it calls numpy.ndarray, which numpy's pickles never do (refused: an "
                      "array is made only from the bytes the file holds)")

    def dtype(self, *args):
        return _Dtype(*args)

    def reconstruct(self, cls, shape, typecode):
        """numpy's _reconstruct(ndarray, (0,), b"b"): an empty array that BUILD fills."""
        if not (isinstance(cls, _Global) and cls.name == "numpy.ndarray") or shape != (0,) \
                or typecode not in ("b", b"b"):
            raise Refused("it calls numpy's _reconstruct with arguments numpy never gives")
        return _Array(self)

    def frombuffer(self, data, dtype, shape, order, axis_order=None):
        """numpy's _frombuffer (protocol 5): an array made at once, which takes no BUILD."""
        made = _Array(self)
        if order in ("C", "F"):
            made.array = self.array(data, dtype, shape, order)
        elif order == "K" and isinstance(shape, tuple) and isinstance(axis_order, tuple) \
                and sorted(axis_order) == list(range(len(shape))):
            made.array = self.array(data, dtype, shape, "C").transpose(axis_order)
        else:
            raise Refused(f"it holds an array of order {order!r:.80} and axis order "
                          f"{axis_order!r:.80}")
        return made

    def scalar(self, dtype, data):
        """numpy's scalar(dtype, bytes), e.g. an np.int64 label: a Python number."""
        return self.array(data, dtype, (), "C").item()

    def encode(self, text, encoding):
        """Python 3 writes bytes in protocol 0-2 pickles as _codecs.encode(text, "latin1");
        the real codecs.encode would look up whatever codec the file names, so only latin1."""
        if encoding != "latin1" or not isinstance(text, str):
            raise Refused(f"it encodes bytes as {encoding!r:.80}, not latin1")
        return self.raw(text)


# Every global a CIFAR file may name, and the stand-in that CifarUnpickler gives for it:
# numpy's pickles of an array or scalar call numpy.core.* with numpy 1 (the real files) and
# numpy._core.* with numpy 2.
CIFAR_GLOBALS = {}
for _module in ("numpy.core", "numpy._core"):
    CIFAR_GLOBALS.update({(f"{_module}.multiarray", "_reconstruct"): "reconstruct",
                          (f"{_module}.multiarray", "scalar"): "scalar",
                          (f"{_module}.numeric", "_frombuffer"): "frombuffer"})
CIFAR_GLOBALS.update({("numpy", "ndarray"): "ndarray",  # the class _reconstruct is given
                      ("numpy", "dtype"): "dtype",  # the array's element type
                      ("_codecs", "encode"): "encode"})  # bytes, Python 3, protocol <= 2


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
    except Refused as error:
        raise failure(str(error)) from None
    except MemoryError:
        raise failure("it declares more data than memory holds") from None
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
    """An RGB PIL image; CorruptImageError naming the file if it cannot be decoded or is not a
    regular file (opened without blocking: opening a FIFO waits for a writer forever)."""
    try:
        with open(path, "rb", opener=open_without_blocking) as f:
            kind = file_kind(os.fstat(f.fileno()).st_mode)
            if kind != "file":
                raise CorruptImageError(f"cannot read image {path}: it is a {kind}, not a file",
                                        path=path)
            return Image.open(f).convert("RGB")  # convert() decodes the whole file
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot read image {path}: {error}", path=path) from None


def open_without_blocking(path, flags):
    return os.open(path, flags | os.O_NONBLOCK)


def file_kind(mode):
    return next((kind for test, kind in (
        (stat.S_ISREG, "file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device")) if test(mode)), "special file")


def list_images(root, class_to_idx):
    """(path, class index) of the images below each class folder, in ImageFolder's order,
    without following a symlink into a folder already read: a link back up the tree made
    os.walk read the same images again at every level (8 images became 328). An image name
    that is neither a file nor a broken link (which reads as an unreadable image) is refused:
    a FIFO blocks its reader."""
    seen = {}  # (device, inode) of each folder read -> its path

    def read_folder(path):
        status = os.stat(path)
        key = (status.st_dev, status.st_ino)
        if key in seen:
            raise DataError(f"ImageNet folder {root}: {path} is {seen[key]} again (a symlink to "
                            f"a folder already read, or a loop); each folder may be read once")
        seen[key] = path
        with os.scandir(path) as entries:
            return list(entries)

    status = os.stat(root)
    seen[status.st_dev, status.st_ino] = root
    samples = []
    for name in sorted(class_to_idx):
        folders, images = [os.path.join(root, name)], []
        while folders:
            folder = folders.pop()
            for entry in read_folder(folder):
                if entry.is_dir():
                    folders.append(entry.path)
                elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                    if not entry.is_file() and os.path.exists(entry.path):
                        raise DataError(f"ImageNet folder {root}: {entry.path} is a "
                                        f"{file_kind(os.stat(entry.path).st_mode)}, not an "
                                        f"image file; remove it")
                    images.append((folder, entry.name))
        # os.walk's order, as ImageFolder sorts it: by folder path, then by file name
        samples += [(os.path.join(folder, file), class_to_idx[name])
                    for folder, file in sorted(images)]
    found = {index for _, index in samples}
    empty = [name for name in sorted(class_to_idx) if class_to_idx[name] not in found]
    if empty:
        raise DataError(f"ImageNet folder {root}: no images in the class folder(s) "
                        f"{', '.join(empty)} (image files end in {', '.join(IMG_EXTENSIONS)})")
    return samples


class ImageFolder(tv_datasets.ImageFolder):
    """torchvision's ImageFolder, its images listed by list_images."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        return list_images(directory, class_to_idx)


def image_folder(root, data_path):
    if not os.path.isdir(root):
        raise DataError(
            f"ImageNet not found: {root} is not a folder; {data_path} must hold train/ and val/, "
            f"each with one folder of images per class (or pass --data-path)")
    try:
        return ImageFolder(root, loader=read_image)
    except (FileNotFoundError, OSError) as error:  # no class folders, or a folder unreadable
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
