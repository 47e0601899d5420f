"""Training options, configs.yml and the command line, merged and validated in one place.

Every option is one name: a key in configs.yml (snake_case), a flag on the command line
(--kebab-case) and a key of the resolved config written to the run folder. A run's config
is the option defaults below, overridden by the named config from configs.yml, overridden
by the flags given. `merge_config` does that merge and is the only place that checks
values; anything it cannot accept raises ConfigError with one line naming the bad thing.
What an engine cannot run is its own check: train/build.py's resolve_config and
parse_command_line, which everything that runs a config calls, add it to merge_config and
parse_flags; this module knows no engine.
"""
import argparse
import difflib
import math
import os

import yaml

from datasets import DATASETS
from datasets.cluttered_digits import DEFAULTS as CLUTTER
from proxynorm.norms import norm_kind

CONFIGS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs.yml")
DEFAULT_CONFIG = "digits_resnet_group_pn"
# torch.manual_seed and torch.Generator take at most 2**64 - 1, PopTorch's randomSeed a
# signed 64-bit number, and the seeds derived from a run's (sample_seed) are below 2**63.
SEED_MAX = 2 ** 63 - 1
# Float options end in float32 arithmetic (weights, images, optimiser steps), where a
# larger magnitude overflows (an lr of 1e308: "value cannot be converted to type float").
FLOAT32_MAX = 3.4028234663852886e38
# Upper bounds where a larger value can only be a mistake and would allocate (or spawn) in
# proportion: --image-size 100000 asked for 71 TB. Each option's help gives its bounds.
IMAGE_SIZE_MAX = 2048  # pixels a side: 9 times EfficientNet-B7's 600 in area
BATCH_MAX = 2 ** 16  # samples per micro-batch, micro-batches per step, replicas


class ConfigError(Exception):
    """A bad config, flag or value: printed as one line, exit status 2."""


class InvalidYaml(ConfigError):
    """Text that is not YAML."""


# What changing an option does to a resumed run (train.checkpoint.check_compatible):
#   model        defines the network: a checkpoint loads only into a run where it agrees
#   compute      changes what the run computes: allowed, with a warning that the run is no
#                longer an exact continuation
#   bookkeeping  where the run writes, how often it reports, how it is run: free to change
# Each with its words in docs/options.md's last column.
ROLES = {"model": "must match", "compute": "warns", "bookkeeping": "free"}


class Option:
    """One option: its default, type (int, float, bool, str or list), help, role and limits.

    `role` is one of ROLES; `item` is the element type of a list; `null_ok` allows None
    (written `null` in YAML, `none` on the command line). Bounds: at_least/above and
    at_most/below.
    """

    def __init__(self, name, default, kind, help, *, role, choices=None, item=str,
                 null_ok=False, at_least=None, above=None, at_most=None, below=None,
                 length=None):
        self.name, self.default, self.kind, self.help, self.role = name, default, kind, help, role
        self.choices, self.item, self.null_ok, self.length = choices, item, null_ok, length
        self.at_least, self.above, self.at_most, self.below = at_least, above, at_most, below

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def limits(self):
        """The bounds in words: '>= 8 and <= 2048' ('' for none)."""
        return " and ".join(f"{sign} {limit}" for sign, limit in (
            (">=", self.at_least), (">", self.above), ("<=", self.at_most), ("<", self.below))
            if limit is not None)


