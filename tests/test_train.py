"""`python -m train` end to end: run folders, resume, execution-plan invariance, failures.

Runs are in-process (train.__main__.main) and a few steps long at tiny sizes, except the
signal test, which needs a process of its own.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_datasets import write_cifar10, write_image_folder
from train.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 random 16x16 images in 4 classes: 4 steps per epoch at a global batch of 16
SYNTHETIC = ["--data", "synthetic", "--synthetic-samples", "64", "--synthetic-num-classes", "4",
             "--image-size", "16", "--log-every", "1"]
# torch 2.0 (PopTorch's pin) refuses torch.compile on Python 3.11 and later (torch 2.1 added
# it); IPU hosts run Python 3.8 or 3.10, where it compiles
needs_compile = pytest.mark.skipif(sys.version_info >= (3, 11) and torch.__version__ < "2.1",
                                   reason="torch 2.0 runs torch.compile on Python <= 3.10")


def train(run_dir, *flags, config="digits_resnet_group_pn"):
    return main(["--config", config, "--output-dir", str(run_dir), "--wandb-mode", "disabled",
                 *[str(flag) for flag in flags]])


def plan(micro_batch, accumulation, replicas):
    return ["--micro-batch-size", micro_batch, "--gradient-accumulation", accumulation,
            "--replicas", replicas]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_digits_run_folder(tmp_path, capsys):
    from train.files import RunFolder

    run_dir = tmp_path / "run"
    status = main(["--config", "digits_resnet_group_pn", "--output-dir", str(run_dir),
                   "--max-steps", "3", "--log-every", "1", "--wandb-mode", "offline"])
    assert status == 0
    files = set(os.listdir(run_dir))
    assert {"config.yml", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt",
            "summary.json", "wandb"} <= files
    assert files == {*RunFolder.NAMES, "wandb"}  # RunFolder knows every file (wandb/: wandb's)
    result = summary(run_dir)
    for key in ("config", "epochs", "steps", "val_accuracy", "best_val_accuracy",
                "train_images_per_second", "wall_seconds"):
        assert result[key] is not None, key
    assert result["steps"] == 3 and result["status"] == "max_steps"
    assert result["config"]["norm"] == "group_pn" and result["config"]["max_steps"] == 3
    kinds = [record["kind"] for record in records(run_dir)]
    assert kinds == ["train"] * 3 + ["val"]
    checkpoint = load(run_dir / "checkpoint_last.pt")  # a plain dict, weights_only
    assert checkpoint["step"] == 3 and checkpoint["config"]["config"] == "digits_resnet_group_pn"
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("digits_resnet_group_pn: stopped at step 3 (max_steps), "
                                "val_accuracy ")
    assert str(run_dir) in last_line


def test_synthetic_run(tmp_path):
    assert train(tmp_path / "run", *SYNTHETIC, *plan(8, 2, 1), "--epochs", 1,
                 "--precision", "16.32", "--grad-clip-norm", 1.0, "--validation", "false") == 0
    result = summary(tmp_path / "run")
    assert result["steps"] == 4 and result["val_accuracy"] is None


def test_image_folder_run(tmp_path):
    write_image_folder(tmp_path / "images")
    assert train(tmp_path / "run", "--data", "imagenet", "--data-path", tmp_path / "images",
                 "--image-size", 16, *plan(2, 2, 1), "--epochs", 2, "--num-workers", 1) == 0
    result = summary(tmp_path / "run")
    assert result["steps"] == 4 and result["config"]["data"] == "imagenet"


def test_cifar_folder_run(tmp_path):
    write_cifar10(tmp_path / "cifar")
    assert train(tmp_path / "run", "--data-path", tmp_path / "cifar", "--epochs", 1,
                 *plan(4, 1, 2), "--num-workers", 0, "--mixup-alpha", 0.2, "--cutmix-alpha", 1.0,
                 config="cifar10_preact_resnet20_group_pn") == 0
    assert summary(tmp_path / "run")["steps"] == 2  # 20 images: two global batches of 8


def test_resume_continues_exactly(tmp_path):
    flags = [*SYNTHETIC, *plan(8, 2, 1), "--epochs", 3, "--warmup-epochs", 1,
             "--mixup-alpha", 0.4, "--weight-avg-decay", 0.5, "--optimizer", "adamw"]
    assert train(tmp_path / "straight", *flags) == 0
    for stop in (4, 6):  # at the end of epoch 1, and in the middle of epoch 2
        run_dir = tmp_path / f"stop{stop}"
        assert train(run_dir, *flags, "--max-steps", stop) == 0
        assert train(run_dir, *flags, "--resume", "auto") == 0
        straight = load(tmp_path / "straight" / "checkpoint_last.pt")
        resumed = load(run_dir / "checkpoint_last.pt")
        assert resumed["step"] == straight["step"] == 12
        for part in ("engine", "weight_average"):
            for name, tensor in straight[part]["model"].items():
                assert torch.equal(tensor, resumed[part]["model"][name]), (stop, part, name)
        assert straight["val_accuracy"] == resumed["val_accuracy"]
    steps = [r["step"] for r in records(tmp_path / "stop6") if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # the resumed run appends to metrics.jsonl


def final_weights(run_dir):
    return load(os.path.join(run_dir, "checkpoint_last.pt"))["engine"]["model"]


def assert_same_weights(a, b, same=True):
    close = all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
                for k in a if a[k].is_floating_point())
    assert close == same


def test_execution_plan_does_not_change_a_batch_independent_run(tmp_path):
    """Sample order depends on the seed and global batch only, so with group_pn any split of
    the global batch of 16 into micro-batches, accumulation and replicas trains the same."""
    weights = []
    for i, execution in enumerate([plan(16, 1, 1), plan(8, 2, 1), plan(8, 1, 2), plan(4, 2, 2)]):
        assert train(tmp_path / str(i), *SYNTHETIC, *execution, "--max-steps", 3,
                     "--mixup-alpha", 0.4, "--validation", "false") == 0
        weights.append(final_weights(tmp_path / str(i)))
    for other in weights[1:]:
        assert_same_weights(weights[0], other)


@needs_compile
def test_compiled_network_trains_the_eager_weights(tmp_path):
    """--compile true changes how the steps run, not what they compute; the checkpoint keeps
    the model's own names, so a compiled run resumes eagerly and the other way round."""
    flags = [*SYNTHETIC, *plan(8, 1, 2), "--max-steps", 2, "--validation", "false"]
    assert train(tmp_path / "eager", *flags) == 0
    assert train(tmp_path / "compiled", *flags, "--compile", "true") == 0
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert compiled.keys() == eager.keys()
    assert_same_weights(eager, compiled)
    assert train(tmp_path / "compiled", *flags[:-4], "--max-steps", 3, "--validation", "false",
                 "--resume", "auto") == 0


