"""benchmarks/layer.py's modes, on a tiny shape (no timing is asserted)."""
import pytest
import torch

from benchmarks import layer as benchmark


def cpu_autocast():
    """Whether CPU autocast is on (torch 2.0, PopTorch's, has no device argument)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()


@pytest.mark.parametrize("dtype, memory_format", [
    (torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)])
def test_every_variant_steps_in_the_asked_dtype_and_layout(monkeypatch, dtype, memory_format):
    """Each variant gets x in the asked dtype and layout and returns gradients for x and its
    parameters; bfloat16 steps run under autocast, so a BatchNorm sees bfloat16 while
    GroupNorm's float32 autocast policy applies."""
    monkeypatch.setattr(benchmark, "SHAPES", [(2, 64, 4, 4)])
    monkeypatch.setattr(benchmark, "VARIANTS", {
        name: spec for name, spec in benchmark.VARIANTS.items() if spec[2] != "compiled"})
    seen = {}
    build = benchmark.build

    def recording_build(norm, act, how, channels, device):
        def record(module, args):
            seen[norm, act, how] = (args[0].dtype,
                                    args[0].is_contiguous(memory_format=memory_format),
                                    cpu_autocast())

        layer = build(norm, act, how, channels, device)
        layer.register_forward_pre_hook(record)
        return layer

    monkeypatch.setattr(benchmark, "build", recording_build)
    (row,) = benchmark.measure(1, torch.device("cpu"), dtype, memory_format)
    ran = {name for name, result in row["variants"].items() if result["ms"] is not None}
    assert {"batch_relu", "group_relu", "group_pn_relu_eager"} <= ran
    assert all(value == (dtype, True, dtype == torch.bfloat16) for value in seen.values())
    assert row["variants"]["batch_relu"]["time_ratio"] == 1.0
    for name, result in row["variants"].items():
        assert (result["ms"] is None) == (name not in ran) and \
            (result["ms"] is not None or result["unavailable"].startswith("no fused op"))


def test_each_mode_writes_its_own_json():
    """The layer and model benchmarks name a run's files layer{suffix}.json and so on: none
    for the CPU, float32 and NCHW (the run the docs show), else device, dtype and layout."""
    from argparse import Namespace

    from benchmarks.measure import variant_suffix

    def suffix(device, dtype="float32", channels_last=False):
        return variant_suffix(Namespace(device=device, dtype=dtype, channels_last=channels_last))

    assert suffix("cpu") == ""
    assert suffix("cuda") == "_cuda"
    assert suffix("cuda", "bfloat16", True) == "_cuda_bfloat16_channels_last"