# The defaults suit a quick CPU run; configs.yml holds the recipes.
OPTION_GROUPS = [
    ("run", [
        Option("config", DEFAULT_CONFIG, str, "named config from configs.yml (--list-configs lists "
               "them)", role="bookkeeping"),
        Option("output_dir", None, str, "run folder (null: runs/CONFIG-YYYYmmdd-HHMMSS)",
               null_ok=True, role="bookkeeping"),
        Option("resume", None, str, "continue a run: auto (the newest run of this config that "
               "it can continue, or --output-dir's; else start afresh), a checkpoint file or a "
               "run folder", null_ok=True, role="bookkeeping"),
        Option("seed", 0, int, "seeds initialisation, sample order, augmentation and dropout",
               at_least=0, at_most=SEED_MAX, role="compute"),
        Option("epochs", 10, int, "training epochs", at_least=1, role="bookkeeping"),
        Option("max_steps", 0, int, "stop after this many optimiser steps in all (0 = no limit)",
               at_least=0, role="bookkeeping"),
        Option("validation", True, bool, "validate at the end of every epoch (and at the end of "
               "the run)", role="bookkeeping"),
        Option("checkpoint_every", 0, int, "also keep checkpoint_epochN.pt every N epochs (0 = "
               "only checkpoint_last.pt and checkpoint_best.pt)", at_least=0, role="bookkeeping"),
        Option("log_every", 10, int, "optimiser steps per training record in metrics.jsonl",
               at_least=1, role="bookkeeping"),
        Option("wandb_mode", "offline", str, "Weights & Biases: online, offline (no account "
               "needed; `wandb sync` uploads it later) or disabled",
               choices=("online", "offline", "disabled"), role="bookkeeping"),
        Option("wandb_project", "proxy-norm", str, "Weights & Biases project", role="bookkeeping"),
    ]),
    ("model", [
        Option("model", "digits_preact_resnet", str, "model name (models.list_models()), or "
               "torchvision:NAME / timm:NAME for a torchvision classification model / a timm "
               "model converted to `norm`", role="model"),
        Option("norm", "group_pn", str, "normalisation: batch, sync_batch, group, layer, instance, "
               "group_pn, layer_pn, none", role="model"),
        Option("groups", None, int, "GroupNorm groups for group/group_pn (null: the model's)",
               null_ok=True, at_least=1, role="model"),
        Option("act", None, str, "activation: relu, silu, gelu, relu6, hardswish, leaky_relu, "
               "mish (null: the model's)", null_ok=True, role="model"),
        Option("group_dim", None, int, "EfficientNet: channels per group in its grouped convs (1 = "
               "depthwise, G1; 16 = G16)", null_ok=True, at_least=1, role="model"),
        Option("expand_ratio", None, int, "EfficientNet: expansion ratio of its inverted "
               "bottlenecks (EfficientNet's own: 6)", null_ok=True, at_least=1, at_most=64,
               role="model"),
        Option("drop_rate", None, float, "EfficientNet: dropout before the classifier",
               null_ok=True, at_least=0, below=1, role="compute"),
        Option("drop_path_rate", None, float, "EfficientNet: stochastic depth, the probability of "
               "dropping a residual branch (1 - survival probability)",
               null_ok=True, at_least=0, below=1, role="compute"),
    ]),
    ("data", [
        Option("data", "digits", str, "dataset", choices=DATASETS, role="model"),
        Option("data_path", None, str, "dataset folder (null: data/DATA)", null_ok=True,
               role="bookkeeping"),
        Option("image_size", None, int, "training and validation resolution (null: the dataset's)",
               null_ok=True, at_least=8, at_most=IMAGE_SIZE_MAX, role="compute"),
        Option("num_workers", 0, int, "data loading processes (0 = in the training process)",
               at_least=0, at_most=256, role="bookkeeping"),
        Option("skip_corrupt_images", False, bool, "replace an unreadable image by the next "
               "readable one and count it, instead of stopping with its file name",
               role="bookkeeping"),
        Option("synthetic_samples", 1024, int, "synthetic: training samples (validation: a "
               "quarter)", at_least=1, at_most=10 ** 7, role="compute"),
        Option("synthetic_num_classes", 1000, int, "synthetic: classes", at_least=2,
               at_most=10 ** 5, role="model"),
        Option("clutter", CLUTTER.clutter, int, "cluttered_digits: patches of other digits per "
               "canvas", at_least=0, at_most=64, role="compute"),
        Option("clutter_size", CLUTTER.clutter_size, int, "cluttered_digits: side of a clutter "
               "patch, in pixels of an 8x8 digit", at_least=1, at_most=8, role="compute"),
        Option("clutter_scale_min", CLUTTER.scale_min, float, "cluttered_digits: smallest "
               "scale of a digit, drawn per canvas (1 = 8x8 pixels; its clutter takes the same "
               "scale)", above=0, role="compute"),
        Option("clutter_scale_max", CLUTTER.scale_max, float, "cluttered_digits: largest scale "
               "of a digit (8 x clutter_scale_max pixels must fit in image_size)", above=0,
               role="compute"),
        Option("clutter_noise", CLUTTER.noise, float, "cluttered_digits: standard deviation of "
               "the Gaussian noise on [0, 1] pixels", at_least=0, role="compute"),
        Option("clutter_train_samples", CLUTTER.train_samples, int, "cluttered_digits: training "
               "canvases (from the 1,437 training digits)", at_least=1, at_most=10 ** 6,
               role="compute"),
        Option("clutter_val_samples", CLUTTER.val_samples, int, "cluttered_digits: validation "
               "canvases (from the 360 validation digits)", at_least=1, at_most=10 ** 6,
               role="compute"),
        Option("clutter_seed", CLUTTER.seed, int, "cluttered_digits: seed of the canvases, apart "
               "from the run's seed so that every run sees the same ones", at_least=0,
               at_most=SEED_MAX, role="compute"),
        Option("clutter_holdout", CLUTTER.holdout, bool, "cluttered_digits: for tuning a recipe; "
               "train on canvases of four fifths of the training digits and validate on "
               "canvases of the other fifth (the validation digits stay unseen)", role="compute"),
    ]),
    ("execution (global batch = micro_batch_size x gradient_accumulation x replicas)", [
        Option("engine", "auto", str, "auto (cuda if available, else cpu), cpu, cuda, or ipu "
               "(PopTorch; without it: cpu, with a warning)",
               choices=("auto", "cpu", "cuda", "ipu"), role="compute"),
        Option("cpu_threads", 0, int, "CPU threads for PyTorch's operators (0 = its default: one "
               "per core); 1 suits small models on shared cores, where a descheduled second "
               "thread stalls every operator", at_least=0, at_most=1024, role="bookkeeping"),
        Option("compile", False, bool, "CPU/GPU: torch.compile the training network (the first "
               "steps compile it; evaluation stays eager); the IPU engine compiles its own graph",
               role="bookkeeping"),
        Option("compile_mode", "default", str, "torch.compile's mode with compile: default, "
               "reduce-overhead (on a GPU, CUDA graphs: a step's many small launches replayed as "
               "one, for small micro-batches) or max-autotune", role="bookkeeping",
               choices=("default", "reduce-overhead", "max-autotune")),
        Option("channels_last", False, bool, "CPU/GPU: the model's weights and the input images "
               "in channels_last (NHWC) memory format, which cuDNN and the fused GPU op take as "
               "they are (the fused CPU op returns NCHW); the IPU engine lays out its own",
               role="compute"),
        Option("precision", "32.32", str, "activations.weights: 32.32, 16.32 or 16.16 (IPU "
               "float16); on CPU/GPU both 16.x run bfloat16 autocast with float32 weights",
               choices=("32.32", "16.32", "16.16"), role="compute"),
        Option("micro_batch_size", 32, int, "samples per replica per forward pass", at_least=1,
               at_most=BATCH_MAX, role="compute"),
        Option("gradient_accumulation", 1, int, "micro-batches per replica per optimiser step",
               at_least=1, at_most=BATCH_MAX, role="compute"),
        Option("replicas", 1, int, "data-parallel replicas (emulated in one process on CPU/GPU)",
               at_least=1, at_most=BATCH_MAX, role="compute"),
        Option("bn_group_size", 0, int, "sync_batch: replicas that share statistics (0 = all)",
               at_least=0, at_most=BATCH_MAX, role="compute"),
        Option("collective_timeout", 300, int, "torchrun: seconds a process waits for the others "
               "(to join, or in a collective) before it fails; it must cover the longest gap "
               "between two collectives: rank 0 starting wandb or writing a checkpoint, "
               "validation shards of unequal cost, a first step's set-up",
               at_least=1, at_most=10 ** 9,  # (a timedelta holds up to 8.6e13 s)
               role="bookkeeping"),
        Option("device_iterations", 1, int, "IPU: optimiser steps per host call", at_least=1,
               role="compute"),
        Option("pipeline_splits", [], list, "IPU: modules that begin a pipeline stage (checked "
               "against the model everywhere)", role="compute"),
        Option("stochastic_rounding", False, bool, "IPU: stochastic rounding of float16",
               role="compute"),
        Option("stable_norm", True, bool, "IPU: norm statistics in two passes (mean first), "
               "PopART's enableStableNorm; false: E[x^2] - E[x]^2, faster and less accurate",
               role="compute"),
        Option("loss_scaling", 1.0, float, "IPU: static loss scaling for float16", above=0,
               role="compute"),
        Option("ipu_model", False, bool, "IPU: run on the IPU Model simulator", role="compute"),
        Option("recompute_checkpoints", [], list, "IPU: modules whose outputs are kept; the "
               "activations between them are recomputed in the backward pass (checked against "
               "the model everywhere)", role="compute"),
        Option("available_memory_proportion", None, float, "IPU: share of each tile's memory "
               "that convolutions and matmuls may use for temporaries (null: Poplar's 0.6)",
               null_ok=True, above=0, at_most=1, role="compute"),
        Option("executable_cache_dir", None, str, "IPU: folder that caches compiled executables "
               "(null: none)", null_ok=True, role="bookkeeping"),
        Option("compile_only", False, bool, "IPU: compile for an offline IPU target (no IPU "
               "needed), fill executable_cache_dir and exit", role="bookkeeping"),
        Option("device_memory_mb", 900, int, "python -m train.plan: memory per device in MB "
               "(900: an IPU Mk2's In-Processor Memory)", at_least=1, role="bookkeeping"),
    ]),
    ("optimisation", [
        Option("optimizer", "sgd", str, "sgd, rmsprop (TensorFlow's: eps inside the square root) "
               "or adamw", choices=("sgd", "rmsprop", "adamw"), role="compute"),
        Option("lr", 0.1, float, "peak learning rate, for the global batch as configured (not "
               "rescaled)", above=0, role="compute"),
        Option("momentum", 0.9, float, "sgd and rmsprop momentum", at_least=0, below=1,
               role="compute"),
        Option("nesterov", False, bool, "sgd: Nesterov momentum", role="compute"),
        Option("weight_decay", 0.0, float, "L2 (sgd, rmsprop) or decoupled (adamw) decay; none on "
               "biases and norm weights (Proxy Norm's proxy_weight/proxy_bias take it)",
               at_least=0, role="compute"),
        Option("rmsprop_decay", 0.9, float, "rmsprop: decay of the mean square",
               at_least=0, below=1, role="compute"),
        Option("optimizer_eps", 1e-08, float, "rmsprop/adamw epsilon", above=0, role="compute"),
        Option("adam_betas", [0.9, 0.999], list, "adamw: [beta1, beta2]", item=float, length=2,
               role="compute"),
        Option("grad_clip_norm", 0.0, float, "clip the global-batch gradient to this norm (0 = "
               "off)", at_least=0, role="compute"),
        Option("lr_schedule", "cosine", str, "after warm-up: constant, step (x lr_decay at each of "
               "lr_milestones), cosine (to 0 at the last epoch) or exponential (x lr_decay every "
               "lr_decay_epochs)", choices=("constant", "step", "cosine", "exponential"),
               role="compute"),
        Option("warmup_epochs", 0.0, float, "linear warm-up from 0 over this many epochs",
               at_least=0, role="compute"),
        Option("lr_decay", 0.1, float, "step/exponential: decay factor", above=0, at_most=1,
               role="compute"),
        Option("lr_decay_epochs", 1.0, float, "exponential: epochs per decay (staircase)", above=0,
               role="compute"),
        Option("lr_milestones", [], list, "step: epochs at which the learning rate decays",
               item=float, role="compute"),
    ]),
    ("regularisation", [
        Option("label_smoothing", 0.0, float, "label smoothing", at_least=0, below=1,
               role="compute"),
        Option("mixup_alpha", 0.0, float, "mixup with a Beta(alpha, alpha) weight (0 = off)",
               at_least=0, role="compute"),
        Option("cutmix_alpha", 0.0, float, "cutmix with a Beta(alpha, alpha) area (0 = off; with "
               "mixup, each sample takes one of the two at random)", at_least=0, role="compute"),
        Option("weight_avg_decay", 0.0, float, "exponential average of the weights, updated every "
               "epoch and used for validation and checkpoint_best (0 = off)", at_least=0, below=1,
               role="compute"),
    ]),
]

