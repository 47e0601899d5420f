"""Nothing lost, nothing overwritten, no stray file: run folders under concurrent runs,
resumes from the wrong checkpoint or into the wrong folder, crashes, full disks, damaged
checkpoints, bad data found mid-run, and signals at awkward moments. Every failure is one
line with status 2 (docs/promises.md lists each case and its test)."""
import copy
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_datasets import write_image_folder
from tests.test_train import REPO, SYNTHETIC, error_line, load, plan, records, summary, train
from train import files
from train.__main__ import main
from train.loop import StopSignals

RUN = [*SYNTHETIC, *plan(16, 1, 1)]  # 4 steps per epoch


def listing(folder):
    return sorted(os.listdir(folder))


def test_a_run_folder_is_held_by_one_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    other = files.RunFolder(str(run_dir)).claim()  # another run holds it
    assert train(run_dir, *RUN, "--max-steps", 1) == 2
    assert error_line(capsys) == (f"error: {run_dir} is in use by another run (process "
                                  f"{os.getpid()}): wait for it to end or choose another "
                                  f"--output-dir")
    assert listing(run_dir) == [".lock"]  # nothing written
    files.release(other)
    # a crashed run's lock file (its process gone) does not block
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    assert train(run_dir, *RUN, "--max-steps", 1) == 0


def test_a_second_process_cannot_write_into_a_running_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "train", "--output-dir", str(run_dir), "--wandb-mode",
         "disabled", *map(str, RUN), "--synthetic-samples", "100000", "--epochs", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists():
            assert process.poll() is None and time.time() < deadline, process.communicate()
            time.sleep(0.2)
        assert train(run_dir, *RUN, "--max-steps", 1) == 2
        assert f"{run_dir} is in use by another run (process {process.pid})" in \
            error_line(capsys)
        assert train(run_dir, *RUN, "--resume", "auto") == 2  # resuming it too
        assert "is in use by another run" in error_line(capsys)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert summary(run_dir)["status"] == "interrupted"  # its files are its own


def test_default_run_folders_never_collide(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *_: "20261201-120000")  # the same second
    flags = ["--config", "digits_resnet_group_pn", "--wandb-mode", "disabled", *map(str, RUN)]
    for _ in range(3):
        assert main([*flags, "--max-steps", "1"]) == 0
    name = "digits_resnet_group_pn-20261201-120000"
    assert listing(tmp_path / "runs") == [name, f"{name}-2", f"{name}-3"]
    # resume auto takes the run whose checkpoint was written last, whatever its name
    os.utime(tmp_path / "runs" / name / "checkpoint_last.pt", (time.time() + 60,) * 2)
    capsys.readouterr()
    assert main([*flags, "--max-steps", "2", "--resume", "auto"]) == 0
    assert f"run folder runs/{name}\n" in capsys.readouterr().out
    assert load(tmp_path / "runs" / name / "checkpoint_last.pt")["step"] == 2


@pytest.mark.parametrize("again", ["the same command", "--resume RUN", "--resume auto",
                                   "--resume OTHER --output-dir RUN"])
