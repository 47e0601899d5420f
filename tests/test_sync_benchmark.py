"""benchmarks/sync.py counts what each norm all-reduces per step across real processes, and
benchmarks/sync_cost.py projects those counts with the formula its docstring states."""
import json
import math

import pytest

from benchmarks import sync, sync_cost
from models import get_model
from proxynorm.norms import BatchNormAct
from tests.processes import skip_where_torchrun_can_hang


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """One torchrun launch of the benchmark: 2 gloo processes, a small model, one round."""
    skip_where_torchrun_can_hang()
    folder = tmp_path_factory.mktemp("sync")
    sync.main(["--models", "digits_preact_resnet", "--processes", "2", "--micro-batches", "2",
               "--rounds", "1", "--cores", "2", "--no-readme", "--output",
               str(folder / "sync.json"), "--plot", str(folder / "sync.png")])
    with open(folder / "sync.json") as f:
        report = json.load(f)
    assert (folder / "sync.png").stat().st_size > 0
    return report["results"][0]["rows"][0]["norms"]


def norm_channels(norm):
    model = get_model("digits_preact_resnet", norm=norm, num_classes=10)
    return [m.num_features for m in model.modules() if isinstance(m, BatchNormAct)]


def parameter_bytes(norm):
    model = get_model("digits_preact_resnet", norm=norm, num_classes=10)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_counts_are_what_each_norm_sends(counted):
    channels = norm_channels("sync_batch")
    moments = [3 * c * 8 for c in channels]  # (count, sum, sum of squares) in float64
    stats = counted["sync_batch"]["collectives"]
    assert stats["sync_batch statistics, forward"]["call_bytes"] == moments
    assert sorted(stats["sync_batch statistics, backward"]["call_bytes"]) == sorted(moments)
    # per-replica BatchNorm: one average of running mean and variance (float32) per step
    running = counted["batch"]["collectives"]["BatchNorm running statistics"]
    assert running["calls"] == 1 and running["bytes"] == 2 * 4 * sum(norm_channels("batch"))
    for norm in ("group_pn", "layer_pn"):  # nothing but the step's loss and accuracy
        collectives = counted[norm]["collectives"]
        assert set(collectives) == {sync.DDP, "loss and accuracy"}
        assert sync.beyond_ddp(collectives) == (1, 2 * 8)
    for norm, result in counted.items():  # DDP all-reduces every gradient once
        assert result["collectives"][sync.DDP]["bytes"] == parameter_bytes(norm), norm
        assert result["images_per_second"] > 0


def test_all_reduce_time_is_the_stated_formula():
    fabric = sync_cost.Fabric("test", domain=8, latency_in=1e-6, bandwidth_in=100e9,
                              latency_out=5e-6, bandwidth_out=10e9, images_per_second={})
    size = 4096
    assert sync_cost.all_reduce_seconds(size, 1, fabric) == 0.0
    inner = 2 * 3 * 1e-6 + 2 * 7 / 8 * size / 100e9
    assert sync_cost.all_reduce_seconds(size, 8, fabric) == pytest.approx(inner)
    outer = 2 * 2 * 5e-6 + 2 * 3 / 4 * size / 10e9  # 32 replicas: 4 domains of 8
    assert sync_cost.all_reduce_seconds(size, 32, fabric) == pytest.approx(inner + outer)


def test_projection_adds_every_counted_collective_to_the_compute():
    sizes = [96, 192, 384]
    collectives = {source: {"calls": len(sizes), "bytes": sum(sizes), "call_bytes": sizes}
                   for source in sync_cost.STATISTICS}
    counts = {"results": [{"model": model, "rows": [{"norms": {"sync_batch": {
        "collectives": collectives}}}]} for model in sync_cost.MODELS.values()]}
    rows = sync_cost.project(counts)
    assert len(rows) == (len(sync_cost.FABRICS) * len(sync_cost.MODELS)
                         * len(sync_cost.MICRO_BATCHES) * len(sync_cost.REPLICAS))
    fabric = sync_cost.FABRICS[0]
    row = next(r for r in rows if r["fabric"] == fabric.name and r["model"] == "ResNet-50"
               and r["micro_batch"] == 4 and r["replicas"] == 256)
    sync_seconds = 2 * sum(sync_cost.all_reduce_seconds(s * fabric.bytes_scale, 256, fabric)
                           for s in sizes)
    compute = 4 / fabric.images_per_second["ResNet-50"]
    assert row["collectives_per_step"] == 6
    assert row["sync_us"] == pytest.approx(1e6 * sync_seconds)
    assert row["speedup"] == pytest.approx((compute + sync_seconds) / compute)
    assert math.isfinite(row["speedup"]) and row["speedup"] > 1


def test_report_only_redraws_from_the_json_without_launching(tmp_path, monkeypatch, capsys):
    def no_launch(*args):
        raise AssertionError("--report-only launched a benchmark")

    monkeypatch.setattr(sync, "launch", no_launch)
    norms = {norm: {"images_per_second": speed, "collectives": {}}
             for norm, speed in (("sync_batch", 10.0), ("group_pn", 25.0))}
    report = {"environment": {"models": ["m"], "processes": [2, 4], "micro_batches": [1],
                              "norms": ["sync_batch", "group_pn"], "rounds": 1, "cores": 2,
                              "cpu": "cpu", "torch": "t"},
              "results": [{"model": "m", "processes": processes, "threads_per_process": 1,
                           "rows": [{"micro_batch": 1, "norms": norms}]}
                          for processes in (2, 4)]}
    (tmp_path / "sync.json").write_text(json.dumps(report))
    sync.main(["--report-only", "--no-readme", "--output", str(tmp_path / "sync.json"),
               "--plot", str(tmp_path / "sync.png")])
    assert (tmp_path / "sync.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `m` | 4 | 1 | 10.0 | 25.0 | **2.50x** |" in capsys.readouterr().out
    assert json.loads((tmp_path / "sync.json").read_text()) == report  # left as it was
