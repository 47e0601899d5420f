"""Process helpers for the tests that kill parents and check what is left (children and
alive read Linux's /proc), and the condition of the tests that launch torchrun."""
import os

import pytest
import torch


def skip_where_torchrun_can_hang():
    """Skips the calling test on torch 2.0 (PopTorch's pin, `make test-torch20`): there a
    torchrun worker can hang as it exits on a loaded machine, because ProcessGroupGloo's
    destructor holds the GIL while it waits for gloo's threads, one of which needs it
    (pytorch issue 56297; pull request 154976 releases it). IPU hosts launch with poprun."""
    if torch.__version__ < "2.1":
        pytest.skip("torch 2.0's gloo process group can deadlock as a torchrun worker exits")


def children(pid):
    """The pids whose parent is pid (read from /proc/*/stat, which every Linux kernel has)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def alive(pid):
    """Whether the process runs (a zombie, waiting for init to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
