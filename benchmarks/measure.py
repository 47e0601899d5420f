"""What the benchmarks share: the bytes autograd keeps (counted by train.plan, which plans
memory per device with the same count), the machine, writing results."""
import json
import os
import platform
import tempfile

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
    """Write to a temporary file, then rename: a result file is never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the results are for everyone to read
    os.replace(tmp, path)


def write_png(figure, path, dpi=110):
    """A matplotlib figure as a PNG, written to a temporary file, then renamed: a figure is
    never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp.png")
    os.close(fd)
    figure.savefig(tmp, dpi=dpi, format="png")
    os.chmod(tmp, 0o644)  # as write_json
    os.replace(tmp, path)
