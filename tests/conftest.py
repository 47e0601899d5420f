import importlib.util

import pytest

HAS_POPTORCH = importlib.util.find_spec("poptorch") is not None


def pytest_collection_modifyitems(config, items):
    if HAS_POPTORCH:
        return
    skip = pytest.mark.skip(reason="needs PopTorch (Graphcore Poplar SDK)")
    for item in items:
        if "ipu" in item.keywords:
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
