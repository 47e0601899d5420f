"""The Poplar SDK that the IPU path needs: 3.3 or later, whose PopTorch runs on torch 2.0.1.

PopTorch pins one torch and asserts it when imported: 1.10.0 at SDK 3.0, 1.13.0 at 3.1,
1.13.1 at 3.2, 2.0.1 at 3.3 and 3.4 (graphcore/poptorch CMakeLists.txt:27 at
sdk/poptorch/3.0.0, :30 at 3.1.0-3.4.0; the assertion: python/__init__.py:20 at 3.3.0). The
IPU path is written for torch 2.0.1 and its requirements (requirements-ipu.txt: torchvision
0.15) would replace an older SDK's torch, breaking PopTorch, so older SDKs are refused.
poptorch.__version__ is "<major>.<minor>.<point>[+build]-<snapshot>" (python/__init__.py:57,
filled in by scripts/set_version.py from version.json).

The PopTorch engine calls sdk_problem() as it starts (train/ipu_engine.py); the Makefile's IPU
branch runs this file as a script before it installs anything:
    python proxynorm/ops/ipu/sdk.py
which prints one line and exits 2 where the active PopTorch is too old (0 otherwise). Only the
standard library is imported here, and poptorch when run as a script.
"""
import re
import sys

MIN_SDK = (3, 3)
TORCH = "2.0.1"  # PopTorch 3.3's and 3.4's torch


def sdk_version(poptorch_version):
    """(major, minor) of a PopTorch version string, or None if it does not start with them."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(poptorch_version))
    return tuple(int(part) for part in match.groups()) if match else None


def sdk_problem(poptorch_version, torch_version=None):
    """None where PopTorch `poptorch_version` is from SDK 3.3 or later, else the reason in
    one line (naming the versions found and what is needed)."""
    version = sdk_version(poptorch_version)
    if version is not None and version >= MIN_SDK:
        return None
    found = f"PopTorch {poptorch_version}"
    if torch_version is not None:
        found += f" with torch {torch_version}"
    return (f"the IPU path needs Poplar SDK {MIN_SDK[0]}.{MIN_SDK[1]} or later (PopTorch "
            f"{MIN_SDK[0]}.{MIN_SDK[1]}+, torch {TORCH}), found {found}: enable a newer SDK")


def main():
    try:
        import poptorch
    except Exception as error:  # ImportError, or PopTorch's own torch assertion
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        print(f"error: cannot import poptorch: {reason}", file=sys.stderr)
        return 2
    torch = sys.modules.get("torch")
    problem = sdk_problem(getattr(poptorch, "__version__", "unknown"),
                          getattr(torch, "__version__", None))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
