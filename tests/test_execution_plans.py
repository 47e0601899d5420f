"""The execution plan cannot change the maths of a batch-independent norm.

One optimiser step from the same initial weights on the same global batch of 16, split as
(micro-batch, accumulation, replicas) = (2, 4, 2), (4, 2, 2) and (16, 1, 1): GN+PN and LN+PN
train the same weights; BatchNorm does not (its statistics are the micro-batch's), and
sync_batch over all replicas without accumulation is BatchNorm over the whole global batch.
In one process replicas are emulated; under torchrun (2 gloo processes on 127.0.0.1, which
these tests launch) each process is one replica, and the two must agree as well.
"""
import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.processes import skip_where_torchrun_can_hang
from train.build import build_model, resolve_config
from train.distributed import Context, free_port
from train.engine import PyTorchEngine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = SimpleNamespace(num_classes=10, in_channels=1)
PLANS = {"2x4x2": (2, 4, 2), "4x2x2": (4, 2, 2), "16x1x1": (16, 1, 1)}


def execution(micro_batch, accumulation, replicas):
    return {"micro_batch_size": micro_batch, "gradient_accumulation": accumulation,
            "replicas": replicas}


def one_step(norm, plan, initial=None, device="cpu", **overrides):
    """(weights before, weights after) one step of `plan` on a fixed global batch of 16."""
    config = resolve_config(f"digits_resnet_{norm}", {**execution(*plan), **overrides})
    model = build_model(config, DIGITS)
    if initial is not None:
        model.load_state_dict(initial)
    before = copy.deepcopy(model.state_dict())
    engine = PyTorchEngine(model, config, torch.device(device), Context())
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 16, 16, generator=generator)
    targets = torch.randint(10, (16,), generator=generator)
    engine.train_step(images, targets)
    return before, {k: v.cpu() for k, v in engine.model.state_dict().items()}


def trained_parameters(state):
    return {k: v for k, v in state.items()
            if v.is_floating_point() and "running" not in k}


def relative_differences(a, b, reference):
    """max over tensors of |a - b| / |b - reference| (the difference relative to the update)."""
    return max(float((a[k] - b[k]).norm() / (b[k] - reference[k]).norm().clamp_min(1e-30))
               for k in trained_parameters(reference))


def assert_same_weights(a, b):
    """Every trained tensor equal to 1e-5 relative (its norm)."""
    for k in trained_parameters(a):
        assert float((a[k] - b[k]).norm()) <= 1e-5 * float(b[k].norm()) + 1e-12, k


@pytest.mark.parametrize("norm", ["group_pn", "layer_pn"])
def test_batch_independent_norms_train_the_same_weights_under_every_plan(norm):
    before, reference = one_step(norm, PLANS["16x1x1"])
    for name in ("2x4x2", "4x2x2"):
        _, after = one_step(norm, PLANS[name], initial=before)
        assert_same_weights(after, reference)
        assert relative_differences(after, reference, before) < 1e-4, name


def test_batch_norm_trains_different_weights_under_different_plans():
    """The batch dependence Proxy Norm removes: each plan normalises over other samples."""
    before, reference = one_step("batch", PLANS["16x1x1"])
    for name in ("2x4x2", "4x2x2"):
        _, after = one_step("batch", PLANS[name], initial=before)
        assert relative_differences(after, reference, before) > 0.05, name


def test_sync_batch_over_all_replicas_is_batch_norm_over_the_global_batch():
    before, whole = one_step("batch", PLANS["16x1x1"])
    _, synced = one_step("sync_batch", (8, 1, 2), initial=before, bn_group_size=0)
    assert_same_weights(synced, whole)
    assert relative_differences(synced, whole, before) < 1e-4
    for key in ("running_mean", "running_var"):
        for name in (k for k in whole if k.endswith(key)):
            torch.testing.assert_close(synced[name], whole[name], rtol=1e-5, atol=1e-6)


# -- torchrun ---------------------------------------------------------------------------

def train_run(run_dir, norm, plan, processes=1, extra=()):
    """Trains one step of digits_resnet_NORM with `plan` and returns the checkpoint's
    weights; with processes > 1 under torchrun (gloo on 127.0.0.1)."""
    launcher = [sys.executable, "-m", "train"]
    if processes > 1:
        skip_where_torchrun_can_hang()
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                    "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
                    "--master-port", str(free_port()), "-m", "train"]
    micro_batch, accumulation, replicas = plan
    command = [*launcher, "--config", f"digits_resnet_{norm}", "--output-dir", str(run_dir),
               "--max-steps", "1", "--validation", "false", "--wandb-mode", "disabled",
               "--engine", "cpu", "--micro-batch-size", str(micro_batch),
               "--gradient-accumulation", str(accumulation), "--replicas", str(replicas), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint_last.pt"), map_location="cpu",
                            weights_only=True)
    return checkpoint["engine"]["model"]


