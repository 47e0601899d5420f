import importlib.util

import pytest

HAS_POPTORCH = importlib.util.find_spec("poptorch") is not None


def ipu_hardware_available():
    """Two physical IPUs: replicated graphs need hardware, as the Poplar user guide says of
    the IPU Model and as PopTorch's and PopART's replicated tests are hardware-only."""
    if not HAS_POPTORCH:
        return False
    import poptorch

    return poptorch.ipuHardwareIsAvailable(2)


def pytest_collection_modifyitems(config, items):
    if not HAS_POPTORCH:
        skip = pytest.mark.skip(reason="needs PopTorch (Graphcore Poplar SDK)")
        for item in items:
            if "ipu" in item.keywords or "ipu_hardware" in item.keywords:
                item.add_marker(skip)
        return
    if any("ipu_hardware" in item.keywords for item in items) and not ipu_hardware_available():
        skip = pytest.mark.skip(reason="needs two IPUs (the IPU Model does not replicate)")
        for item in items:
            if "ipu_hardware" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same numbers whatever runs before it, and a test that sets
    torch's thread count (command lines do) gives the next tests theirs back."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): on
    2 shared cores a second intra-op thread mostly spins (such a file took 2-4x longer with
    it). Restored for the other test files."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
