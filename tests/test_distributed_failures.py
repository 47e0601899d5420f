"""torchrun failures: workers outlive neither their launcher nor a frozen peer.

A `kill -9` of torchrun must not leave its workers training (they run in their own
session, so no terminal or process-group signal reaches them): each asks Linux for
SIGTERM when its parent dies, and the loop turns that into a checkpoint and a stop. A
peer that stops answering (SIGSTOP) fails a collective after collective_timeout, with one
line instead of a hang.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.processes import alive, children, skip_where_torchrun_can_hang
from train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux's")


def wait_for(condition, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


CHILD = """
import signal, sys, time
from train.distributed import stop_with_launcher
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").close(), sys.exit(0)))
stop_with_launcher()
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""


@linux_only
def test_a_worker_gets_sigterm_when_its_parent_dies(tmp_path):
    """A stand-in launcher starts a child that calls stop_with_launcher, then is killed."""
    marker = str(tmp_path / "terminated")
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); time.sleep(60)",
         CHILD, marker], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert wait_for(lambda: os.path.exists(marker + ".ready"), 60)
        (child,) = children(launcher.pid)
        launcher.kill()
        launcher.wait()
        assert wait_for(lambda: os.path.exists(marker), 10)
        assert wait_for(lambda: not alive(child), 10)
    finally:
        launcher.kill()
        launcher.wait()


@pytest.mark.parametrize("given,parents,sent", [
    ((), [4321, 1], signal.SIGTERM),  # torchrun's workers
    ((signal.SIGHUP, 4321), [1], signal.SIGHUP),  # benchmarks.accuracy's pool, given its parent
])
def test_a_parent_that_died_before_the_request_counts_as_the_signal(monkeypatch, given, parents,
                                                                     sent):
    """The launcher may die between reading the parent and the prctl: no signal would come."""
    calls, parents = [], iter(parents)

    class Libc:
        def prctl(self, *args):
            calls.append(("prctl", args[:2]))
            return 0

    monkeypatch.setattr(distributed.sys, "platform", "linux")
    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda *args, **kwargs: Libc())
    monkeypatch.setattr(distributed.os, "getppid", lambda: next(parents))
    monkeypatch.setattr(distributed.os, "kill", lambda pid, sig: calls.append(("kill", sig)))
    distributed.stop_with_launcher(*given)
    assert calls == [("prctl", (distributed.PR_SET_PDEATHSIG, sent)), ("kill", sent)]


def torchrun(run_dir, log, *flags):
    """Starts torchrun with 2 gloo workers training digits for a long time."""
    skip_where_torchrun_can_hang()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "train", "--config", "digits_resnet_group_pn",
               "--output-dir", str(run_dir), "--epochs", "1000", "--validation", "false",
               "--wandb-mode", "disabled", "--engine", "cpu", "--micro-batch-size", "4",
               "--gradient-accumulation", "1", "--replicas", "2", "--log-every", "1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def trained(run_dir):
    """Whether a training record is in metrics.jsonl: both workers run steps."""
    path = run_dir / "metrics.jsonl"
    return path.exists() and '"kind": "train"' in path.read_text()


@linux_only
def test_killing_torchrun_stops_its_workers_with_a_checkpoint(tmp_path):
    from train.checkpoint import load
    from train.files import RunFolder

    run_dir, log_path = tmp_path / "run", tmp_path / "log.txt"
    workers = []
    with open(log_path, "w") as log:
        launcher = torchrun(run_dir, log)
    try:
        assert wait_for(lambda: trained(run_dir), 180), log_path.read_text()[-3000:]
        workers = children(launcher.pid)
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        stopped = wait_for(lambda: not any(alive(pid) for pid in workers), 20)
        assert stopped, log_path.read_text()[-3000:]
    finally:
        for pid in [launcher.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
    saved = load(RunFolder(str(run_dir)).last)  # CheckpointError unless whole and ours
    assert saved["step"] >= 1
    assert (run_dir / "summary.json").exists(), log_path.read_text()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == saved["step"]
    assert "SIGTERM: stopping after this step" in log_path.read_text()


def frozen_peer_worker(rank, port, folder):
    """Rank 0 sums and closes with a 2 s timeout; rank 1 takes part in neither."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=2))
    done = os.path.join(folder, "done")
    if rank == 1:  # as if stopped (SIGSTOP) until rank 0 has given up
        wait_for(lambda: os.path.exists(done), 60)
        dist.destroy_process_group()
        return
    context = distributed.Context(0, 2, timeout=2)
    messages = []
    for collective in (lambda: context.sum(1.0), context.close):
        started = time.time()
        try:
            collective()
        except distributed.CollectiveError as error:
            messages.append({"message": str(error), "seconds": time.time() - started})
    with open(os.path.join(folder, "messages.json"), "w") as f:
        json.dump(messages, f)
    open(done, "w").close()


def test_a_frozen_peer_fails_the_collective_with_one_line_after_the_timeout(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(frozen_peer_worker, args=(distributed.free_port(), str(tmp_path)), nprocs=2, join=True)
    messages = json.loads((tmp_path / "messages.json").read_text())
    assert len(messages) == 2  # sum, then close's barrier
    for failure in messages:
        assert failure["seconds"] < 15
        assert failure["message"].startswith(
            "rank 0: a collective across the 2 processes failed (")
        assert failure["message"].endswith(
            "): another process stopped, hung or died, or took longer than collective_timeout "
            "(2 s)")
        assert "\n" not in failure["message"]
    assert "Timed out" in messages[0]["message"], messages[0]["message"]


def test_around_a_training_step_only_transport_errors_become_one_line():
    context = distributed.Context(rank=1, world_size=2, timeout=5)
    with pytest.raises(distributed.CollectiveError, match=r"^rank 1: a collective across the 2 "
                       r"processes failed \(Timed out waiting 5000ms for recv operation to "
                       r"complete\): another process stopped, hung or died, or took longer "
                       r"than collective_timeout \(5 s\)$"):
        with context.collective_failures(only_transport=True):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] "
                               "Timed out waiting 5000ms for recv operation to complete")
    with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied$"):
        with context.collective_failures(only_transport=True):  # a bug stays a bug
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