def test_a_run_that_failed_before_its_first_checkpoint_does_not_hold_its_folder(
        tmp_path, capsys, monkeypatch, again):
    """A model that fails at its first forward (torchvision:alexnet on 32 px digits) leaves
    config.yml and an empty metrics.jsonl: nothing to continue, so the folder is free."""
    from train.engine import PyTorchEngine

    run_dir = tmp_path / "run"
    real_step = PyTorchEngine.train_step

    def fails(self, images, targets):
        raise RuntimeError("Given input size: (256x1x1). Calculated output size: (256x0x0)")

    monkeypatch.setattr(PyTorchEngine, "train_step", fails)
    with pytest.raises(RuntimeError, match="Calculated output size"):
        train(run_dir, *RUN, "--max-steps", 2)
    assert listing(run_dir) == [".lock", "config.yml", "metrics.jsonl"]
    (run_dir / "summary.json").write_text("{}")  # as a run that stopped with a summary
    monkeypatch.setattr(PyTorchEngine, "train_step", real_step)
    capsys.readouterr()
    if again == "--resume OTHER --output-dir RUN":
        assert train(tmp_path / "other", *RUN, "--max-steps", 1) == 0
        assert train(run_dir, *RUN, "--max-steps", 2, "--resume", tmp_path / "other") == 0
    else:
        flags = {"the same command": [], "--resume RUN": ["--resume", run_dir],
                 "--resume auto": ["--resume", "auto"]}[again]
        assert train(run_dir, *RUN, "--max-steps", 2, *flags) == 0
        if again == "--resume RUN":
            assert f"--resume {run_dir}: its run stopped before its first checkpoint; " \
                   f"starting afresh there" in capsys.readouterr().out
    assert summary(run_dir)["steps"] == 2
    assert [r["step"] for r in records(run_dir) if r["kind"] == "train"] == [1, 2]
    # once it holds a checkpoint, it is a run again
    assert train(run_dir, *RUN, "--max-steps", 2) == 2
    assert "already holds a run" in error_line(capsys)
    # and a summary.json or metrics.jsonl without the config.yml a run writes first is not
    # a run's: never cleared
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "summary.json").write_text("mine")
    assert train(theirs, *RUN, "--max-steps", 1) == 2
    assert "already holds a run" in error_line(capsys)
    assert (theirs / "summary.json").read_text() == "mine"