def test_compile_mode_reaches_torch_compile_and_needs_compile(tmp_path, capsys, monkeypatch):
    """--compile-mode reduce-overhead (CUDA graphs on a GPU) is torch.compile's mode; without
    --compile true it would do nothing, so it is refused in one line."""
    modes = []

    def recording_compile(module, mode=None):
        modes.append(mode)
        return module

    monkeypatch.setattr(torch, "compile", recording_compile)
    flags = [*SYNTHETIC, *plan(8, 1, 2), "--max-steps", 1, "--validation", "false"]
    assert train(tmp_path / "run", *flags, "--compile", "true",
                 "--compile-mode", "reduce-overhead") == 0
    assert modes == ["reduce-overhead"]
    assert train(tmp_path / "refused", *flags, "--compile-mode", "max-autotune") == 2
    assert error_line(capsys) == ("error: compile_mode max-autotune is torch.compile's mode: "
                                  "add --compile true")
    assert not (tmp_path / "refused").exists()


def test_emulated_replicas_keep_per_replica_batchnorm_statistics(tmp_path):
    """BatchNorm over 2 replicas of 8 trains like 2 accumulated micro-batches of 8, and
    unlike one micro-batch of 16."""
    runs = {"accumulated": plan(8, 2, 1), "replicas": plan(8, 1, 2), "whole": plan(16, 1, 1)}
    weights = {}
    for name, execution in runs.items():
        assert train(tmp_path / name, *SYNTHETIC, *execution, "--max-steps", 2,
                     "--validation", "false", config="digits_resnet_batch") == 0
        weights[name] = {k: v for k, v in final_weights(tmp_path / name).items()
                         if "running" not in k and "num_batches" not in k}
    assert_same_weights(weights["accumulated"], weights["replicas"])
    assert_same_weights(weights["accumulated"], weights["whole"], same=False)


def error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_data_path_is_one_line(tmp_path, capsys):
    assert train(tmp_path / "run", "--data-path", tmp_path / "nowhere",
                 config="cifar10_preact_resnet20_group_pn") == 2
    line = error_line(capsys)
    assert str(tmp_path / "nowhere") in line and "cifar-10-python.tar.gz" in line