def test_torchrun_group_pn_equals_one_process(tmp_path):
    """2 processes x (micro 2, accumulation 4) == one process emulating the same plan ==
    one micro-batch of 16: the application end to end, data loading included."""
    whole = train_run(tmp_path / "whole", "group_pn", PLANS["16x1x1"])
    emulated = train_run(tmp_path / "emulated", "group_pn", PLANS["2x4x2"])
    distributed = train_run(tmp_path / "torchrun", "group_pn", PLANS["2x4x2"], processes=2)
    assert_same_weights(distributed, whole)
    assert_same_weights(distributed, emulated)


def test_torchrun_layer_pn_equals_one_process(tmp_path):
    whole = train_run(tmp_path / "whole", "layer_pn", PLANS["16x1x1"])
    distributed = train_run(tmp_path / "torchrun", "layer_pn", PLANS["4x2x2"], processes=2)
    assert_same_weights(distributed, whole)


def test_torchrun_batch_norms(tmp_path):
    """Per-replica BatchNorm in 2 processes is what one process emulates (and not BatchNorm
    over the global batch); sync_batch over both processes is BatchNorm over all 16."""
    whole = train_run(tmp_path / "whole", "batch", PLANS["16x1x1"])
    emulated = train_run(tmp_path / "emulated", "batch", (8, 1, 2))
    per_replica = train_run(tmp_path / "per_replica", "batch", (8, 1, 2), processes=2)
    synced = train_run(tmp_path / "synced", "sync_batch", (8, 1, 2), processes=2,
                       extra=["--bn-group-size", "0"])
    assert_same_weights(per_replica, emulated)
    for key in whole:  # running statistics too: the mean over replicas, as emulated
        torch.testing.assert_close(per_replica[key], emulated[key], rtol=1e-5, atol=1e-6)
    assert_same_weights(synced, whole)
    with pytest.raises(AssertionError):
        assert_same_weights(per_replica, whole)


def test_torchrun_needs_one_process_per_replica(monkeypatch):
    from train import distributed
    from train.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = resolve_config("digits_resnet_group_pn", {"replicas": 4})
    with pytest.raises(ConfigError, match="torchrun started 2 processes, one replica each, but "
                                          "replicas is 4: set --replicas 2"):
        distributed.setup(config, torch.device("cpu"))


def val_record(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [record for record in records if record["kind"] == "val"][-1]


def test_torchrun_validates_the_whole_set_once(tmp_path):
    """17 validation images over 2 processes (9 + 8, in batches of 2: 5 and 4 batches):
    the summed loss and accuracy are one process's."""
    synthetic = ["--data", "synthetic", "--synthetic-samples", "68", "--synthetic-num-classes",
                 "4", "--image-size", "16", "--validation", "true", "--max-steps", "2"]
    train_run(tmp_path / "whole", "group_pn", PLANS["16x1x1"], extra=synthetic)
    train_run(tmp_path / "torchrun", "group_pn", PLANS["2x4x2"], processes=2, extra=synthetic)
    whole, distributed = val_record(tmp_path / "whole"), val_record(tmp_path / "torchrun")
    assert distributed["val_accuracy"] == whole["val_accuracy"]
    assert distributed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)


def test_torchrun_resumes_like_an_uninterrupted_run(tmp_path):
    """2 steps under torchrun, then 2 more resumed from its checkpoint == 4 without a stop.
    The reference is the same plan: over several steps the plans' last-bit differences can
    grow past 1e-5 (on some CPUs they do, from step 2, with Proxy Norm), so the plans are
    compared one step at a time above, and here only the resume."""
    run_dir = tmp_path / "torchrun"
    train_run(run_dir, "group_pn", PLANS["2x4x2"], processes=2, extra=["--max-steps", "2"])
    resumed = train_run(run_dir, "group_pn", PLANS["2x4x2"], processes=2,
                        extra=["--max-steps", "4", "--resume", "auto"])
    whole = train_run(tmp_path / "whole", "group_pn", PLANS["2x4x2"], processes=2,
                      extra=["--max-steps", "4"])
    assert_same_weights(resumed, whole)


@pytest.mark.parametrize("norm", ["batch", "group_pn"])
def test_channels_last_trains_the_same_weights_in_nhwc(norm):
    """--channels-last: the engine holds its convolutions' weights and hands the model its
    images in channels_last, and one step trains what the NCHW step trains (to rounding:
    other convolution kernels add in other orders)."""
    before, reference = one_step(norm, PLANS["2x4x2"])
    config = resolve_config(f"digits_resnet_{norm}", {**execution(*PLANS["2x4x2"]),
                                                       "channels_last": True})
    model = build_model(config, DIGITS)
    model.load_state_dict(before)
    engine = PyTorchEngine(model, config, torch.device("cpu"), Context())
    seen = []
    engine.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    conv = next(m for m in engine.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 16, 16, generator=generator)
    targets = torch.randint(10, (16,), generator=generator)
    engine.train_step(images, targets)
    engine.eval_step(images, targets)
    # one input channel: NCHW strides are channels_last ones too, so look at the strides
    assert all(x.stride() == (256, 1, 16, 1) for x in seen)
    assert relative_differences(engine.model.state_dict(), reference, before) < 1e-4
