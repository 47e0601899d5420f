"""The installable library: `pip install CHECKOUT` gives `proxynorm` and nothing generic.

The package is installed with pip into a fresh folder (no dependencies, no build
isolation: nothing is downloaded) and used from an empty folder by a Python that does not
see the checkout, as a user's own project would: `import proxynorm`, a converted
torchvision model, the fused CPU op built on first use into an empty cache, and
`import datasets` finds nothing of ours.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPLICATION = ("datasets", "models", "train", "custom_ops", "analysis", "benchmarks", "tests")

USER_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import torch, torchvision
    import proxynorm
    from proxynorm import ops
    from proxynorm.ops import build, cpu

    model = proxynorm.convert_norms(torchvision.models.resnet18(num_classes=3), "group_pn")
    x = torch.randn(2, 3, 32, 32)
    layer = proxynorm.get_norm_act("group_pn", 8, groups=2)
    y = torch.randn(2, 8, 5, 5)
    eager = proxynorm.proxy_norm_act(y, 2, layer.weight, layer.bias, layer.proxy_weight,
                                     layer.proxy_bias, layer.act)
    print(json.dumps({
        "proxynorm": proxynorm.__file__,
        "shadowed": {name: getattr(importlib.util.find_spec(name), "origin", None)
                     for name in sys.argv[1:]},
        "model": type(model).__name__,
        "block": type(model.layer1[0]).__name__,
        "output": list(model(x).shape),
        "fused": ops.fused_op(y) is cpu.group_norm_proxy_act,
        "library": build.library_path(),
        "matches_eager": torch.allclose(layer(y), eager, atol=1e-5),
    }))
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), ROOT],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def test_pip_install_puts_only_proxynorm_in_site_packages(installed):
    entries = set(os.listdir(installed))
    assert {e for e in entries if not e.endswith(".dist-info")} == {"proxynorm"}
    assert entries - {"proxynorm"} == {"proxynorm-0.1.0.dist-info"}
    ops = installed / "proxynorm" / "ops"
    assert sorted(os.listdir(ops / "csrc")) == ["proxynorm.cpp", "proxynorm.h",
                                                 "proxynorm_kernel.cpp"]
    assert {"Makefile", "proxynorm_ipu.cpp", "replica_all_reduce.cpp"} <= set(
        os.listdir(ops / "ipu"))


def test_a_user_project_imports_the_installed_package(installed, tmp_path):
    """From an empty folder, without the checkout on the path: the library works, builds
    its CPU op on first use into an empty cache (on torch 2.0, which cannot, says why and
    runs eagerly), and hides nothing of the user's."""
    project = tmp_path / "project"
    project.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(installed), PROXYNORM_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", USER_SCRIPT, *APPLICATION], cwd=project,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["proxynorm"].startswith(str(installed))
    # the application's folders are not importable: `import datasets` is a user's own or
    # Hugging Face's (when installed), never ours
    assert not any(origin and origin.startswith(ROOT) for origin in report["shadowed"].values())
    assert report["model"] == "ResNet" and report["block"] == "BasicBlock"
    assert report["output"] == [2, 3]
    assert report["matches_eager"]
    assert report["library"].startswith(str(tmp_path / "cache"))
    if not hasattr(torch.library, "register_fake"):  # torch 2.0 (IPU hosts): no CPU op
        assert not report["fused"] and "needs torch >= 2.4" in result.stderr
        return
    assert report["fused"]
    assert "compiling the fused CPU op" in result.stderr  # said once, on stderr
