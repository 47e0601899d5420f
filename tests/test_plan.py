"""The memory planner (`python -m train.plan`) against numbers counted by hand."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from proxynorm.ops import cpu
from models import get_model
from train import plan
from train.build import resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# digits_resnet, whose module order the byte counts below were worked out for
TINY = {"model": "digits_resnet", "image_size": "16", "micro_batch_size": "4",
        "cpu_threads": "1"}
# Byte counts that assume Proxy Norm's fused CPU op (tests/test_fused_op.py fails when it
# is not built; torch 2.0, PopTorch's pin, has no build of it and runs the eager path)
needs_fused_op = pytest.mark.skipif(not cpu.load(), reason="needs the fused CPU op")


def tiny_config(**flags):
    """digits_resnet (78k parameters) on 16x16 digits: a training step takes milliseconds."""
    return resolve_config("digits_resnet_group_pn", {**TINY, **flags})


def parameter_count():
    return sum(p.numel() for p in get_model("digits_resnet", norm="group_pn", num_classes=10,
                                             in_channels=1).parameters())


@pytest.mark.parametrize("precision, size", [("32.32", 4), ("16.32", 4), ("16.16", 2)])
def test_parameter_bytes_are_parameters_times_the_weight_dtype(precision, size):
    report = plan.plan(tiny_config(precision=precision), norms=[])
    stage, = report["stages"]
    assert stage["parameters"] == parameter_count()
    assert stage["parameter_bytes"] == stage["gradient_bytes"] == parameter_count() * size
    # sgd's velocity, float32 at every precision as the IPU engine asks PopTorch
    assert stage["optimizer_bytes"] == parameter_count() * 4
    assert stage["accumulator_bytes"] == 0  # gradient_accumulation 1


def test_accumulation_and_optimizers_add_float32_parameter_sized_buffers():
    stage, = plan.plan(tiny_config(gradient_accumulation="2", optimizer="adamw",
                                   precision="16.16"), norms=[])["stages"]
    assert stage["accumulator_bytes"] == parameter_count() * 4
    assert stage["optimizer_bytes"] == 2 * parameter_count() * 4
    for optimizer, momentum, slots in (("sgd", 0.0, 0), ("sgd", 0.9, 1), ("rmsprop", 0.0, 1),
                                       ("rmsprop", 0.9, 2), ("adamw", 0.9, 2)):
        assert plan.optimizer_slots({"optimizer": optimizer, "momentum": momentum}) == slots


@needs_fused_op
def test_16_16_halves_the_weights_and_16_x_the_activations():
    full, half = (plan.plan(tiny_config(precision=p), norms=[])["stages"][0]
                  for p in ("32.32", "16.16"))
    assert 2 * half["parameter_bytes"] == full["parameter_bytes"]
    assert 2 * half["gradient_bytes"] == full["gradient_bytes"]
    assert half["optimizer_bytes"] == full["optimizer_bytes"]
    # float32 per-group and per-channel statistics stay float32 under bfloat16
    assert full["activation_bytes"] / 2 <= half["activation_bytes"] < 0.55 * full[
        "activation_bytes"]


def test_stages_begin_in_forward_order_and_share_out_the_parameters():
    # digits_resnet registers conv1, maxpool, bn1 but runs conv1 -> bn1 -> maxpool
    report = plan.plan(tiny_config(pipeline_splits="maxpool,layer3,bn1"), norms=[])
    stages = report["stages"]
    assert [s["begins_at"] for s in stages] == ["input", "bn1", "maxpool", "layer3"]
    model = get_model("digits_resnet", norm="group_pn", num_classes=10, in_channels=1)
    count = {}
    for name, parameter in model.named_parameters():
        count[name.split(".")[0]] = count.get(name.split(".")[0], 0) + parameter.numel()
    # a stage runs from its module to the next split: maxpool's takes layer1 and layer2
    assert [s["parameters"] for s in stages] == [
        count["conv1"], count["bn1"], count["layer1"] + count["layer2"],
        count["layer3"] + count["fc"]]
    assert sum(s["parameters"] for s in stages) == parameter_count()


def test_splitting_conserves_the_activations_and_stashes_earlier_stages():
    whole, = plan.plan(tiny_config(), norms=[])["stages"]
    stages = plan.plan(tiny_config(pipeline_splits="layer2,layer3"), norms=[])["stages"]
    assert sum(s["activation_bytes"] for s in stages) == whole["activation_bytes"]
    # PopART stashes a stage's input for 2 x (stages after it) + 1 micro-batches
    assert [s["stash_size"] for s in stages] == [5, 3, 0] and whole["stash_size"] == 0
    assert stages[0]["input_bytes"] == whole["input_bytes"] == 4 * 1 * 16 * 16 * 4
    for s in stages:
        assert s["stash_bytes"] == s["stash_size"] * s["input_bytes"]
        assert s["total_bytes"] == sum(s[key] for key in (
            "parameter_bytes", "gradient_bytes", "accumulator_bytes", "optimizer_bytes",
            "activation_bytes", "stash_bytes"))


def test_activations_of_a_convolution_are_counted_by_hand():
    # conv saves its input (its weight is a parameter); the flatten saves nothing; the loss
    # saves log_softmax's output, the int64 labels and nll_loss's float32 total weight
    model = nn.Sequential(nn.Conv2d(1, 10, 8, bias=False), nn.Flatten())
    data = plan.Data(None, None, 10, 1, 8)
    config = tiny_config(pipeline_splits="1")
    activations, inputs, parameters, starts = plan.measure(model, data, config, 3)
    assert starts == ["input", "1"] and parameters == [10 * 8 * 8, 0]
    assert activations == [3 * 1 * 8 * 8 * 4, 3 * 10 * 4 + 3 * 8 + 4]
    assert inputs == [3 * 1 * 8 * 8 * 4, 3 * 10 * 1 * 1 * 4]  # the images, the conv's output


@needs_fused_op
def test_fused_proxy_norm_keeps_no_more_than_batch_norm_when_it_can():
    fits = plan.plan(tiny_config(act="silu"), norms=["batch", "group_pn"])["norms"]
    per_sample = {norm: fit["stages"][0]["activation_bytes_per_sample"]
                  for norm, fit in fits.items()}
    # with silu BatchNorm keeps its output for the activation's backward; the fused op
    # keeps only its input and per-group statistics
    assert per_sample["group_pn"] < per_sample["batch"]
    # with relu the next convolution keeps the norm's output either way: group_pn keeps
    # what GroupNorm keeps (input, per-group statistics), a little more than BatchNorm
    fits = plan.plan(tiny_config(act="relu"), norms=["batch", "group", "group_pn"])["norms"]
    per_sample = {norm: fit["stages"][0]["activation_bytes_per_sample"]
                  for norm, fit in fits.items()}
    assert per_sample["group_pn"] == per_sample["group"] >= per_sample["batch"]


def test_the_linear_fit_matches_a_measurement():
    config = tiny_config(pipeline_splits="layer3")
    fit = plan.plan(config, norms=["group_pn"])["norms"]["group_pn"]
    measured = plan.plan(tiny_config(pipeline_splits="layer3", micro_batch_size="5"),
                         norms=[])["stages"]
    for stage, actual in zip(fit["stages"], measured):
        assert plan.stage_bytes(stage, 5) == actual["total_bytes"]


@needs_fused_op
@pytest.mark.parametrize("splits, device_memory_mb", [("", 1), ("layer2", 1), ("layer2", 5)])
def test_the_largest_micro_batch_fits_and_one_more_does_not(splits, device_memory_mb):
    report = plan.plan(tiny_config(pipeline_splits=splits,
                                   device_memory_mb=str(device_memory_mb)),
                       norms=["batch", "group_pn"])
    budget = device_memory_mb * plan.MB
    for fit in report["norms"].values():
        largest, stages = fit["largest_micro_batch"], fit["stages"]
        # one stage: 0.94 MB of weights leave less than a sample's 0.28 MB of activations
        assert (largest == 0) == (splits == "")
        assert all(plan.stage_bytes(s, largest) <= budget for s in stages) or largest == 0
        assert any(plan.stage_bytes(s, largest + 1) > budget for s in stages)


def test_largest_micro_batch_by_hand():
    stage = {"weight_bytes": 100, "fixed_activation_bytes": 10,
             "activation_bytes_per_sample": 20, "input_bytes_per_sample": 5, "stash_size": 2}
    # 100 + 10 + (20 + 2 x 5) m <= 300 up to m = 6 (290), not at 7 (320)
    assert plan.largest_micro_batch([stage], 300) == 6
    assert plan.largest_micro_batch([stage, {**stage, "stash_size": 0}], 300) == 6
    assert plan.largest_micro_batch([stage], 100) == 0
    weights_only = {**stage, "fixed_activation_bytes": 0, "activation_bytes_per_sample": 0,
                    "input_bytes_per_sample": 0}
    assert plan.largest_micro_batch([stage, weights_only], 300) == 6
    assert plan.largest_micro_batch([stage, {**weights_only, "weight_bytes": 301}], 300) == 0


def test_a_norm_that_cannot_train_at_micro_batch_1_is_reported_not_fatal():
    # 8x8 digits leave BatchNorm one value per channel in layer3 at micro-batch 1
    report = plan.plan(tiny_config(image_size="8", norm="batch", micro_batch_size="2"),
                       norms=["batch", "group_pn"])
    assert "value per channel" in report["norms"]["batch"]["error"]
    assert report["norms"]["group_pn"]["largest_micro_batch"] > 0
    assert "- batch: digits_resnet with batch cannot train at micro-batch 1" in (
        plan.format_report(report))


def test_json_report_and_printed_tables(tmp_path, capsys):
    path = tmp_path / "plan.json"
    status = plan.main(["--config", "digits_resnet_group_pn", "--model", "digits_resnet",
                        "--image-size", "16",
                        "--pipeline-splits", "layer3", "--plan-norms", "group_pn,batch",
                        "--json", str(path)])
    assert status == 0
    report = json.loads(path.read_text())
    assert [s["begins_at"] for s in report["stages"]] == ["input", "layer3"]
    assert list(report["norms"]) == ["group_pn", "batch"]
    assert report["unit"] == "MB = 10^6 bytes" and report["device_memory_mb"] == 900
    out = capsys.readouterr().out
    assert "0: input" in out and "1: layer3" in out and "not modelled: code" in out
    assert f"{parameter_count():,}" not in out  # split: no stage holds every parameter
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unknown_split_is_one_line_with_status_2_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "train.plan", "--pipeline-splits", "layer9"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: pipeline_splits: digits_preact_resnet has no module "
                             "'layer9'; nearby: layer3, layer2, layer1\n")


@pytest.mark.parametrize("flags, message", [
    (["--plan-norms", "batch,groop"],
     "error: --plan-norms: unknown norm 'groop' (did you mean 'group'?)"),
    (["--json", "/nonexistent/folder/plan.json"], "error: --json: /nonexistent/folder is not"),
    (["--micro-batch", "2"], "error: unknown option --micro-batch (did you mean "
                             "--micro-batch-size?)"),
])
def test_planner_flag_errors_are_one_line_with_status_2(flags, message, capsys):
    assert plan.main(flags) == 2
    out, err = capsys.readouterr()
    assert err.startswith(message) and len(err.splitlines()) == 1 and out == ""


def test_benchmark_saved_bytes_is_the_planner_count():
    from benchmarks.measure import saved_bytes

    conv = nn.Conv2d(3, 8, 3, bias=False)
    x = torch.randn(2, 3, 10, 10)
    storages = plan.saved_storages(lambda: conv(x))
    assert sorted(size for _, size in storages.values()) == sorted(
        saved_bytes(lambda: conv(x), conv.parameters()).values())
