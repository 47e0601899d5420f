"""The factories of a run: its config checked for its engine, its data, its model and its
engine. The loop, plan, evaluate, the benchmarks and the analyses build through them.

The engine is chosen in one place, `engine_class`: PopTorch for `engine: ipu` where
PopTorch is installed, else PyTorch. An engine class says before the model is built what
its layers need (`norm_kwargs`: replica statistics chunks, sync_batch groups), so no
engine changes a layer after it is built, and which configs it refuses (`check`, from
the config alone). `resolve_config` and `parse_command_line` run the check of the engine
a config names, so an IPU config that an IPU host would refuse is refused on any machine,
before engine ipu falls back to PyTorch. train/config.py knows no engine.
"""
import difflib

import train.config
from datasets import cluttered_digits, get_dataset
from train.config import ConfigError
from train.distributed import Context
from train.engine import PyTorchEngine, resolve_device
from train.ipu_engine import PopTorchEngine


def poptorch_available():
    try:
        import poptorch  # noqa: F401 (only on Poplar SDK hosts)
    except ImportError:
        return False
    return True


def named_engine(config):
    """The engine class that config["engine"] names, whether or not it runs here."""
    return PopTorchEngine if config["engine"] == "ipu" else PyTorchEngine


def engine_class(config):
    """The engine class that runs the config here: the one it names, but engine ipu runs on
    PyTorch where PopTorch is not installed (resolve_device warns)."""
    engine = named_engine(config)
    return engine if engine is PyTorchEngine or poptorch_available() else PyTorchEngine


def check_config(config):
    """The config, or ConfigError (one line) for what the engine it names cannot run."""
    named_engine(config).check(config)
    return config


def resolve_config(*args, **kwargs):
    """train.config.merge_config(...), then check_config: a config to run."""
    return check_config(train.config.merge_config(*args, **kwargs))


def parse_command_line(argv):
    """train.config.parse_flags(argv), the config then checked by check_config."""
    config, action = train.config.parse_flags(argv)
    return (None if config is None else check_config(config)), action


def load_data(config):
    """The config's dataset (datasets.get_dataset with the config's data options)."""
    return get_dataset(
        config["data"], data_path=config["data_path"], image_size=config["image_size"],
        seed=config["seed"], skip_corrupt_images=config["skip_corrupt_images"],
        mixup_alpha=config["mixup_alpha"], cutmix_alpha=config["cutmix_alpha"],
        synthetic_samples=config["synthetic_samples"],
        synthetic_num_classes=config["synthetic_num_classes"],
        clutter_options=cluttered_digits.options_of(config))


def build_model(config, data, context=None, report=False, **options):
    """The config's model for this dataset, its norm layers built as engine_class(config)
    asks (norm_kwargs; `context`: the PyTorch engine's processes, None for one).
    `options`: further get_model options that are no config key (analysis.init_collapse:
    zero_init_residual). report=True returns (model, the ConversionReport of a
    torchvision:/timm: model or None).
    """
    from models import get_model

    model_kwargs = {key: config[key] for key in ("group_dim", "expand_ratio", "drop_rate",
                                                 "drop_path_rate") if config[key] is not None}
    try:
        model, conversion = get_model(
            config["model"], norm=config["norm"], num_classes=data.num_classes,
            groups=config["groups"], act=config["act"], in_channels=data.in_channels,
            norm_kwargs=engine_class(config).norm_kwargs(config, context), report=True,
            **model_kwargs, **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model {config['model']} with norm {config['norm']}: {error}") from None
    check_module_names(config, model)
    return (model, conversion) if report else model


def check_module_names(config, model):
    """pipeline_splits and recompute_checkpoints must name distinct modules of the model."""
    names = [name for name, _ in model.named_modules() if name]
    for key in ("pipeline_splits", "recompute_checkpoints"):
        for name in config[key]:
            if name not in names:
                near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                near = f"; nearby: {', '.join(near)}" if near else ""
                raise ConfigError(f"{key}: {config['model']} has no module '{name}'{near}")
            if config[key].count(name) > 1:
                raise ConfigError(f"{key}: '{name}' is given twice")


def make_engine(config, model, context=None, device=None):
    """The engine_class(config) engine for a model that build_model built: PopTorch, or
    PyTorch on `device` (default: resolve_device's) in `context` (default: one process)."""
    if engine_class(config) is PopTorchEngine:
        return PopTorchEngine(model, config)
    device = resolve_device(config["engine"]) if device is None else device
    return PyTorchEngine(model, config, device, context or Context())