OPTIONS = {option.name: option for _, group in OPTION_GROUPS for option in group}


def with_role(role):
    """The names of the options of one role (ROLES), in table order."""
    return tuple(name for name, option in OPTIONS.items() if option.role == role)


def defaults():
    return {name: option.default for name, option in OPTIONS.items()}


def closest(name, valid):
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return match[0] if match else None


def show(value):
    """A value as the user writes it (YAML spelling)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def brief(value, limit=80):
    """show(value) for a message: at most `limit` characters, so that a line stays a line."""
    text = value if isinstance(value, str) else show(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_value(option, value, where, from_cli=False):
    """The value, converted to the option's type; ConfigError if it is not acceptable.

    `where` names the source in messages ("--lr", "configs.yml 'name': lr"). Flag values
    arrive as strings and are parsed here, so both sources go through the same checks.
    """
    if from_cli:
        value = parse_flag_value(option, value, where)
    if value is None:
        if option.null_ok:
            return None
        raise ConfigError(f"{where} must be set (it cannot be null)")
    value = convert(option, value, where)
    if option.choices is not None and value not in option.choices:
        hint = closest(str(value), list(option.choices))
        hint = f" (did you mean '{hint}'?)" if hint else ""
        raise ConfigError(f"{where}: '{brief(value)}' is not one of {', '.join(option.choices)}"
                          f"{hint}")
    check_range(option, value, where)
    return value


def parse_flag_value(option, text, where):
    if not isinstance(text, str):  # already typed (a caller in Python)
        return text
    if option.null_ok and text.lower() in ("none", "null"):
        return None
    if option.kind is not list:
        return text
    if not text.strip().startswith("["):
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        return parse_yaml(text, where)
    except InvalidYaml:
        raise ConfigError(f"{where} expects a list such as [a, b], got {brief(text)!r}") from None


def convert(option, value, where):
    kind = option.kind
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             list: "a list"}
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
                return False
            if isinstance(value, bool):
                return value
        elif kind is int and not isinstance(value, (bool, float)):
            return int(value)
        elif kind is float and not isinstance(value, bool):
            number = float(value)  # also YAML 1.1's "1e-4", which it reads as a string
            if math.isfinite(number):
                return number
        elif kind is str and isinstance(value, str):
            return value
        elif kind is list and isinstance(value, list):
            item = Option(option.name, None, option.item, "", role=option.role)
            items = [convert(item, v, where) for v in value]
            if option.length is not None and len(items) != option.length:
                raise ConfigError(
                    f"{where} expects a list of {option.length} values, got {brief(value)}")
            return items
    except (TypeError, ValueError):
        pass
    if kind is str and isinstance(value, (int, float)):
        raise ConfigError(f"{where} expects a string, got the number {value} (quote it in YAML)")
    raise ConfigError(f"{where} expects {names[kind]}, got {brief(show(value))!r}")


def check_range(option, value, where):
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and abs(v) > FLOAT32_MAX:
            raise ConfigError(f"{where} must be at most {FLOAT32_MAX:.7g} in magnitude (the "
                              f"largest float32), got {brief(value)}")
        bad = ((option.at_least is not None and v < option.at_least)
               or (option.above is not None and v <= option.above)
               or (option.at_most is not None and v > option.at_most)
               or (option.below is not None and v >= option.below))
        if bad:
            raise ConfigError(f"{where} must be {option.limits()}, got {brief(value)}")


# A config is a few hundred values (configs.yml, every alias expanded, about 2,800), but
# aliases of aliases expand exponentially (9 levels of 9 made a 1.4 GB value from 337 bytes),
# so what a document expands to is counted before anything is built.
YAML_SIZE = 50_000
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that checks the composed document before it builds anything: no key
    twice in a mapping (YAML keeps the last, silently), no alias inside itself, and at most
    YAML_SIZE values with every alias expanded."""

    def check_document(self, root, where):
        sizes, open_nodes = {}, set()  # expanded size of each node, nodes being counted

        def size(node):
            if id(node) in sizes:
                return sizes[id(node)]
            if id(node) in open_nodes:
                raise ConfigError(f"{where} line {node.start_mark.line + 1}: an alias inside "
                                  f"the value it names (a recursive alias)")
            open_nodes.add(id(node))
            total = 1
            if isinstance(node, yaml.SequenceNode):
                total += sum(size(child) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                lines = {}
                for key, value in node.value:
                    total += size(key) + size(value)
                    if key.tag != MERGE_TAG and isinstance(key, yaml.ScalarNode):
                        name = self.construct_object(key)
                        if name in lines:
                            raise ConfigError(
                                f"{where} line {key.start_mark.line + 1}: key {name} appears "
                                f"twice in one mapping (lines {lines[name]} and "
                                f"{key.start_mark.line + 1}); give it once")
                        lines[name] = key.start_mark.line + 1
            if total > YAML_SIZE:
                raise ConfigError(f"{where}: its aliases expand to more than {YAML_SIZE} values "
                                  f"(aliases of aliases multiply); a config needs far fewer")
            open_nodes.discard(id(node))
            sizes[id(node)] = total
            return total

        size(root)


def parse_yaml(stream, where):
    """yaml.safe_load(stream), each document checked by _Loader first; ConfigError (one
    line) for what is not YAML. `where` names the source in messages."""
    loader = None
    try:
        loader = _Loader(stream)  # reads the first bytes: their encoding
        node = loader.get_single_node()
        if node is None:
            return None
        loader.check_document(node, where)
        return loader.construct_document(node)
    except yaml.reader.ReaderError as error:  # not UTF-8 (or UTF-16 with its byte-order mark)
        raise ConfigError(f"{where}: not a text file in UTF-8 or UTF-16 ({error.reason} at "
                          f"byte {error.position})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise InvalidYaml(f"{where}{at}: invalid YAML ({problem})") from None
    except RecursionError:
        raise InvalidYaml(f"{where}: invalid YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path):
    """A YAML file's content ({} if empty); ConfigError (one line) if unreadable."""
    try:
        with open(path, "rb") as f:  # bytes: YAML reads UTF-8, or UTF-16 by its byte-order mark
            return parse_yaml(f, path) or {}
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None


def load_configs(path=CONFIGS_PATH):
    """{name: {key: value}} from configs.yml; names starting with '_' are shared bases."""
    configs = read_yaml(path)
    if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
        raise ConfigError(f"{path} must map each config name to a mapping of options")
    return configs


def config_names(configs):
    return [name for name in configs if not str(name).startswith("_")]


def unknown_key_error(keys, where, flag=False):
    """ConfigError naming every unknown key (or flag) given, each with its closest valid name."""
    valid = [OPTIONS[k].flag for k in OPTIONS] if flag else list(OPTIONS)
    keys = [keys] if isinstance(keys, str) else keys
    named = []
    for key in keys:
        hint = closest(key, valid)
        named.append(f"{brief(key)} (did you mean {hint}?)" if hint else brief(key))
    kind = "option" if flag else "key"
    return ConfigError(f"{where}unknown {kind}{'s' if len(keys) > 1 else ''} {', '.join(named)}")


def is_config_file(name):
    """Whether --config names a file of the user's (PATH.yml) rather than a config."""
    return str(name).endswith((".yml", ".yaml"))


def run_name(config):
    """The name a run's folder starts with: the config's, or its file's stem."""
    name = config["config"]
    return os.path.splitext(os.path.basename(name))[0] if is_config_file(name) else name


def read_config_file(path):
    """A user's config file: a flat mapping of options, `config: NAME` naming a config of
    configs.yml to start from (else the built-in defaults)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    entries = read_yaml(path)
    if not isinstance(entries, dict) or any(isinstance(v, dict) for v in entries.values()):
        raise ConfigError(f"{path} must be a flat mapping of options (key: value), as one "
                          f"config of configs.yml")
    return entries


def apply_entries(config, entries, file, name=None):
    """config updated with a config's entries (name: of configs.yml; None: a user's file),
    each checked; every unknown key is named at once."""
    unknown = [str(key) for key in entries if key not in OPTIONS or key == "config"]
    if unknown:
        raise unknown_key_error(unknown, f"{file}, config '{name}': " if name else f"{file}: ")
    for key, value in entries.items():
        config[key] = check_value(OPTIONS[key], value,
                                  f"{file} '{name}': {key}" if name else f"{file}: {key}")


def merge_config(name=DEFAULT_CONFIG, overrides=None, configs=None, path=CONFIGS_PATH):
    """Defaults <- configs.yml[name] <- overrides (flag values, as strings or typed).

    name may be a file of the user's (PATH.yml): its options apply over the built-in
    defaults, or over the config it names with `config: NAME`. Returns the resolved
    config: every option, in OPTIONS order, checked.
    """
    configs = load_configs(path) if configs is None else configs
    names = config_names(configs)
    entries = {}
    base = name
    if is_config_file(name):
        entries = dict(read_config_file(name))
        base = entries.pop("config", None)
    if base is not None and base not in names:
        hint = closest(str(base), names)
        hint = f" (did you mean '{hint}'?)" if hint else ""
        if is_config_file(name):
            raise ConfigError(f"{name}: unknown config '{base}'{hint}")
        raise ConfigError(f"unknown config '{name}'{hint}; configs: {', '.join(names)}")
    config = defaults()
    if base is not None:
        apply_entries(config, configs[base], os.path.basename(path), base)
    apply_entries(config, entries, os.path.basename(str(name)))
    for key, value in (overrides or {}).items():
        if key not in OPTIONS:
            raise unknown_key_error("--" + key.replace("_", "-"), "", flag=True)
        config[key] = check_value(OPTIONS[key], value, OPTIONS[key].flag, from_cli=True)
    config["config"] = name
    check_combination(config)
    return config


def check_combination(config):
    """Checks that involve more than one key (or the model registry)."""
    from models import check_model_name, list_models, model_source  # models/ is below train/
    from proxynorm.activations import ACTS
    from proxynorm.norms import NORMS

    source = model_source(config["model"])  # torchvision:NAME, timm:NAME
    for key, valid in (("model", list_models()), ("norm", NORMS), ("act", list(ACTS))):
        value = config[key]
        if key == "model" and source is not None:
            try:
                check_model_name(value)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        elif value is not None and value not in valid:
            hint = closest(value, list(valid))
            hint = f" (did you mean '{hint}'?)" if hint else ""
            raise ConfigError(f"unknown {key} '{value}'{hint}; valid: {', '.join(valid)}")
    if source is not None:  # torchvision's and timm's models keep their own act and options
        for key in ("act", "group_dim", "expand_ratio", "drop_rate", "drop_path_rate"):
            if config[key] is not None:
                raise ConfigError(f"{key} does not apply to {config['model']} ({source.LABEL} "
                                  f"models keep their own); unset it (--{key.replace('_', '-')}"
                                  f" null)")
    if norm_kind(config["norm"]).synchronised and config["bn_group_size"] > 1 and (
            config["replicas"] % config["bn_group_size"]):
        raise ConfigError(f"bn_group_size {config['bn_group_size']} does not divide replicas "
                          f"{config['replicas']}")
    if config["lr_schedule"] == "step" and not config["lr_milestones"]:
        raise ConfigError("lr_schedule step needs lr_milestones (epochs at which to decay)")


def global_batch_size(config):
    return config["micro_batch_size"] * config["gradient_accumulation"] * config["replicas"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise ConfigError(message)


def build_parser(shown=None):
    """The command-line parser; shown: a resolved config whose values --help gives as the
    defaults (--config X --help), else the built-in defaults."""
    epilog = (f"Defaults shown are {shown['config']}'s values; flags override them."
              if shown else "Defaults shown are the built-in ones; a config in configs.yml "
              "overrides them and flags override the config.")
    parser = _Parser(
        prog="python -m train", allow_abbrev=False,
        usage="python -m train [--config NAME] [--flag VALUE ...] | --list-configs | --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a named config from configs.yml; flags override its values.",
        epilog=f"{epilog}\nBooleans: true/false (a bare flag means true). "
               "Lists: '[a, b]' or a,b. None: none. --config also takes a file of your own, "
               "PATH.yml: a flat mapping of options (config: NAME starts from that config).")
    parser.add_argument("--list-configs", action="store_true",
                        help="list the configs in configs.yml and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults, config, flags) as YAML and "
                             "exit")
    for title, group in OPTION_GROUPS:
        arguments = parser.add_argument_group(title)
        for option in group:
            extra = {"nargs": "?", "const": "true"} if option.kind is bool else {}
            choices = f" {{{','.join(option.choices)}}}" if option.choices else ""
            arguments.add_argument(
                option.flag, dest=option.name, default=argparse.SUPPRESS,
                metavar=option.kind.__name__.upper(), **extra,
                help=f"{option.help}{choices} (default: "
                     f"{show(shown[option.name] if shown else option.default)}"
                     f"{'; ' + option.limits() if option.limits() else ''})")
    return parser


def config_argument(argv):
    """The value of --config in argv, or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_flags(argv):
    """(config, action) from command-line arguments: action is None (train), "list"
    (--list-configs: config is None) or "print" (--print-config); ConfigError for bad ones."""
    argv = [str(arg) for arg in argv]
    shown = None
    if ("--help" in argv or "-h" in argv) and config_argument(argv) is not None:
        shown = merge_config(config_argument(argv))
    parser = build_parser(shown)
    args, extras = parser.parse_known_args(argv)
    if extras:
        first = extras[0]
        if first.startswith("--"):
            raise unknown_key_error([extra.split("=")[0] for extra in extras
                                     if extra.startswith("--")], "", flag=True)
        raise ConfigError(f"unexpected argument '{brief(first)}' (options are --name value)")
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("list_configs", "print_config", "config")}
    if args.list_configs:
        return None, "list"
    config = merge_config(getattr(args, "config", DEFAULT_CONFIG), overrides)
    return config, "print" if args.print_config else None


def describe_configs(configs=None, path=CONFIGS_PATH):
    """A header line, then one line per config: name, model, norm, data, global batch (its
    factors) and engine.

    Checks only the values it shows (ConfigError naming the config for a bad one, such as
    `model: null`): a config with another bad key is still listed.
    """
    configs = load_configs(path) if configs is None else configs
    names = config_names(configs)
    shown = ("model", "norm", "data", "micro_batch_size", "gradient_accumulation", "replicas",
             "engine")
    rows = []
    for name in names:
        config = defaults()
        for key in set(shown) & set(configs[name]):
            config[key] = check_value(OPTIONS[key], configs[name][key],
                                      f"{os.path.basename(path)} '{name}': {key}")
        rows.append([str(name), config["model"], config["norm"], config["data"],
                     f"global batch {global_batch_size(config)} ({config['micro_batch_size']} x "
                     f"{config['gradient_accumulation']} x {config['replicas']}), "
                     f"{config['engine']}"])
    header = ["config", "model", "norm", "data", "global batch (micro_batch_size x "
              "gradient_accumulation x replicas), engine"]
    width = [max(len(row[column]) for row in rows + [header]) for column in range(4)]
    return [" ".join([f"{text:<{w}}" for text, w in zip(row, width)] + [row[4]])
            for row in [header] + rows]


OPTIONS_PAGE_INTRO = """# Options

Every option of `python -m train`: a key in `configs.yml`, a flag and a key of the run's
`config.yml` ([the command line](training.md#the-command-line)). The last column says what a
resumed run does when the option differs from its checkpoint's
([resuming](training.md#resuming)): **must match** (it defines the network: the checkpoint
is refused; `synthetic_num_classes` only on synthetic data), **warns** (allowed, but the run
is no longer an exact continuation) or **free** (`epochs` warns where it changes the
learning-rate schedule still to come).

Generated by `make docs` from the option table in `train/config.py`: edit it there.
"""


def options_markdown():
    """docs/options.md: the option table, group by group, as the page shows it."""
    lines = [OPTIONS_PAGE_INTRO, "| key (`--flag`) | default | meaning | on resume |",
             "|---|---|---|---|"]
    for title, group in OPTION_GROUPS:
        lines.append(f"| **{title}** | | | |")
        for option in group:
            meaning = option.help
            # a help that names every choice already gives them, in context
            if option.choices and not all(choice in meaning for choice in option.choices):
                meaning += f" ({', '.join(option.choices)})"
            if option.limits():
                meaning += f" ({option.limits()})"
            meaning = meaning.replace("|", "\\|")  # a cell ends at a bare |
            lines.append(f"| `{option.name}` | `{show(option.default)}` | {meaning} | "
                         f"{ROLES[option.role]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # make docs
    parser = argparse.ArgumentParser(prog="python -m train.config")
    parser.add_argument("--markdown", metavar="PATH", required=True,
                        help="write the options page (docs/options.md) to PATH")
    with open(parser.parse_args().markdown, "w", newline="\n") as page:
        page.write(options_markdown())