def test_resume_auto_takes_the_newest_run_it_can_continue(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *_: "20261201-120000")
    flags = ["--config", "digits_resnet_group_pn", "--wandb-mode", "disabled", *map(str, RUN)]
    name = "runs/digits_resnet_group_pn-20261201-120000"
    assert main([*flags, "--max-steps", "1"]) == 0  # group_pn
    assert main([*flags, "--max-steps", "1", "--norm", "batch"]) == 0  # newer, another norm
    os.utime(f"{name}-2/checkpoint_last.pt", (time.time() + 60,) * 2)
    capsys.readouterr()
    assert main([*flags, "--max-steps", "2", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert (f"resume auto: passed over {name}-2/checkpoint_last.pt is from another model: "
            f"norm batch (this run: group_pn)\n") in out
    assert f"resuming {name}/checkpoint_last.pt at step 1 " in out
    assert load(f"{name}/checkpoint_last.pt")["step"] == 2
    assert load(f"{name}-2/checkpoint_last.pt")["step"] == 1
    # a network none of them holds: a new run
    assert main([*flags, "--max-steps", "1", "--resume", "auto", "--norm", "layer"]) == 0
    out = capsys.readouterr().out
    assert out.count("resume auto: passed over ") == 2
    assert "resume auto: no run of this config to continue; starting afresh\n" in out
    assert load(f"{name}-3/checkpoint_last.pt")["config"]["norm"] == "layer"


def test_an_older_checkpoint_never_replaces_a_newer_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = [*RUN, "--epochs", 3, "--checkpoint-every", 1]
    assert train(run_dir, *flags) == 0
    last = (run_dir / "checkpoint_last.pt").read_bytes()
    capsys.readouterr()
    older = run_dir / "checkpoint_epoch1.pt"
    assert main(["--config", "digits_resnet_group_pn", "--wandb-mode", "disabled",
                 *map(str, flags), "--resume", str(older)]) == 2
    assert error_line(capsys) == (
        f"error: {run_dir}/checkpoint_last.pt is at step 12, past {older} (step 4): resuming "
        f"here would overwrite it; continue the run with --resume {run_dir}, or resume that "
        f"checkpoint into a new folder with --output-dir")
    assert (run_dir / "checkpoint_last.pt").read_bytes() == last
    # into a new folder: the continuation is exact, and its metrics start with the old run's
    assert train(tmp_path / "again", *flags, "--resume", older) == 0
    straight, again = load(run_dir / "checkpoint_last.pt"), load(
        tmp_path / "again" / "checkpoint_last.pt")
    for name, tensor in straight["engine"]["model"].items():
        assert torch.equal(tensor, again["engine"]["model"][name]), name
    def numbers(run_dir):
        return [{k: v for k, v in r.items() if k != "images_per_second"} for r in records(run_dir)]
    assert numbers(tmp_path / "again") == numbers(run_dir)
    assert f"resuming {older} at step 4 (epoch 1.00) into {tmp_path / 'again'}" in \
        capsys.readouterr().out


def test_resuming_never_writes_into_another_run(tmp_path, capsys):
    assert train(tmp_path / "a", *RUN, "--max-steps", 2) == 0
    assert train(tmp_path / "b", *RUN, "--max-steps", 3) == 0
    before = {name: (tmp_path / "b" / name).read_bytes() for name in listing(tmp_path / "b")
              if os.path.isfile(tmp_path / "b" / name)}
    capsys.readouterr()
    assert train(tmp_path / "b", *RUN, "--resume", tmp_path / "a" / "checkpoint_last.pt") == 2
    assert error_line(capsys) == (f"error: {tmp_path / 'b'} already holds another run: give "
                                  f"an empty --output-dir to continue "
                                  f"{tmp_path / 'a' / 'checkpoint_last.pt'} there")
    assert {name: (tmp_path / "b" / name).read_bytes() for name in before} == before
    assert train(tmp_path / "b", *RUN, "--max-steps", 4) == 2  # nor does a fresh run
    assert error_line(capsys) == (f"error: {tmp_path / 'b'} already holds a run: continue it "
                                  f"with --resume {tmp_path / 'b'}, or choose another "
                                  f"--output-dir")


def test_a_resumed_run_logs_each_step_once(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, *RUN, "--epochs", 3, "--max-steps", 6) == 0
    # a crash after step 8 was logged but before its checkpoint, mid-line
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in (7, 8):
            f.write(json.dumps({"kind": "train", "step": step, "loss": 9.0}) + "\n")
        f.write('{"kind": "train", "st')
    assert train(run_dir, *RUN, "--epochs", 3, "--resume", "auto") == 0
    logged = [(r["kind"], r["step"]) for r in records(run_dir)]
    assert len(logged) == len(set(logged))
    assert [step for kind, step in logged if kind == "train"] == list(range(1, 13))
    assert all(r["loss"] != 9.0 for r in records(run_dir) if r["kind"] == "train")


@pytest.mark.parametrize("flags, warning", [
    (["--epochs", 4], "epochs 3 -> 4, which changes the learning-rate schedule"),
    (["--log-every", 3, "--checkpoint-every", 1, "--num-workers", 1], None),
    (["--epochs", 4, "--lr-schedule", "constant"], None),  # epochs alone: the same lr
    (["--lr", 0.5], "lr"),
])
def test_a_resume_warns_for_what_changes_the_maths(tmp_path, capsys, flags, warning):
    run_dir = tmp_path / "run"
    schedule = flags[flags.index("--lr-schedule") + 1] if "--lr-schedule" in flags else "cosine"
    assert train(run_dir, *RUN, "--epochs", 3, "--max-steps", 2, "--lr-schedule", schedule) == 0
    capsys.readouterr()
    # past the warm-up (4 steps), where cosine's lr depends on the number of epochs
    assert train(run_dir, *RUN, "--epochs", 3, "--max-steps", 8, "--lr-schedule", schedule,
                 "--resume", "auto", *flags) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ([] if warning is None else [
        f"warning: resuming with changed settings ({warning}): the run is no longer an exact "
        f"continuation"])


def test_planted_symlinks_are_never_followed(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside.txt"
    outside.write_text("keep me")
    run_dir.mkdir()
    for name in ("summary.json.tmp", ".summary.json.tmp", "config.yml.tmp",
                 "checkpoint_last.pt.tmp"):
        (run_dir / name).symlink_to(outside)
    assert train(run_dir, *RUN, "--max-steps", 1) == 0
    assert outside.read_text() == "keep me"
    # a symlink at the target's own name is replaced, not written through
    (run_dir / "summary.json").unlink()
    (run_dir / "summary.json").symlink_to(outside)
    files.write_json(str(run_dir / "summary.json"), {"a": 1})
    assert outside.read_text() == "keep me" and not (run_dir / "summary.json").is_symlink()
    # and a fresh run never appends to a metrics.jsonl planted as a symlink
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "metrics.jsonl").symlink_to(tmp_path / "nowhere.txt")
    assert train(planted, *RUN, "--max-steps", 1) == 2
    assert not (tmp_path / "nowhere.txt").exists()


def test_unusable_output_dirs_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert train(a_file, *RUN, "--max-steps", 1) == 2
    assert error_line(capsys) == f"error: cannot create run folder {a_file}: File exists"
    assert train(a_file / "run", *RUN, "--max-steps", 1) == 2
    assert error_line(capsys) == f"error: cannot create run folder {a_file / 'run'}: Not a " \
                                 f"directory"
    if os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        assert train(read_only / "run", *RUN, "--max-steps", 1) == 2
        assert error_line(capsys) == f"error: cannot create run folder {read_only / 'run'}: " \
                                     f"Permission denied"


def test_a_run_killed_while_writing_a_checkpoint_leaves_no_temporary_behind(tmp_path):
    """kill -9 inside torch.save (the second checkpoint) leaves .checkpoint_last.pt.*.tmp;
    the next run that holds the folder removes it, and nothing that is not a run's own."""
    run_dir = tmp_path / "run"
    child = ("import os, signal, sys, torch\n"
             "from train.__main__ import main\n"
             "saves = []\n"
             "real_save = torch.save\n"
             "def save(obj, f, *args, **kwargs):\n"
             "    saves.append(1)\n"
             "    if len(saves) == 2:\n"
             "        f.write(b'half a checkpoint'); f.flush()\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return real_save(obj, f, *args, **kwargs)\n"
             "torch.save = save\n"
             "main(sys.argv[1:])\n")
    flags = ["--config", "digits_resnet_group_pn", "--output-dir", str(run_dir),
             "--wandb-mode", "disabled", *map(str, RUN), "--epochs", "2",
             "--validation", "false"]
    killed = subprocess.run([sys.executable, "-c", child, *flags], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [name for name in listing(run_dir) if name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".checkpoint_last.pt.")
    kept = [".notes.txt.abcd1234.tmp", "checkpoint_last.pt.tmp", ".checkpoint_last.pt.tmp"]
    for name in kept:  # not a temporary of the run's: the user's
        (run_dir / name).write_text("mine")
    assert train(run_dir, *RUN, "--epochs", 2, "--validation", "false", "--resume", "auto") == 0
    assert sorted(name for name in listing(run_dir) if name.endswith(".tmp")) == sorted(kept)
    assert load(run_dir / "checkpoint_last.pt")["step"] == 8


def opened_name(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


class FullDisk:
    """A file that takes `room` more bytes, then fails as a full disk does (the bytes that
    fit are written)."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary(
        tmp_path, capsys, monkeypatch, fail_at):
    """torch.save meets the full disk in its own writes, and reports it as a RuntimeError
    ('unexpected pos') raised while handling the OSError."""
    run_dir = tmp_path / "run"
    checkpoints, real_fdopen = [], os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real_fdopen(fd, mode, *args, **kwargs)
        if ".checkpoint_last.pt." in opened_name(fd):
            checkpoints.append(fd)
            if len(checkpoints) == fail_at:
                return FullDisk(file, room=1000)
        return file

    monkeypatch.setattr(os, "fdopen", fdopen)
    assert train(run_dir, *RUN, "--epochs", 2, "--validation", "false") == 2
    kept = "no checkpoint was written" if fail_at == 1 else "checkpoint_last.pt holds step 4"
    assert error_line(capsys) == (f"error: cannot write {run_dir}/checkpoint_last.pt: No space "
                                  f"left on device; {kept}")
    assert not [name for name in listing(run_dir) if name.endswith(".tmp")]
    if fail_at == 2:
        monkeypatch.setattr(os, "fdopen", real_fdopen)
        assert load(run_dir / "checkpoint_last.pt")["step"] == 4
        assert train(run_dir, *RUN, "--epochs", 2, "--validation", "false", "--resume",
                     "auto") == 0


def test_a_full_disk_never_leaves_half_a_metrics_record(tmp_path, capsys, monkeypatch):
    """The disk fills in the middle of step 6's record: metrics.jsonl is cut back to the
    record before, so the resumed run's records follow whole lines."""
    run_dir = tmp_path / "run"
    real_fdopen, written = os.fdopen, []

    class FullAtStep6(FullDisk):
        def write(self, data):
            written.append(data)  # 4 train, train_epoch, train records, then step 6's
            self.room = len(data) // 2 if len(written) == 7 else len(data)
            return super().write(data)

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real_fdopen(fd, mode, *args, **kwargs)
        return FullAtStep6(file, 0) if opened_name(fd).endswith("metrics.jsonl") else file

    monkeypatch.setattr(os, "fdopen", fdopen)
    flags = [*RUN, "--epochs", 3, "--validation", "false"]
    assert train(run_dir, *flags) == 2
    assert error_line(capsys) == (f"error: cannot write {run_dir}/metrics.jsonl: No space left "
                                  f"on device; checkpoint_last.pt holds step 4")
    assert [(r["kind"], r["step"]) for r in records(run_dir)][-1] == ("train", 5)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert train(run_dir, *flags, "--resume", "auto") == 0
    assert [r["step"] for r in records(run_dir) if r["kind"] == "train"] == list(range(1, 13))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint after 1 step of a 2-epoch run (8 steps), as a dict to damage."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert train(run_dir, *RUN, "--epochs", 2, "--max-steps", 1) == 0
    return load(run_dir / "checkpoint_last.pt")


DAMAGES = [
    (lambda c: c.pop("config"), "no config"),
    (lambda c: c.pop("rng"), "no rng"),
    (lambda c: c["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)),
     "rng holds no CPU generator state of this torch"),
    (lambda c: c.update(step=-5), "step -5 is not a step number"),
    (lambda c: c.update(best_val_accuracy=7.0), "best_val_accuracy 7.0 is not an accuracy"),
    (lambda c: c.pop("skipped_images"), "no skipped_images"),
    (lambda c: c.pop("val_accuracy"), "no val_accuracy"),
    (lambda c: c.pop("best_val_accuracy"), "no best_val_accuracy"),
    (lambda c: c["config"].update(epochs="3"), "config.epochs is '3', not an integer"),
    (lambda c: c["config"].update(epochs=[3]), "config.epochs is [3], not an integer"),
    (lambda c: c["config"].update(epochs=0), "config.epochs must be >= 1, got 0"),
    (lambda c: c["engine"].update(model=7), "engine.model is not a model's state_dict"),
    (lambda c: c["engine"]["optimizer"].update(param_groups=5),
     "engine.optimizer is not an optimiser's state_dict"),
    (lambda c: c.update(config={}), "config has no model, norm, groups, act, group_dim, "
     "expand_ratio, data, synthetic_num_classes, seed, epochs, micro_batch_size, "
     "gradient_accumulation, replicas"),
    (lambda c: c["config"].update(model=5), "config.model is 5, not a string"),
    (lambda c: c.update(num_classes=-3), "num_classes -3 is not a positive count"),
    (lambda c: c.update(val_weights="weight_average"),
     "val_weights is weight_average, but it holds no weight average"),
    (lambda c: c["config"].update(seed="abc"), "config.seed is 'abc', not an integer"),
    (lambda c: c.update(weight_average={"model": 7, "updates": 1}),
     "weight_average is not a weight average's state"),
    (lambda c: c["totals"].update(train_seconds=0.5, train_images=-1, wall_seconds=0.5),
     "totals {'train_seconds': 0.5, 'train_images': -1, 'wall_seconds': 0.5} are not seconds "
     "and images"),
]


def test_the_analyses_load_the_applications_checkpoint_as_load_model_does(tmp_path, trained):
    """analysis.checkpoint.load hands the application's checkpoints to load_model (the
    validated weights, the run's config) instead of reading them its own way."""
    from analysis import checkpoint as analysis
    from train.evaluate import load_model

    path = tmp_path / "checkpoint.pt"
    torch.save(trained, path)
    model, config = analysis.load(str(path))
    expected, info = load_model(str(path))
    assert config == info["config"] and not model.training
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(images), expected(images), rtol=0, atol=0)


@pytest.mark.parametrize("damage, problem", DAMAGES)
def test_a_damaged_checkpoint_is_one_line(tmp_path, capsys, trained, damage, problem):
    """Every reader (--resume, train.evaluate, load_model) checks the one schema before it
    builds anything from the checkpoint."""
    from analysis import checkpoint as analysis
    from train.checkpoint import CheckpointError
    from train.evaluate import load_model, main as evaluate

    checkpoint = copy.deepcopy(trained)
    damage(checkpoint)
    damaged = tmp_path / "damaged.pt"
    torch.save(checkpoint, damaged)
    line = f"error: {damaged} is damaged: {problem}"
    capsys.readouterr()
    assert train(tmp_path / "new", *RUN, "--epochs", 2, "--resume", damaged) == 2
    assert error_line(capsys) == line
    assert not (tmp_path / "new").exists()
    assert evaluate([str(damaged)]) == 2
    assert error_line(capsys) == line
    for read in (load_model, analysis.load):
        with pytest.raises(CheckpointError, match="^" + re.escape(line[len("error: "):]) + "$"):
            read(damaged)


def test_a_file_that_is_not_a_checkpoint_gets_no_advice_to_unpickle_it(tmp_path, capsys):
    """torch.load(weights_only=True) refuses a pickle of other objects and advises
    weights_only=False, which would let the file run code: the line never passes that on."""
    import argparse

    from analysis import checkpoint as analysis
    from train.checkpoint import CheckpointError
    from train.evaluate import main as evaluate

    path = tmp_path / "not_a_checkpoint.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    line = (f"error: cannot read checkpoint {path}: it holds objects (argparse.Namespace) "
            f"besides tensors and plain data, as no checkpoint does")
    assert train(tmp_path / "run", *RUN, "--resume", path) == 2
    assert error_line(capsys) == line
    assert evaluate([str(path)]) == 2
    assert error_line(capsys) == line
    with pytest.raises(CheckpointError) as error:
        analysis.load(str(path))
    assert str(error.value) == line[len("error: "):]


def test_a_checkpoint_past_the_end_of_its_run_is_one_line(tmp_path, capsys, trained):
    checkpoint = {**trained, "step": 10 ** 9}
    torch.save(checkpoint, tmp_path / "damaged.pt")
    capsys.readouterr()
    assert train(tmp_path / "new", *RUN, "--epochs", 2, "--resume", tmp_path / "damaged.pt") == 2
    assert error_line(capsys) == (f"error: {tmp_path / 'damaged.pt'} is damaged: step "
                                  f"1000000000 is past the end of its run (8 steps)")


def test_an_older_checkpoint_resumes_and_evaluates(tmp_path, trained):
    """The first version's checkpoints lack what later ones added: validation_due,
    val_weights, num_classes, in_channels, and the options added since in their config."""
    from train.config import OPTIONS
    from train.evaluate import load_model

    older = {key: value for key, value in copy.deepcopy(trained).items() if key not in (
        "validation_due", "val_weights", "num_classes", "in_channels", "totals")}
    older["format"] = "proxy-norm-train/1"
    added = [key for key in OPTIONS if key.startswith("clutter") or key in (
        "compile", "collective_timeout", "stable_norm", "recompute_checkpoints",
        "available_memory_proportion", "executable_cache_dir", "compile_only",
        "device_memory_mb")]
    older["config"] = {key: value for key, value in older["config"].items() if key not in added}
    torch.save(older, tmp_path / "older.pt")
    model, info = load_model(tmp_path / "older.pt")
    assert info["weights"] == "model" and info["step"] == 1
    assert train(tmp_path / "new", *RUN, "--epochs", 2, "--max-steps", 2, "--resume",
                 tmp_path / "older.pt") == 0
    assert load(tmp_path / "new" / "checkpoint_last.pt")["step"] == 2


def test_a_checkpoint_of_the_current_format_holds_every_key_and_a_newer_one_is_named(
        tmp_path, trained):
    """Format 2 added validation_due, val_weights, num_classes, in_channels and totals:
    one of its files without them is damaged, where a format 1 file is completed; a
    format this version does not know is named, not called foreign."""
    from train.checkpoint import CheckpointError, load as read

    assert trained["format"] == "proxy-norm-train/2"
    damaged = {key: value for key, value in trained.items() if key != "totals"}
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match=r"damaged\.pt is damaged: no totals$"):
        read(str(tmp_path / "damaged.pt"))
    torch.save({**damaged, "format": "proxy-norm-train/1"}, tmp_path / "older.pt")
    assert read(str(tmp_path / "older.pt"))["totals"] is None
    torch.save({**trained, "format": "proxy-norm-train/3"}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=r"format proxy-norm-train/3, which this version "
                                              r"does not read \(it reads proxy-norm-train/2 and "
                                              r"proxy-norm-train/1\)$"):
        read(str(tmp_path / "newer.pt"))


def test_unreadable_validation_data_keeps_the_epoch_and_validates_it_on_resume(
        tmp_path, capsys):
    images = write_image_folder(tmp_path / "images")
    bad = images / "val" / "dog" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG broken")
    run_dir = tmp_path / "run"
    flags = ["--data", "imagenet", "--data-path", images, "--image-size", 16, *plan(4, 1, 1),
             "--epochs", 2, "--log-every", 1]
    assert train(run_dir, *flags) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: cannot read image {bad}: ")
    assert line.endswith(f"; checkpoint_last.pt holds step 2; fix the data (or pass "
                         f"--skip-corrupt-images) and continue with --resume {run_dir}")
    kept = load(run_dir / "checkpoint_last.pt")
    assert kept["step"] == 2 and kept["validation_due"]
    bad.write_bytes(good)
    assert train(run_dir, *flags, "--resume", "auto") == 0
    assert "validating the epoch it ended first" in capsys.readouterr().out
    assert [(r["kind"], r["step"]) for r in records(run_dir)] == [
        ("train", 1), ("train", 2), ("train_epoch", 2), ("val", 2), ("train", 3), ("train", 4),
        ("train_epoch", 4), ("val", 4)]


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "train", "--output-dir", str(tmp_path / "run"),
         "--wandb-mode", "disabled", *map(str, RUN)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # inside the imports
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == "interrupted\n"
    assert not (tmp_path / "run").exists()


def test_a_second_ctrl_c_waits_for_the_checkpoint_being_written():
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step
            assert stop.signal == signal.SIGINT
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGINT)  # the second, inside torch.save
                finished = True
    assert finished


def test_a_sigterm_after_the_stop_changes_nothing():
    """A torchrun worker can get its launcher's death signal more than once; the repeat
    must not kill it while it writes its summary and leaves the process group."""
    child = ("import os, signal\n"
             "from train.loop import StopSignals\n"
             "with StopSignals() as stop:\n"
             "    os.kill(os.getpid(), signal.SIGTERM)\n"
             "os.kill(os.getpid(), signal.SIGTERM)\n"
             "print('summary written')\n")
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "summary written\n", done.stderr


def test_every_test_docs_promises_md_names_exists():
    """Each promise's tests (`file.py::name`, or `::name` after one of that file) are test
    functions of tests/: a renamed or deleted test leaves no promise unchecked."""
    with open(os.path.join(REPO, "docs", "promises.md")) as f:
        page = f.read()
    named, missing = 0, []
    for row in (line for line in page.splitlines() if line.startswith("|")):
        current = None
        for path, name in re.findall(r"`(test_\w+\.py)?::(\w+)`", row):
            current = path or current
            with open(os.path.join(REPO, "tests", current)) as f:
                if not re.search(rf"^def {name}\(", f.read(), re.MULTILINE):
                    missing.append(f"{current}::{name}")
            named += 1
    assert named > 50 and not missing
