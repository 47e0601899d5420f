"""The model benchmark: its saved-bytes count and a tiny run's JSON (never its timings)."""
import json

import pytest
import torch
from torch import nn

from benchmarks import model as benchmark
from proxynorm.ops import cpu
from benchmarks.measure import saved_bytes
from tests.test_layer_benchmark import cpu_autocast


def test_saved_bytes_of_a_conv_are_its_input_and_weight():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    x = torch.randn(2, 3, 10, 10)
    saved = saved_bytes(lambda: conv(x), conv.parameters())
    assert saved == {"activations": x.numel() * 4, "parameters": conv.weight.numel() * 4}


def test_saved_bytes_count_a_shared_storage_once():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    x = torch.randn(4, 3, 10, 10)
    saved = saved_bytes(lambda: (conv(x), conv(x[:2])), conv.parameters())
    assert saved["activations"] == x.numel() * 4


def run(tmp_path, *flags):
    output = tmp_path / "model.json"
    benchmark.main(["--models", "cifar_resnet20", "--repeats", "1", "--threads", "1",
                    "--no-readme", "--output", str(output), "--plot", str(tmp_path / "model.png"),
                    *flags])
    return json.loads(output.read_text())


# The benchmark compares the fused op with BatchNorm: it refuses to run without it (torch 2.0,
# PopTorch's pin, has no build of it; elsewhere tests/test_fused_op.py fails first)
needs_fused_op = pytest.mark.skipif(not cpu.load(), reason="needs the fused CPU op")


@needs_fused_op
def test_tiny_run_writes_ratios_to_the_baseline(tmp_path, capsys):
    report = run(tmp_path, "--resolution", "32", "--micro-batches", "2")
    row, = report["results"]
    assert row["micro_batch"] == 2 and list(row["variants"]) == list(benchmark.VARIANTS)
    assert row["variants"]["batch"]["speed_ratio"] == 1.0
    assert row["variants"]["batch"]["bytes_ratio"] == 1.0
    for result in row["variants"].values():
        assert result["images_per_second"] > 0 and result["activation_bytes_per_image"] > 0
    # the eager Proxy Norm keeps its intermediates; the fused op does not
    eager, fused = (row["variants"][name]["bytes_ratio"]
                    for name in ("group_pn_eager", "group_pn_fused"))
    assert eager > fused
    assert (tmp_path / "model.png").read_bytes()[:4] == b"\x89PNG"
    assert "| `cifar_resnet20` | `group_pn_fused` |" in capsys.readouterr().out


@needs_fused_op
def test_impossible_case_is_null_with_its_reason(tmp_path):
    # 4x4 images leave 1x1 positions after two stride-2 stages: BatchNorm at micro-batch 1
    # sees one value per channel and cannot train
    report = run(tmp_path, "--resolution", "4", "--micro-batches", "1")
    variants = report["results"][0]["variants"]
    assert variants["batch"]["images_per_second"] is None
    assert "value per channel" in variants["batch"]["error"]
    assert variants["group_pn_fused"]["images_per_second"] > 0
    assert variants["group_pn_fused"]["speed_ratio"] is None


@pytest.mark.parametrize("flag", ["--models", "--micro-batches"])
def test_bad_flags_are_rejected(tmp_path, flag):
    with pytest.raises(SystemExit):
        benchmark.main([flag, "nope", "--no-readme"])


@needs_fused_op
def test_bfloat16_channels_last_run_trains_in_that_precision_and_layout(tmp_path, monkeypatch):
    """--dtype bfloat16 --channels-last: every variant's convolutions hold channels_last
    weights and run under bfloat16 autocast, and the images come in channels_last (past the
    stem a layer's output keeps whatever layout its op gives: the fused CPU op's is NCHW);
    the report says so."""
    from torch import nn

    seen = set()
    forward = nn.Conv2d.forward

    def recording(self, images):
        seen.add((images.is_contiguous(memory_format=torch.channels_last),
                  self.weight.is_contiguous(memory_format=torch.channels_last),
                  cpu_autocast()))
        return forward(self, images)

    monkeypatch.setattr(nn.Conv2d, "forward", recording)
    report = run(tmp_path, "--resolution", "32", "--micro-batches", "2", "--dtype", "bfloat16",
                 "--channels-last")
    assert (True, True, True) in seen and {(weights, autocast) for _, weights, autocast
                                            in seen} == {(True, True)}
    assert report["environment"]["dtype"] == "bfloat16" and report["environment"]["channels_last"]
    assert all(result["images_per_second"] > 0
               for result in report["results"][0]["variants"].values())
