"""The PopTorch engine (train/ipu_engine.py).

Anywhere: a recording stand-in for poptorch (and popdist) checks which poptorch.Options
methods the configs call with which values, the optimisers, the refused combinations, and
the engine's host side (batch checks, output reduction, padding, loaders, checkpoints).
Marked ipu (PopTorch and the IPU Model; conftest skips them elsewhere): one training step
on the IPU Model against other execution plans and against the PyTorch engine. The IPU
custom op itself is tested in tests/test_ipu_op.py.
"""
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from proxynorm import ops
from datasets.pipeline import EpochOrder
from proxynorm.norms import BatchNormAct, SyncBatchNormAct
from train.build import build_model, make_engine, parse_command_line, resolve_config
from train.config import ConfigError, global_batch_size
from train.engine import classification_loss
from train.ipu_engine import PopTorchEngine, cross_entropy, ipu_optimizer, ipu_options
from train.steps import NonFiniteLoss, count_correct

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = SimpleNamespace(num_classes=4, in_channels=3)  # what build_model reads of a dataset


API_FILE = os.path.join(REPO, "tests", "poptorch_api.txt")
_API_LINE = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)(?:\((?P<params>[^)]*)\))?"
                       r"(?:\s*->\s*(?P<returns>[\w.]+))?(?:\s*:\s*(?P<type>[\w.]+))?"
                       r"\s{2,}(?P<source>\S.*)$")
SDK_3_3 = "3.3.0+1403-f6f9c3ea9b"  # poptorch.__version__'s form: version+build-snapshot


def read_api(path=API_FILE):
    """{OWNER.NAME: entry} of the API list; entry.signature (inspect.Signature, None unless
    callable), entry.returns (what a call returns), entry.type (an attribute's type)."""
    api = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            match = _API_LINE.match(line)
            if match is None:
                raise ValueError(f"{path}:{number}: expected OWNER.NAME[(PARAMETERS)]"
                                 f"[ -> TYPE][ : TYPE]  SOURCE, got {line!r}")
            if match["name"] in api:
                raise ValueError(f"{path}:{number}: {match['name']} is listed twice")
            signature = None
            if match["params"] is not None:
                namespace = {}
                exec(f"def listed({match['params']}): pass", namespace)  # noqa: S102
                signature = inspect.signature(namespace["listed"])
            api[match["name"]] = SimpleNamespace(signature=signature, returns=match["returns"],
                                                 type=match["type"], source=match["source"])
    return api


API = read_api()


class Recorder:
    """Stands in for poptorch (owner "poptorch") or popdist ("popdist"): every attribute is a
    Recorder named by its path, and every call is logged as (path, args, kwargs) and returns
    fakes[path](*args, **kwargs) when there is one, else a Recorder named path + "()".

    Only the names of tests/poptorch_api.txt exist (PopTorch 3.3's, as the IPU path uses
    them): another attribute raises AttributeError, and a call whose arguments do not bind
    to the listed parameters raises TypeError before it is logged or faked, as PopTorch
    would fail on an IPU host. Attributes of a call's result are those of the type it
    returns (Options(), trainingModel() -> PoplarExecutor)."""

    def __init__(self, path="", log=None, fakes=None, owner="poptorch", callee=None,
                 version=SDK_3_3):
        self._path, self.log, self.fakes = path, [] if log is None else log, fakes or {}
        self._owner, self._callee = owner, callee  # listed names: OWNER.NAME; the call's entry
        self._values = {"__version__": version} if path == "" and owner == "poptorch" else {}

    def __getattr__(self, name):
        if name.startswith("__") and name not in self._values:
            raise AttributeError(name)
        key = f"{self._owner}.{name}"
        entry = API.get(key)
        if entry is None:
            raise AttributeError(f"{key} is not a PopTorch 3.3 name (tests/poptorch_api.txt)")
        if name in self._values:
            return self._values[name]
        owner = entry.type or key
        callee = entry if entry.signature is not None else API.get(f"{owner}.__call__")
        return Recorder(f"{self._path}.{name}" if self._path else name, self.log, self.fakes,
                        owner, callee)

    def __call__(self, *args, **kwargs):
        entry = self._callee
        if entry is None:
            raise TypeError(f"{self._owner} is not callable in PopTorch 3.3 "
                            f"(tests/poptorch_api.txt)")
        try:
            entry.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{self._path}: {error} (PopTorch 3.3's parameters, "
                            f"tests/poptorch_api.txt)") from None
        self.log.append((self._path, args, kwargs))
        if self._path in self.fakes:
            return self.fakes[self._path](*args, **kwargs)
        owner = entry.returns or f"{self._owner}()"
        return Recorder(self._path + "()", self.log, self.fakes, owner,
                        API.get(f"{owner}.__call__"))

    def __repr__(self):
        return self._path


def popdist_recorder(fakes):
    return Recorder(fakes=fakes, owner="popdist")


def option_calls(log):
    """{method: [arguments of each call]} of the calls on Options objects; recorded objects
    (enums, strategies) appear as their paths."""
    calls = {}
    for path, args, kwargs in log:
        if "Options()." in path:
            arguments = tuple(repr(a) if isinstance(a, Recorder) else a for a in args)
            calls.setdefault(path.split("Options().", 1)[1], []).append(
                (arguments, kwargs) if kwargs else arguments)
    return calls


class FakeIpuOptimizer(torch.optim.SGD):
    """poptorch.optim's optimisers as the engine uses them: parameter groups, and a state dict
    that carries PopART's optimiser state under ipu_state/ipu_param."""

    def __init__(self, params, lr, **kwargs):
        super().__init__(params, lr=lr)
        self.ipu_state = {"ipu_state": None, "ipu_param": None}

    def state_dict(self):
        return {**self.ipu_state, **super().state_dict()}

    def set_state_dict(self, state):
        self.ipu_state = state