def test_unknown_key_is_one_line(tmp_path, capsys):
    assert train(tmp_path / "run", "--weight-dekay", 0.1) == 2
    assert error_line(capsys) == \
        "error: unknown option --weight-dekay (did you mean --weight-decay?)"


def test_corrupt_image_is_named_or_skipped(tmp_path, capsys):
    write_image_folder(tmp_path / "images")
    bad = tmp_path / "images" / "train" / "dog" / "2.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    flags = ["--data", "imagenet", "--data-path", tmp_path / "images", "--image-size", 16,
             *plan(4, 2, 1), "--epochs", 1, "--validation", "false"]
    assert train(tmp_path / "stop", *flags, "--num-workers", 1) == 2  # raised in a worker
    assert error_line(capsys) == f"error: cannot read image {bad}: " + \
        "cannot identify image file <_io.BufferedReader name='" + str(bad) + "'>"
    assert train(tmp_path / "skip", *flags, "--skip-corrupt-images") == 0
    assert summary(tmp_path / "skip")["skipped_images"] == 1
    assert f"skipped corrupt image {bad}" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = [*SYNTHETIC, *plan(16, 1, 1), "--epochs", 3, "--validation", "false"]
    assert train(run_dir, *flags, "--max-steps", 2) == 0
    good = load(run_dir / "checkpoint_last.pt")
    capsys.readouterr()
    # an absurd learning rate overflows the weights; the next loss is not finite
    assert train(run_dir, *flags, "--resume", "auto", "--lr", 1e38, "--momentum", 0) == 1
    err = capsys.readouterr().err
    assert "error: loss is " in err and f"the last good checkpoint is {run_dir}" in err
    kept = load(run_dir / "checkpoint_last.pt")
    assert kept["step"] <= 4 and summary(run_dir)["status"] == "diverged"
    assert all(torch.isfinite(t).all() for t in kept["engine"]["model"].values()
               if t.is_floating_point())
    if kept["step"] == 2:
        assert torch.equal(kept["engine"]["model"]["fc.weight"],
                           good["engine"]["model"]["fc.weight"])


def test_checkpoint_from_another_model_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, *SYNTHETIC, *plan(16, 1, 1), "--max-steps", 1) == 0
    capsys.readouterr()
    assert train(tmp_path / "other", *SYNTHETIC, *plan(16, 1, 1), "--resume", run_dir,
                 "--norm", "batch") == 2
    line = error_line(capsys)
    assert "is from another model: norm group_pn (this run: batch)" in line
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"junk")
    assert train(tmp_path / "other", *SYNTHETIC, "--resume", not_a_checkpoint) == 2
    assert f"cannot read checkpoint {not_a_checkpoint}" in error_line(capsys)


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, *SYNTHETIC, *plan(16, 1, 1), "--max-steps", 1) == 0
    capsys.readouterr()
    assert train(run_dir, *SYNTHETIC, *plan(16, 1, 1), "--max-steps", 1) == 2
    assert "already holds a run" in error_line(capsys)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "train", "--output-dir", str(run_dir), "--wandb-mode", "disabled",
         *SYNTHETIC, *map(str, plan(16, 1, 1)), "--synthetic-samples", "100000", "--epochs", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM: stopping after this step" in err
    checkpoint = load(run_dir / "checkpoint_last.pt")
    assert checkpoint["step"] >= 2 and summary(run_dir)["status"] == "interrupted"
    assert f"--resume {run_dir}" in err


@pytest.mark.parametrize("cuda", [False, True])
def test_ipu_engine_without_poptorch_runs_as_auto(tmp_path, capsys, monkeypatch, cuda):
    """On a GPU where there is one (here: whether torch says so), else on the CPU."""
    if importlib.util.find_spec("poptorch") is not None:
        pytest.skip("PopTorch is installed")
    from train import engine

    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: cuda)
    if cuda:  # the device it picks, without a GPU to run on
        assert engine.resolve_device("ipu") == torch.device("cuda")
        assert capsys.readouterr().err == (
            "warning: engine ipu: PopTorch is not installed; running the PyTorch engine on "
            "the GPU (IPU-only settings are ignored)\n")
        return
    assert train(tmp_path / "run", *SYNTHETIC, *plan(16, 1, 1), "--max-steps", 1,
                 "--engine", "ipu", "--checkpoint-every", 1, "--epochs", 1) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: engine ipu: PopTorch is not installed; running the PyTorch "
                        "engine on the CPU (IPU-only settings are ignored)"]
    assert summary(tmp_path / "run")["device"] == "cpu"


