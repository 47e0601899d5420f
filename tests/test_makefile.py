"""Makefile: set-up that says nothing when there is nothing to do."""
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_install_is_quiet_when_everything_is_installed(tmp_path):
    """A fresh checkout's requirements files are newer than the stamps of an existing .venv,
    so make re-ran pip, which printed a 'Requirement already satisfied' line for each of
    about 100 packages. This Python has them all (the tests run in it): the stamps are made
    and nothing is said. The requirements are copied beside stamps of their own, so that the
    checkout's stamps are left alone; nothing is installed."""
    requirements = requirements_of_this_python()
    for name in (requirements, "requirements-dev.txt"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    stamps = tmp_path / ".installed", tmp_path / ".installed-dev"
    result = subprocess.run(
        ["make", "-f", os.path.join(ROOT, "Makefile"), "HAS_POPTORCH=", f"PYTHON={sys.executable}",
         f"REQUIREMENTS={requirements}", f"INSTALLED={stamps[0]}", f"DEV_INSTALLED={stamps[1]}",
         str(stamps[1])],
        cwd=tmp_path, capture_output=True, text=True, env=outside_make())
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert all(stamp.exists() for stamp in stamps)


def requirements_of_this_python():
    """The requirements file this Python was set up from: requirements.txt where its torch is
    that file's pin, else requirements-ipu.txt (an IPU host's torch, or torch 2.0.1 in
    .venv-torch20). With requirements.txt always, make installed it into this Python: under
    make test-torch20 it replaced torch 2.0.1 with 2.14.1 in the middle of the suite."""
    torch = "torch==" + importlib.metadata.version("torch").split("+")[0]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pinned = any(line.split("#")[0].strip() == torch for line in f)
    return "requirements.txt" if pinned else "requirements-ipu.txt"


def outside_make():
    """The environment without a parent make's variables: under `make test` (CI's command) a
    child make would otherwise announce the folders it enters."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
