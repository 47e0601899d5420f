"""What the benchmarks share: the bytes autograd keeps (counted by train.plan, which plans
memory per device with the same count), the machine, writing results."""
import os
import platform

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


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(report, path):
    """Written whole or not at all (train.files.write_atomically), into a folder it creates."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_json(path, report)


def write_png(figure, path, dpi=110):
    """A matplotlib figure as a PNG, written whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_atomically(path, lambda f: figure.savefig(f, dpi=dpi, format="png"),
                           binary=True)