def test_checkpoint_every(tmp_path):
    assert train(tmp_path / "run", *SYNTHETIC, *plan(16, 1, 1), "--epochs", 2,
                 "--checkpoint-every", 1, "--validation", "false") == 0
    files = sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("checkpoint"))
    assert files == ["checkpoint_epoch1.pt", "checkpoint_epoch2.pt", "checkpoint_last.pt"]


@pytest.mark.parametrize("flag, value, message", [
    ("--pipeline-splits", "layer9",
     "pipeline_splits: digits_preact_resnet has no module 'layer9'; nearby: layer3, layer2, "
     "layer1"),
    ("--recompute-checkpoints", "layer1,layer1", "recompute_checkpoints: 'layer1' is given twice"),
])
def test_module_names_are_checked_against_the_model(tmp_path, capsys, flag, value, message):
    assert train(tmp_path / "run", flag, value, "--max-steps", 1) == 2
    assert error_line(capsys) == f"error: {message}"
    assert not os.path.exists(tmp_path / "run")


def test_compile_only_needs_poptorch(tmp_path, capsys):
    assert train(tmp_path / "run", "--engine", "ipu", "--compile-only", "true") == 2
    assert error_line(capsys) == ("error: compile_only compiles IPU executables: it needs "
                                  "engine ipu and PopTorch (a Poplar SDK host)")


def test_a_resumed_runs_summary_covers_all_of_its_parts(tmp_path):
    """Images/s and wall time of a run stopped at step 2 and resumed to step 8 are those of
    both parts (the first part's come through the checkpoint)."""
    run_dir = tmp_path / "run"
    flags = [*SYNTHETIC, *plan(16, 1, 1), "--epochs", 2]
    assert train(run_dir, *flags, "--max-steps", 2) == 0
    first = summary(run_dir)
    assert first["train_images"] == 32
    assert load(run_dir / "checkpoint_last.pt")["totals"]["train_images"] == 32
    assert train(run_dir, *flags, "--resume", "auto") == 0
    both = summary(run_dir)
    assert both["train_images"] == 128 and both["steps"] == 8
    assert both["wall_seconds"] >= first["wall_seconds"]


def test_max_steps_says_where_it_stopped(tmp_path, capsys):
    """25 steps of 22 an epoch: the partial second epoch and the end say step 25, and the
    epochs have two decimals (not 1.13636)."""
    from train.loop import epochs_text

    assert train(tmp_path / "run", *SYNTHETIC, "--synthetic-samples", 352, *plan(16, 1, 1),
                 "--epochs", 3, "--max-steps", 25, "--log-every", 100) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("epoch 2/3, stopped at step 25 (max_steps): train loss ")
    assert lines[-1].startswith("digits_resnet_group_pn: stopped at step 25 (max_steps), "
                                "val_accuracy ")
    assert ", 1.14 epochs, 25 steps, " in lines[-1]
    assert [epochs_text(x) for x in (3.0, 1.2, 1 / 3, 0.004, 0)] == ["3", "1.2", "0.33",
                                                                    "0.004", "0"]


@pytest.mark.skipif(not hasattr(torch.library, "register_fake"),  # torch 2.0 (IPU hosts)
                    reason="the fused CPU op needs torch >= 2.4")
def test_the_run_records_how_proxy_norm_layers_compute(tmp_path, capsys, monkeypatch):
    """The environment (a built op, PROXYNORM_FUSED) decides between the fused op and the
    eager path: the start lines and summary.json say which ran, and a BatchNorm run says
    nothing of it."""
    from proxynorm.ops import cpu

    flags = [*SYNTHETIC, "--synthetic-samples", 32, *plan(16, 1, 1), "--epochs", 1,
             "--max-steps", 1, "--validation", "false"]
    assert cpu.load()
    for name, fused, expected in (("fused", "1", "fused CPU op (7 layers)"),
                                  ("eager", "0", "eager PyTorch (7 layers)")):
        monkeypatch.setenv("PROXYNORM_FUSED", fused)
        assert train(tmp_path / name, *flags) == 0
        assert summary(tmp_path / name)["proxy_norm_path"] == expected
        assert f"Proxy Norm layers: {expected}" in capsys.readouterr().out.splitlines()
    assert train(tmp_path / "batch", *flags, "--norm", "batch") == 0
    assert summary(tmp_path / "batch")["proxy_norm_path"] is None
    assert "Proxy Norm layers" not in capsys.readouterr().out