class FakeExecutable:
    """A PopTorch model wrapper whose call returns outputs(*inputs); always attached."""

    def __init__(self, outputs):
        self.outputs, self.inputs, self.optimizers = outputs, [], []

    def __call__(self, *inputs):
        self.inputs.append(inputs)
        return self.outputs(*inputs)

    def isAttachedToDevice(self):
        return True

    def detachFromDevice(self):
        pass

    def copyWeightsToDevice(self):
        pass

    def setOptimizer(self, optimizer):
        self.optimizers.append(optimizer)


@pytest.fixture
def poptorch(monkeypatch):
    """A recording poptorch in sys.modules (and no popdist: not under poprun)."""
    fakes = {"isRunningOnIpu": lambda: False,
             **{f"optim.{name}": FakeIpuOptimizer for name in ("SGD", "RMSprop", "AdamW")}}
    recorder = Recorder(fakes=fakes)
    monkeypatch.setitem(sys.modules, "poptorch", recorder)
    monkeypatch.setitem(sys.modules, "popdist", None)  # `import popdist` raises ImportError
    return recorder


def small_config(**overrides):
    """digits_resnet_group_pn on the IPU engine: 4 replicas x micro-batches of 8."""
    return resolve_config("digits_resnet_group_pn", {"engine": "ipu", **overrides})


def small_engine(config):
    return PopTorchEngine(build_model(config, DATA), config)


# --- the stand-in knows PopTorch's names ------------------------------------------------

def test_stand_in_refuses_what_poptorch_lacks():
    """Misspelt Options methods, option groups, enum members, module functions and keywords
    fail as on an IPU host (AttributeError, TypeError); the listed ones are recorded."""
    stand_in = Recorder()
    options = stand_in.Options()
    options.Training.gradientAccumulation(2)
    stand_in.optim.SGD([], lr=0.1, velocity_accum_type=torch.float32)
    executable = stand_in.trainingModel(None, options=options)
    executable.copyWeightsToDevice()
    assert [path for path, _, _ in stand_in.log] == [
        "Options", "Options().Training.gradientAccumulation", "optim.SGD", "trainingModel",
        "trainingModel().copyWeightsToDevice"]
    for name, misspelt in (
            ("replicationFactor", lambda: options.replicationfactor),
            ("gradientAccumulation", lambda: options.Training.gradientAcumulation),
            ("Precision", lambda: options.Precison),
            ("ReductionType", lambda: stand_in.ReductionType.MEAN),
            ("identity_loss", lambda: stand_in.identityLoss),
            ("PoplarExecutor", lambda: executable.copyWeightToDevice)):
        with pytest.raises(AttributeError, match="is not a PopTorch 3.3 name"):
            misspelt()
    for misspelt in (lambda: stand_in.optim.SGD([], lr=0.1, velocity_accum_typ=torch.float32),
                     lambda: stand_in.identity_loss(torch.ones(1), reduce="mean"),
                     lambda: options.deviceIterations(),
                     lambda: stand_in.BeginBlock(None, ipuid=1),
                     lambda: stand_in.ReductionType.Mean()):
        with pytest.raises(TypeError):
            misspelt()
    assert len(stand_in.log) == 5  # refused calls are not recorded


@pytest.mark.parametrize("written, misspelt, error", [
    ("options.replicationFactor(", "options.replicationfactor(", AttributeError),
    ("options.Training.gradientAccumulation(", "options.Training.gradientAcumulation(",
     AttributeError),
    ("options.Precision.enableStochasticRounding(", "options.Precision.enableStochasticRoundng(",
     AttributeError),
    ("OutputMode.Sum)", "OutputMode.SUM)", AttributeError),
    ("velocity_accum_type=torch.float32", "velocity_accum_typ=torch.float32", TypeError),
    ("auto_distributed_partitioning=False", "auto_distributed_partition=False", TypeError),
])
def test_a_misspelt_poptorch_name_in_the_engine_fails(poptorch, written, misspelt, error):
    """The engine with one PopTorch name misspelt, built and asked for its training loader
    against the stand-in: the misspelling fails the test."""
    import train.ipu_engine

    with open(train.ipu_engine.__file__) as f:
        source = f.read()
    assert source.count(written) == 1, written
    module = types.ModuleType("misspelt_ipu_engine")
    exec(compile(source.replace(written, misspelt), "misspelt_ipu_engine.py", "exec"),  # noqa: S102
         module.__dict__)
    config = small_config()
    with pytest.raises(error):
        engine = module.PopTorchEngine(build_model(config, DATA), config)
        engine.make_loader(object(), engine.call_batch, EpochOrder(128, 32, seed=0))


IPU_PATH_FILES = ("train/ipu_engine.py", "proxynorm/norms.py", "proxynorm/ops/__init__.py",
                  "proxynorm/ops/ipu/__init__.py", "tests/test_ipu_engine.py",
                  "tests/test_ipu_op.py", "tests/conftest.py", "docs/scaling.md")
