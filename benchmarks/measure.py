"""What every benchmark measures the same way: the bytes autograd keeps, and the machine."""
import platform

import torch


def saved_bytes(forward, parameters):
    """Bytes of the distinct storages autograd saves while `forward()` runs, split into
    {"activations": ..., "parameters": ...} (storages of `parameters`); the graph is freed
    when forward's result is dropped."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    split = {"activations": 0, "parameters": 0}
    for pointer, size in storages.items():
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
