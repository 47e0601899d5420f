"""What the benchmarks share: the bytes autograd keeps (counted by train.plan, which plans
memory per device with the same count), the machine, the dtype and layout flags, writing
results."""
import os
import platform

import torch

from train import files
from train.plan import saved_storages


def saved_bytes(forward, parameters):
    """Bytes of the distinct storages autograd saves while `forward()` runs, split into
    {"activations": ..., "parameters": ...} (storages of `parameters`); the graph is freed
    when forward's result is dropped."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    split = {"activations": 0, "parameters": 0}
    for pointer, (_, size) in saved_storages(forward).items():
        split["parameters" if pointer in parameter_storages else "activations"] += size
    return split


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_variant_flags(parser):
    """--dtype and --channels-last, as the layer and model benchmarks take them."""
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                        help="the activations' dtype (bfloat16: steps under autocast, float32 "
                             "weights)")
    parser.add_argument("--channels-last", action="store_true",
                        help="inputs (and the model's weights) in channels_last")


def variant_suffix(args):
    """What a run's files add to their names for its device, dtype and layout
    ("_cuda_bfloat16_channels_last", say); "" for the CPU, float32 and NCHW, the run the
    docs' tables show by default."""
    parts = (["cuda"] if args.device == "cuda" else []) + \
        ([args.dtype] if args.dtype != "float32" else []) + \
        (["channels_last"] if args.channels_last else [])
    return "".join("_" + part for part in parts)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path, report, significant=None):
    """train.files.write_json (whole or not at all, same argument order) into a folder it
    creates. significant: round every float to that many significant digits, so that a
    rerun whose numbers differ only by floating-point noise (threads summing in another
    order) writes the same file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_json(path, report if significant is None else rounded(report, significant))


def rounded(value, significant):
    """value with every float rounded to `significant` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{significant}g}")
    if isinstance(value, dict):
        return {key: rounded(item, significant) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, significant) for item in value]
    return value


def log2_x_axis(axis, ticks, label):
    """A base-2 log x axis with a tick, labelled in plain numbers, at each of `ticks`
    (micro-batches, epochs)."""
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [str(tick) for tick in ticks])
    axis.set_xlabel(label)


def write_png(figure, path, dpi=110):
    """A matplotlib figure as a PNG, written whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_atomically(path, lambda f: figure.savefig(f, dpi=dpi, format="png"),
                           binary=True)