WRITTEN_NAME = re.compile(r"\b(poptorch|popdist|Options)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
RECORDER_ATTRIBUTES = {"log", "fakes"}  # the stand-in's own (tests name it poptorch)


def listed(owner, dotted):
    """Whether OWNER.DOTTED is in the API list, following attribute types and what calls
    return (text names a method of an Options object after "Options.", as PopTorch's docs do)."""
    for part in dotted.split("."):
        key = f"{owner}.{part}"
        if key not in API:
            return False
        owner = API[key].type or API[key].returns or key
    return True


def test_the_ipu_path_writes_only_poptorch_names():
    """Every name written after "poptorch.", "popdist." or "Options." in the IPU path's code,
    tests (the ipu-marked ones run only on IPU hosts) and docs/scaling.md is in the API list,
    and so is every method the engine calls on PopTorch's executables and optimisers."""
    unknown = []
    for path in IPU_PATH_FILES:
        with open(os.path.join(REPO, path)) as f:
            text = f.read()
        for match in WRITTEN_NAME.finditer(text):
            owner = "Options" if match[1] == "Options" else match[1]
            if match[2].split(".")[0] in RECORDER_ATTRIBUTES and path.startswith("tests/"):
                continue
            if not listed(owner, match[2]):
                unknown.append(f"{path}: {match[0]}")
    with open(os.path.join(REPO, "train", "ipu_engine.py")) as f:
        engine = f.read()
    calls = re.findall(r"\b(?:training_model|inference_model|executable|other|"
                       r"get_training_model\(\)|get_inference_model\(\))\.(\w+)", engine)
    unknown += [f"PoplarExecutor.{name}" for name in calls if f"PoplarExecutor.{name}" not in API]
    methods = re.findall(r"\bself\.optimizer\.(\w+)", engine)
    unknown += [f"Optimizer.{name}" for name in methods if f"Optimizer.{name}" not in API]
    assert len(calls) >= 8 and len(methods) >= 3
    assert unknown == []
    assert listed("poptorch", "Options.broadcastBuffers") and listed("Options", "Training")
    assert not listed("Options", "broadcastBufers")  # what a misspelling gives


def test_the_fakes_define_only_poptorch_methods():
    for fake, owner, helpers in ((FakeExecutable, "PoplarExecutor", set()),
                                 (HostExecutable, "PoplarExecutor", {"run"}),
                                 (FakeIpuOptimizer, "Optimizer", set())):
        methods = {name for name, value in vars(fake).items()
                   if inspect.isfunction(value) and value.__qualname__.startswith(fake.__name__)
                   and (not name.startswith("_") or name == "__call__")}
        assert methods - helpers and {f"{owner}.{name}" for name in methods - helpers} <= set(API)


def test_the_api_list_is_poptorch_3_3():
    with open(API_FILE) as f:
        header = f.read().split("\n\n")[0]
    assert "graphcore/poptorch at tag sdk/poptorch/3.3.0" in header
    for name, entry in API.items():
        if name.startswith("popdist."):
            continue
        assert re.match(r"(python/\w+\.py|poptorch tests/\w+\.py):\d+|torch\.optim",
                        entry.source), name


# --- the Poplar SDK ---------------------------------------------------------------------

@pytest.mark.parametrize("version, torch_version", [
    ("3.0.0+1145-18c1a71bb8", "1.10.0"), ("3.1.0+1205-58b501c780", "1.13.0"),
    ("3.2.0+1277-7cd8ade3cd", "1.13.1"), ("unknown", "2.0.1")])
def test_sdks_before_3_3_are_refused_in_one_line(poptorch, monkeypatch, version, torch_version):
    """PopTorch 3.0-3.2 pin torch 1.10/1.13/1.13.1, not the 2.0.1 the IPU path is written for."""
    monkeypatch.setitem(sys.modules, "poptorch", Recorder(fakes=poptorch.fakes, version=version))
    monkeypatch.setattr(torch, "__version__", torch_version)
    with pytest.raises(ConfigError) as error:
        small_engine(small_config())
    assert str(error.value) == (
        f"the IPU path needs Poplar SDK 3.3 or later (PopTorch 3.3+, torch 2.0.1), found "
        f"PopTorch {version} with torch {torch_version}: enable a newer SDK")
    assert not [path for path, _, _ in poptorch.log if path.startswith("Options")]


def test_sdk_3_3_and_3_4_are_accepted(poptorch, monkeypatch):
    small_engine(small_config())  # the stand-in is PopTorch 3.3.0
    monkeypatch.setitem(sys.modules, "poptorch", Recorder(fakes=poptorch.fakes,
                                                          version="3.4.0+1507-55b24f8e53"))
    small_engine(small_config())


@pytest.mark.parametrize("version, returncode", [("3.2.0+1277-7cd8ade3cd", 2),
                                                 ("3.3.0+1403-f6f9c3ea9b", 0)])
def test_sdk_check_as_the_makefile_runs_it(tmp_path, version, returncode):
    """python proxynorm/ops/ipu/sdk.py, outside the checkout, with a poptorch of that version."""
    (tmp_path / "poptorch").mkdir()
    (tmp_path / "poptorch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, "proxynorm", "ops", "ipu",
                                                          "sdk.py")],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True)
    assert result.returncode == returncode
    assert result.stdout == ""
    assert result.stderr == ("" if returncode == 0 else
                             f"error: the IPU path needs Poplar SDK 3.3 or later (PopTorch 3.3+, "
                             f"torch 2.0.1), found PopTorch {version}: enable a newer SDK\n")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_checks_the_sdk_before_installing(tmp_path):
    """The Makefile's IPU branch (the active Python imports poptorch) runs the SDK check
    before pip: `make -n` lists the commands without running them."""
    (tmp_path / "poptorch").mkdir()
    (tmp_path / "poptorch" / "__init__.py").write_text("__version__ = '3.2.0+1277-7cd8ade3cd'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "-n", "-B", ".installed-ipu",
                             f"SYSTEM_PYTHON={sys.executable}"],
                            cwd=REPO, env={**env, "PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    commands = [line.split("#")[0].split() for line in result.stdout.splitlines()]
    assert commands[0] == [sys.executable, "proxynorm/ops/ipu/sdk.py"]
    # then pip (run only when something is missing): the first pip command comes after it
    pips = [i for i, words in enumerate(commands) if words[1:4] == ["-m", "pip", "install"]]
    assert pips and pips[0] == 1 and "requirements-ipu.txt" in commands[1]


# --- options ----------------------------------------------------------------------------

def test_resnet50_options():
    config = resolve_config("resnet50v2_group_pn")
    poptorch = Recorder()
    ipu_options(config, poptorch)
    assert option_calls(poptorch.log) == {
        "replicationFactor": [(16,)], "randomSeed": [(0,)], "deviceIterations": [(1,)],
        "Training.gradientAccumulation": [(4,)],
        "Training.accumulationAndReplicationReductionType": [("ReductionType.Mean",)],
        "outputMode": [("OutputMode.Sum",)], "Precision.enableStochasticRounding": [(True,)],
        "enableStableNorm": [(True,)], "Precision.setPartialsType": [(torch.float16,)]}
    evaluation = Recorder()
    ipu_options(config, evaluation, training=False)
    assert option_calls(evaluation.log) == {
        "replicationFactor": [(16,)], "randomSeed": [(0,)], "deviceIterations": [(1,)],
        "enableStableNorm": [(True,)], "Precision.setPartialsType": [(torch.float16,)]}


def test_pipelined_efficientnet_options():
    config = resolve_config("efficientnet_b0_g16_layer_pn")  # 16.32, pipeline_splits [blocks.3]
    poptorch = Recorder()
    ipu_options(config, poptorch)
    calls = option_calls(poptorch.log)
    assert calls["setExecutionStrategy"] == [("PipelinedExecution()",)]
    assert ("PipelinedExecution", ("AutoStage.SameAsIpu",), {}) in [
        (path, tuple(map(repr, args)), kwargs) for path, args, kwargs in poptorch.log]
    assert calls["Precision.setPartialsType"] == [(torch.float16,)]
    assert calls["Training.gradientAccumulation"] == [(12,)]
    assert calls["replicationFactor"] == [(8,)] and "_Popart.set" not in calls
    evaluation = Recorder()
    ipu_options(config, evaluation, training=False)
    assert option_calls(evaluation.log)["deviceIterations"] == [(2,)]  # one batch per stage


def test_ipu_only_options():
    config = small_config(precision="32.32", ipu_model=True, replicas=1,
                          available_memory_proportion=0.3, recompute_checkpoints=["layer2"],
                          stochastic_rounding=False, stable_norm=False)
    poptorch = Recorder()
    ipu_options(config, poptorch)
    calls = option_calls(poptorch.log)
    assert calls["enableStableNorm"] == [(False,)]
    assert calls["Precision.setPartialsType"] == [(torch.float32,)]
    assert calls["useIpuModel"] == [(True,)]
    assert calls["replicationFactor"] == [(1,)]
    assert calls["setAvailableMemoryProportion"] == [({"IPU0": 0.3},)]
    assert calls["_Popart.set"] == [("explicitRecomputation", True), ("autoRecomputation", 4)]
    assert "useOfflineIpuTarget" not in calls and "enableExecutableCaching" not in calls
    offline = Recorder()
    ipu_options(small_config(compile_only=True, executable_cache_dir="cache"), offline)
    calls = option_calls(offline.log)
    assert calls["useOfflineIpuTarget"] == [()] and "useIpuModel" not in calls
    assert calls["enableExecutableCaching"] == [("cache",)]


@pytest.mark.parametrize("precision, partials, weights, inputs", [
    ("32.32", torch.float32, torch.float32, torch.float32),
    ("16.32", torch.float16, torch.float32, torch.float16),
    ("16.16", torch.float16, torch.float16, torch.float16),
])
def test_precision(poptorch, precision, partials, weights, inputs):
    engine = small_engine(small_config(precision=precision))
    assert option_calls(poptorch.log)["Precision.setPartialsType"] == [(partials,)] * 2
    assert {p.dtype for p in engine.model.parameters()} == {weights}
    assert engine.input_dtype == inputs


def test_pipelining_needs_accumulation(poptorch):
    with pytest.raises(ConfigError) as error:
        small_engine(small_config(pipeline_splits=["layer2"], gradient_accumulation=2))
    assert str(error.value) == ("pipeline_splits: 2 pipeline stages train as 3, so "
                                "gradient_accumulation must be >= 3, got 2")
    small_engine(small_config(pipeline_splits=["layer2"], gradient_accumulation=3))


@pytest.mark.parametrize("overrides, message", [
    ({"compile_only": True, "ipu_model": True, "replicas": 1}, "cannot be combined with ipu_model"),
    ({"optimizer": "rmsprop", "grad_clip_norm": 1.0}, "no gradient clipping"),
    ({"ipu_model": True}, "the IPU Model does not run replicated graphs"),
    ({"ipu_model": True, "replicas": 1, "executable_cache_dir": "cache"},
     "caches no IPU Model executable"),
])
def test_refused_combinations_are_one_line(poptorch, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        small_engine(small_config(**overrides))
    assert "\n" not in str(error.value)


def test_the_ipu_model_runs_one_replica():
    """The IPU Model does not replicate (PopART's user guide); PopTorchEngine.check, which
    needs no PopTorch, says so in one line and names the plan that keeps the global batch."""
    config = small_config()  # 4 replicas x micro-batches of 8
    config["ipu_model"] = True  # past resolve_config, which may run the same check
    with pytest.raises(ConfigError) as error:
        PopTorchEngine.check(config)
    assert str(error.value) == (
        "ipu_model: the IPU Model does not run replicated graphs, so replicas must be 1, got 4 "
        "(the same global batch: --replicas 1 --gradient-accumulation 4)")
    PopTorchEngine.check(small_config(ipu_model=True, replicas=1, gradient_accumulation=4))
    config = small_config(ipu_model=True, replicas=1)
    config["executable_cache_dir"] = "cache"
    with pytest.raises(ConfigError) as error:
        PopTorchEngine.check(config)
    assert str(error.value) == ("executable_cache_dir: PopTorch caches no IPU Model executable; "
                                "unset it (--executable-cache-dir null) with ipu_model")


def test_python_m_train_refuses_a_replicated_ipu_model_anywhere(tmp_path, capsys, monkeypatch):
    """Without PopTorch (where engine ipu falls back to the PyTorch engine) the IPU checks run
    as the config is resolved: one line, exit status 2, nothing written."""
    from train.__main__ import main

    monkeypatch.setitem(sys.modules, "poptorch", None)  # `import poptorch` fails, as here
    assert main(["--config", "digits_resnet_group_pn", "--engine", "ipu", "--ipu-model", "true",
                 "--output-dir", str(tmp_path / "run"), "--wandb-mode", "disabled"]) == 2
    assert capsys.readouterr().err == (
        "error: ipu_model: the IPU Model does not run replicated graphs, so replicas must be 1, "
        "got 4 (the same global batch: --replicas 1 --gradient-accumulation 4)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "3", "--device-iterations", "2"],
     "max_steps 3 must be a multiple of device_iterations 2"),
    (["--optimizer", "rmsprop", "--grad-clip-norm", "1"],
     "grad_clip_norm: PopTorch's RMSprop has no gradient clipping; use sgd or adamw, or "
     "--grad-clip-norm 0"),
    (["--channels-last", "true"], "channels_last is a CPU/GPU memory format: PopTorch lays out "
     "the IPU's tensors itself; unset it (--channels-last false) with engine ipu"),
])
def test_ipu_checks_run_as_the_config_is_resolved(tmp_path, capsys, monkeypatch, flags,
                                                  message):
    """What a PopTorch host refuses (a run stops between host calls of device_iterations
    steps; PopTorch's RMSprop has no clipping) is refused here too, before engine ipu falls
    back to the PyTorch engine, which would have run it."""
    from train.__main__ import main

    monkeypatch.setitem(sys.modules, "poptorch", None)
    assert main(["--config", "digits_resnet_group_pn", "--engine", "ipu", *flags,
                 "--output-dir", str(tmp_path / "run"), "--wandb-mode", "disabled"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()
    assert main(["--config", "digits_resnet_group_pn", "--engine", "ipu", *flags,
                 "--print-config"]) == 2  # printing it too: it is not a config to run


def test_python_m_train_refuses_an_ipu_config_on_this_machine(tmp_path):
    """`python -m train` itself, wherever it runs: a pipeline that PopTorch cannot fill is one
    line and exit status 2, and no run folder."""
    result = subprocess.run(
        [sys.executable, "-m", "train", "--config", "digits_resnet_group_pn", "--engine", "ipu",
         "--pipeline-splits", "layer2", "--gradient-accumulation", "2",
         "--output-dir", str(tmp_path / "run"), "--wandb-mode", "disabled"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "error: pipeline_splits: 2 pipeline stages train as 3, so gradient_accumulation "
               "must be >= 3, got 2\n")
    assert not (tmp_path / "run").exists()


def test_the_docs_ipu_model_command_is_accepted():
    """docs/scaling.md's IPU Model command: a plan the IPU Model runs."""
    with open(os.path.join(REPO, "docs", "scaling.md")) as f:
        text = f.read().replace("\\\n", " ")  # continued lines
    line, = [line for line in text.splitlines() if "--ipu-model true" in line]
    words = shlex.split(line.split("#")[0])
    assert words[:3] == ["python", "-m", "train"]
    config, _ = parse_command_line(words[3:])
    assert config["engine"] == "ipu" and config["ipu_model"] and config["replicas"] == 1
    assert global_batch_size(config) == global_batch_size(resolve_config(config["config"]))
    PopTorchEngine.check(config)


def ipu_group_sizes(engine_or_model):
    model = getattr(engine_or_model, "model", engine_or_model)
    return {m.ipu_group_size for m in model.modules() if isinstance(m, SyncBatchNormAct)}


def test_sync_batch_of_one_replica_runs(poptorch):
    """Nothing crosses replicas: no IPU ops library needed, PopART's own BatchNorm runs."""
    assert ipu_group_sizes(small_engine(small_config(norm="sync_batch", bn_group_size=1))) == {1}
    assert ipu_group_sizes(small_engine(small_config(norm="sync_batch", replicas=1))) == {1}


@pytest.mark.parametrize("bn_group_size, group", [(0, 0), (4, 0), (2, 2)])
def test_sync_batch_across_replicas(poptorch, monkeypatch, bn_group_size, group):
    """Groups of bn_group_size of the 4 replicas (0 or 4: all, the all-reduce's 0), and
    replicas that keep their own, in-place updated, buffers in training."""
    monkeypatch.setattr(ops.ipu, "is_built", lambda: True)
    engine = small_engine(small_config(norm="sync_batch", bn_group_size=bn_group_size))
    assert ipu_group_sizes(engine) == {group}
    assert {m.stats_chunks for m in engine.model.modules() if isinstance(m, BatchNormAct)} == {1}
    assert option_calls(poptorch.log)["broadcastBuffers"] == [(False,)]  # training only
    assert ipu_group_sizes(engine.eval_net.model) == {group}  # unused in evaluation


def norm_settings(model):
    """{(class name, stats_chunks, ipu_group_size or None)} of a model's BatchNorms."""
    return {(type(m).__name__, m.stats_chunks, getattr(m, "ipu_group_size", None))
            for m in model.modules() if isinstance(m, BatchNormAct)}


@pytest.mark.parametrize("norm, bn_group_size, group", [
    ("batch", 0, None), ("sync_batch", 0, 0), ("sync_batch", 2, 2), ("sync_batch", 1, 1)])
def test_layers_are_built_for_the_engine(poptorch, monkeypatch, norm, bn_group_size, group):
    """build_model asks the engine that runs the config for its layers' options: on PopTorch
    each replica holds one micro-batch and a sync_batch layer knows its IPU group as it is
    built. The engine takes the model as built, and refuses one built for PyTorch (whose
    BatchNorms split a batch into the 4 replicas' chunks)."""
    monkeypatch.setattr(ops.ipu, "is_built", lambda: True)
    config = small_config(norm=norm, bn_group_size=bn_group_size)
    model = build_model(config, DATA)
    layer = "SyncBatchNormAct" if norm == "sync_batch" else "BatchNormAct"
    assert norm_settings(model) == {(layer, 1, group)}
    engine = PopTorchEngine(model, config)
    assert engine.model is model and norm_settings(model) == {(layer, 1, group)}
    on_pytorch = build_model({**config, "engine": "cpu"}, DATA)
    assert norm_settings(on_pytorch) == {(layer, 4, None if group is None else 1)}
    with pytest.raises(ValueError, match="the model was not built for the PopTorch engine"):
        PopTorchEngine(on_pytorch, config)


def test_torchvision_models_are_built_for_the_engine(poptorch):
    """Converted models get the same layer options (convert_norms passes them on)."""
    config = small_config(model="torchvision:resnet18", norm="sync_batch", bn_group_size=2,
                          act=None, group_dim=None)
    assert norm_settings(build_model(config, DATA)) == {("SyncBatchNormAct", 1, 2)}


def test_only_sync_batch_keeps_buffers_per_replica(poptorch):
    """Per-replica BatchNorm is PopART's own op, which updates its statistics itself."""
    small_engine(small_config(norm="batch"))
    small_engine(small_config(norm="sync_batch", bn_group_size=1))
    small_engine(small_config())  # Proxy Norm: no buffers
    assert "broadcastBuffers" not in option_calls(poptorch.log)


def test_sync_batch_groups_must_divide_the_replicas():
    config = small_config(norm="sync_batch")
    config["bn_group_size"] = 3  # past resolve_config's own check
    with pytest.raises(ConfigError) as error:
        PopTorchEngine.check(config)
    assert str(error.value) == "norm sync_batch: bn_group_size 3 must divide the 4 replicas"


def poprun(monkeypatch, total, local):
    values = {"isPopdistEnvSet": True, "getNumTotalReplicas": total,
              "getNumLocalReplicas": local, "getInstanceIndex": 0,
              "getNumInstances": total // local, "getNumIpusPerReplica": 1}
    popdist = popdist_recorder({name: (lambda value=value: value)
                                for name, value in values.items()})
    monkeypatch.setitem(sys.modules, "popdist", popdist)
    monkeypatch.setitem(sys.modules, "popdist.poptorch", popdist.poptorch)


def test_sync_batch_groups_under_poprun(poptorch, monkeypatch):
    """4 instances of 2 replicas: groups within an instance, or all replicas (the one group
    known to span instances); nothing in between."""
    monkeypatch.setattr(ops.ipu, "is_built", lambda: True)
    poprun(monkeypatch, 8, 2)
    assert ipu_group_sizes(small_engine(small_config(norm="sync_batch", replicas=8,
                                                     bn_group_size=2))) == {2}
    assert ipu_group_sizes(small_engine(small_config(norm="sync_batch", replicas=8,
                                                     bn_group_size=0))) == {0}
    with pytest.raises(ConfigError) as error:
        small_engine(small_config(norm="sync_batch", replicas=8, bn_group_size=4))
    assert str(error.value) == (
        "norm sync_batch: bn_group_size 4 must divide the 2 replicas of each poprun instance, "
        "or be 0 (all 8 replicas: the only group that may span instances)")


def test_sync_batch_across_replicas_needs_the_ipu_ops(poptorch, monkeypatch):
    monkeypatch.setattr(ops.ipu, "is_built", lambda: False)
    with pytest.raises(ConfigError) as error:
        small_engine(small_config(norm="sync_batch", bn_group_size=2))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("norm sync_batch across IPU replicas needs the IPU ops library ")
    assert message.endswith("libproxynorm_ipu.so: run `make custom_ops` on this Poplar SDK host")


def test_engine_marks_stages_checkpoints_and_replica_batchnorm(poptorch):
    config = small_config(norm="batch", pipeline_splits=["layer2", "layer3"],
                          gradient_accumulation=5, recompute_checkpoints=["layer1"])
    engine = small_engine(config)
    modules = dict(engine.model.named_modules())
    blocks = [(args[0], kwargs) for path, args, kwargs in poptorch.log if path == "BeginBlock"]
    assert blocks == [(modules["layer2"], {"ipu_id": 1}), (modules["layer3"], {"ipu_id": 2})]
    assert len(modules["layer1"]._forward_hooks) == 1
    assert {m.stats_chunks for m in engine.model.modules() if hasattr(m, "stats_chunks")} == {1}
    assert engine.eval_batch == 8 * 4 * 3  # micro-batch x replicas x stages


def test_poprun_takes_replicas_from_popdist(poptorch, monkeypatch):
    values = {"isPopdistEnvSet": True, "getNumTotalReplicas": 4, "getNumLocalReplicas": 2,
              "getInstanceIndex": 1, "getNumInstances": 2, "getNumIpusPerReplica": 1}
    popdist = popdist_recorder({name: (lambda value=value: value)
                                for name, value in values.items()})
    monkeypatch.setitem(sys.modules, "popdist", popdist)
    monkeypatch.setitem(sys.modules, "popdist.poptorch", popdist.poptorch)
    engine = small_engine(small_config(device_iterations=2))
    created = [kwargs for path, _, kwargs in popdist.log if path == "poptorch.Options"]
    assert created == [{"ipus_per_replica": 1}] * 2
    assert "replicationFactor" not in option_calls(popdist.log + poptorch.log)
    assert (engine.instance, engine.instances, engine.local_replicas) == (1, 2, 2)
    assert engine.call_batch == 2 * 32 // 2 and engine.eval_batch == 8 * 2
    with pytest.raises(ConfigError, match="poprun --num-replicas 4 but replicas is 8"):
        small_engine(small_config(replicas=8))


# --- optimisers -------------------------------------------------------------------------

def test_optimizers_map_to_poptorch_optim():
    config = small_config(weight_decay=1e-4, loss_scaling=128.0, grad_clip_norm=2.0)
    model = build_model(config, DATA)
    poptorch = Recorder()
    ipu_optimizer(config, model, poptorch)
    (path, (groups,), kwargs), = poptorch.log
    assert path == "optim.SGD" and [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert kwargs == {"lr": 0.1, "momentum": 0.9, "nesterov": True, "loss_scaling": 128.0,
                      "accum_type": torch.float32, "velocity_accum_type": torch.float32,
                      "max_grad_norm": 2.0}

    rmsprop = Recorder()
    ipu_optimizer(small_config(optimizer="rmsprop", rmsprop_decay=0.95, optimizer_eps=1e-3),
                  model, rmsprop)
    (path, _, kwargs), = rmsprop.log
    assert path == "optim.RMSprop" and kwargs["use_tf_variant"] is True
    assert (kwargs["alpha"], kwargs["eps"], kwargs["momentum"]) == (0.95, 1e-3, 0.9)

    adamw = Recorder()
    ipu_optimizer(small_config(optimizer="adamw", adam_betas=[0.8, 0.99]), model, adamw)
    (path, _, kwargs), = adamw.log
    assert path == "optim.AdamW" and kwargs["betas"] == (0.8, 0.99)
    assert "max_grad_norm" not in kwargs
    assert kwargs["second_order_momentum_accum_type"] == torch.float32


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_is_torchs(smoothing):
    logits, labels = torch.randn(6, 5), torch.randint(5, (6,))
    probabilities = torch.softmax(torch.randn(6, 5), dim=1)
    for targets in (labels, labels.int(), probabilities):
        expected = F.cross_entropy(logits, targets.long() if targets.dim() == 1 else targets,
                                   label_smoothing=smoothing, reduction="none")
        torch.testing.assert_close(cross_entropy(logits, targets, smoothing), expected)


def test_graphs_compute_the_pytorch_engines_loss(poptorch, monkeypatch):
    monkeypatch.setitem(poptorch.fakes, "identity_loss", lambda loss, reduction: loss)
    engine = small_engine(small_config(label_smoothing=0.1))
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(4, (6,))
    logits = engine.model(images)
    loss, correct = engine.train_net(images, labels.int())
    torch.testing.assert_close(loss, classification_loss(logits, labels, 0.1) / 6)
    assert correct == count_correct(logits, labels)
    losses, corrects = engine.eval_net(images, labels.int())
    torch.testing.assert_close(losses.sum(), classification_loss(logits, labels, 0.0))
    assert corrects.sum() == count_correct(logits, labels)


# --- the host side of the engine ---------------------------------------------------------

def test_train_step_reduces_the_summed_outputs(poptorch):
    engine = small_engine(small_config(device_iterations=2, gradient_accumulation=2,
                                       replicas=2, micro_batch_size=2))
    assert engine.steps_per_call == 2 and engine.call_batch == 16
    outputs = [(torch.tensor([4.0, 4.0]), torch.tensor([3.0, 5.0]))]
    executable = FakeExecutable(lambda images, targets: outputs[0])
    engine.training_model = executable
    images, targets = torch.randn(16, 3, 8, 8), torch.randint(4, (16,))
    # per replica, the micro-batch means summed over 2 steps x 2 micro-batches
    assert engine.train_step(images, targets) == (8.0 / 8, 8)
    sent_images, sent_targets = executable.inputs[0]
    assert sent_images.dtype == torch.float32 and sent_targets.dtype == torch.int32
    with pytest.raises(ValueError, match="expected 16 samples"):
        engine.train_step(images[:8], targets[:8])
    outputs[0] = (torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 0.0]))
    with pytest.raises(NonFiniteLoss):
        engine.train_step(images, targets)

    engine.set_lr(0.1)  # unchanged: nothing sent
    engine.set_lr(0.05)
    assert executable.optimizers == [engine.optimizer]
    assert {g["lr"] for g in engine.optimizer.param_groups + engine.host_optimizer.param_groups} \
        == {0.05}


def test_eval_step_pads_and_masks(poptorch):
    engine = small_engine(small_config(replicas=2, micro_batch_size=2))
    assert engine.eval_batch == 4
    executable = FakeExecutable(lambda images, targets: (images.flatten(1).sum(1),
                                                         torch.ones(len(images))))
    engine.inference_model = executable
    images, targets = torch.ones(3, 3, 8, 8), torch.randint(4, (3,))
    assert engine.eval_step(images, targets) == (3 * 3 * 8 * 8, 3)
    assert len(executable.inputs[0][0]) == 4
    with pytest.raises(ValueError, match="at most 4 samples"):
        engine.eval_step(torch.ones(5, 3, 8, 8), torch.zeros(5, dtype=torch.int64))

    average = build_model(small_config(), DATA)  # another model: its weights are evaluated
    engine.eval_step(images, targets, average)
    for name, value in average.state_dict().items():
        torch.testing.assert_close(engine.eval_net.model.state_dict()[name], value)


def test_loaders(poptorch):
    engine = small_engine(small_config(device_iterations=2))
    order = EpochOrder(128, 32, seed=0)
    engine.make_loader(object(), 64, order, num_workers=2, seed=3)
    (path, (options, dataset), kwargs), = [c for c in poptorch.log if c[0] == "DataLoader"]
    assert options is engine.options and kwargs["sampler"] is order
    assert kwargs["batch_size"] == 8  # the micro-batch: PopTorch multiplies it by 2 x 1 x 4
    assert repr(kwargs["mode"]) == "DataLoaderMode.Sync" and kwargs["drop_last"]
    assert kwargs["auto_distributed_partitioning"] is False
    with pytest.raises(ValueError, match="takes 64 samples"):
        engine.make_loader(object(), 32, order)
    evaluation = engine.make_loader([0] * 10, 7, [(0, i) for i in range(10)])
    assert isinstance(evaluation, torch.utils.data.DataLoader) and evaluation.batch_size == 7


def test_checkpoints_move_between_engines(poptorch, capsys):
    config = small_config(engine="cpu")
    ipu = small_engine(small_config())
    cpu = make_engine(config, build_model(config, DATA))
    cpu.load_state_dict(ipu.state_dict())  # the PyTorch engine reads the IPU's checkpoint
    for name, value in ipu.model.state_dict().items():
        torch.testing.assert_close(cpu.model.state_dict()[name], value)

    cpu.train_step(torch.randn(32, 3, 8, 8), torch.randint(4, (32,)))  # momentum to carry
    ipu.load_state_dict(cpu.state_dict())
    for name, value in cpu.model.state_dict().items():
        torch.testing.assert_close(ipu.model.state_dict()[name], value)
    assert "does not move to the IPU" in capsys.readouterr().err
    assert ipu.optimizer.ipu_state["ipu_state"] is None

    saved = ipu.state_dict()
    saved["optimizer"]["ipu_state"] = {"Accl___conv1.weight": torch.ones(1)}
    saved["optimizer"]["ipu_param"] = {}
    ipu.load_state_dict(saved)  # IPU to IPU: PopART's optimiser state goes back
    assert ipu.optimizer.ipu_state == {"ipu_state": saved["optimizer"]["ipu_state"],
                                       "ipu_param": {}}


def test_imports_without_poptorch():
    code = "import sys, train.ipu_engine; assert 'poptorch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


# --- on the IPU Model ---------------------------------------------------------------------

def ipu_step(images, targets, **overrides):
    """(loss, weights) after one step of the seeded small model on the IPU Model, or on
    IPU hardware where replicated (the IPU Model does not run replicated graphs)."""
    config = small_config(ipu_model=overrides.get("replicas", 1) == 1, **overrides)
    torch.manual_seed(0)
    engine = PopTorchEngine(build_model(config, DATA), config)
    try:
        loss, _ = engine.train_step(images, targets)
        return loss, {name: value.float().clone()
                      for name, value in engine.state_dict()["model"].items()}
    finally:
        engine.close()


def assert_same_step(a, b):
    (loss_a, weights_a), (loss_b, weights_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.ipu_hardware
def test_replicas_do_not_change_a_step():
    images, targets = torch.randn(16, 3, 16, 16), torch.randint(4, (16,))
    assert_same_step(ipu_step(images, targets, micro_batch_size=8, gradient_accumulation=2,
                              replicas=1),
                     ipu_step(images, targets, micro_batch_size=8, gradient_accumulation=1,
                              replicas=2))


@pytest.mark.ipu
def test_pipelining_does_not_change_a_step():
    images, targets = torch.randn(16, 3, 16, 16), torch.randint(4, (16,))
    plan = {"micro_batch_size": 4, "gradient_accumulation": 4, "replicas": 1}
    assert_same_step(ipu_step(images, targets, **plan),
                     ipu_step(images, targets, pipeline_splits=["layer2"], **plan))


@pytest.mark.ipu_hardware
@pytest.mark.parametrize("norm", [{}, {"norm": "sync_batch", "bn_group_size": 0}])
def test_ipu_step_matches_the_pytorch_engine(norm):
    """One step on two replicas, as the PyTorch engine's emulated replicas take it; with
    sync_batch, BatchNorm statistics are shared through the custom all-reduce (running
    statistics included)."""
    images, targets = torch.randn(16, 3, 16, 16), torch.randint(4, (16,))
    plan = {"micro_batch_size": 4, "gradient_accumulation": 2, "replicas": 2, **norm}
    config = small_config(engine="cpu", **plan)
    torch.manual_seed(0)
    cpu = make_engine(config, build_model(config, DATA))
    loss, _ = cpu.train_step(images, targets)
    weights = {name: value.float() for name, value in cpu.model.state_dict().items()}
    assert_same_step(ipu_step(images, targets, **plan), (loss, weights))


# --- the loop on the engine --------------------------------------------------------------

class HostExecutable(FakeExecutable):
    """A PopTorch executable emulated on the host without training: the network runs per
    micro-batch and, as OutputMode.Sum returns them, outputs are summed per replica."""

    def __init__(self, net, micro_batch, replicas):
        super().__init__(self.run)
        self.net, self.micro_batch, self.replicas = net, micro_batch, replicas
        self.compiled = []

    @torch.no_grad()
    def run(self, images, targets):
        outputs = [self.net(x, y) for x, y in zip(images.split(self.micro_batch),
                                                 targets.split(self.micro_batch))]
        # host batch [call, accumulation, replica, micro-batch]: micro-batch i is replica i % R
        return tuple(torch.stack([o[k] for o in outputs]).view(-1, self.replicas).sum(0)
                     for k in range(2))

    def compile(self, images, targets):
        self.compiled.append(len(images))

    def destroy(self):
        pass


def test_the_loop_runs_the_ipu_engine(poptorch, monkeypatch, tmp_path, capsys):
    """python -m train on the PopTorch engine: host calls of 2 steps, the loader's batches,
    validation batches, checkpoints the PyTorch engine reads, compile_only."""
    from train.__main__ import main

    executables = []

    def data_loader(options, dataset, batch_size, sampler, **kwargs):
        kwargs = {k: v for k, v in kwargs.items()
                  if k not in ("auto_distributed_partitioning", "mode")}
        # device iterations 2 x replicas 4 x accumulation 1, as PopTorch combines them
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size * 8, sampler=sampler,
                                           **kwargs)

    def executable(net, options, optimizer=None):
        executables.append(HostExecutable(net, 8, 4))
        return executables[-1]

    for name, fake in (("identity_loss", lambda loss, reduction: loss),
                       ("DataLoader", data_loader), ("trainingModel", executable),
                       ("inferenceModel", executable)):
        monkeypatch.setitem(poptorch.fakes, name, fake)
    flags = ["--config", "digits_resnet_group_pn", "--engine", "ipu", "--wandb-mode",
             "disabled", "--device-iterations", "2", "--log-every", "2"]
    assert main([*flags, "--output-dir", str(tmp_path / "run"), "--max-steps", "4"]) == 0
    training, evaluation = executables
    assert [len(images) for images, _ in training.inputs] == [64, 64]  # 2 calls of 2 x 32
    assert {len(images) for images, _ in evaluation.inputs} == {32}  # 8 x 4 replicas, padded
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    validation, = [r for r in records if r["kind"] == "val"]
    assert 0 <= validation["val_accuracy"] <= 1
    saved = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)
    assert saved["step"] == 4
    config = small_config(engine="cpu")
    make_engine(config, build_model(config, SimpleNamespace(num_classes=10, in_channels=1))) \
        .load_state_dict(saved["engine"])

    executables.clear()
    assert main([*flags, "--output-dir", str(tmp_path / "compiled"), "--compile-only",
                 "true"]) == 0
    assert executables[0].compiled == [64] and executables[1].compiled == [32]
    assert not executables[0].inputs and not (tmp_path / "compiled" / "checkpoint_last.pt").exists()
    assert "compiled the training and validation executables" in capsys.readouterr().out
