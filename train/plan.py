"""`python -m train.plan --config NAME [--flag value ...]`: memory per device, per pipeline stage.

Takes the training command's config and flags, builds the model as training does and runs
one training step (forward, cross-entropy, backward) on the CPU, on random images of the
config's size: no data is read. Per pipeline stage (stage 0 begins at the input and each
module in pipeline_splits begins the next one, in the order the forward pass reaches
them; on an IPU a stage is one IPU) it reports the parameters, their gradients, the
gradient accumulator, the optimiser state, the activations autograd saved while the
stage's modules ran, the pipeline's stash of the stage's inputs, and the total against
device_memory_mb. For each norm in --plan-norms it measures at micro-batches 1 and 2 and
reports the largest micro-batch at which every stage fits.

This module runs on torch 2.0 (PopTorch's pin): no newer torch API here.
"""
import os
import sys

import torch
import torch.nn.functional as F

from proxynorm import ops
from datasets import Data, error_line
from proxynorm.norms import NORMS
from train.build import build_model, parse_command_line
from train.config import ConfigError, Option, _Parser, closest, describe_configs, parse_flag_value

MB = 10 ** 6  # device_memory_mb's unit: Graphcore quotes an IPU Mk2's 900 MB in these
PLAN_NORMS = ("batch", "group", "group_pn", "layer_pn")
# Activations are measured in the activation dtype; on the CPU half precision is bfloat16,
# which takes the 2 bytes of the IPU's float16.
ACTIVATION_DTYPES = {"32": torch.float32, "16": torch.bfloat16}
WEIGHT_BYTES = {"32": 4, "16": 2}
# The gradient accumulator and the optimiser state are float32 at every precision:
# train/ipu_engine.py's ipu_optimizer asks PopTorch for float32 accum_type and momenta.
STATE_BYTES = 4
NOT_MODELLED = ("code, exchange buffers, Poplar's temporaries (convolution and matmul "
                "workspace, see available_memory_proportion), recomputation other than "
                "PopTorch's default for pipelines (recompute_checkpoints), tensors reaching "
                "a stage other than through its first module, the weight average "
                "(weight_avg_decay), and how what PopART's backward keeps differs from what "
                "PyTorch's autograd saves")


def saved_storages(run, stage=lambda: 0):
    """{storage data_ptr: (stage, bytes)}: the distinct storages autograd saves while
    `run()` runs, each with what `stage()` returned when it was first saved."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), (stage(), storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return storages


def data_shape(config):
    """A stand-in for the config's dataset with what the model needs to know, read from
    no files (ImageNet is taken to have its 1,000 classes)."""
    from datasets import cluttered_digits, digits, folders, synthetic

    num_classes, in_channels, default_size = {
        "digits": (10, 1, digits.IMAGE_SIZE),
        "cluttered_digits": (10, 1, cluttered_digits.DEFAULTS.canvas_size),
        "cifar10": (10, 3, folders.CIFAR_IMAGE_SIZE),
        "cifar100": (100, 3, folders.CIFAR_IMAGE_SIZE),
        "imagenet": (1000, 3, folders.IMAGENET_IMAGE_SIZE),
        "synthetic": (config["synthetic_num_classes"], synthetic.IN_CHANNELS,
                      synthetic.IMAGE_SIZE),
    }[config["data"]]
    return Data(None, None, num_classes, in_channels, config["image_size"] or default_size)


def stash_size(stage, num_stages):
    """Micro-batches of its input that a pipeline stage keeps (0 for the last stage).

    PopTorch pipelines with PopART's full recomputation unless told otherwise (graphcore/
    poptorch at c2a8b17, 2023-09, popart_compiler/source/Compiler.cpp: autoRecomputation =
    RecomputationType::Pipeline when a pipeline uses more than one IPU), and then PopART
    stashes only what enters each IPU and recomputes the rest in the backward pass
    (graphcore/popart at d2f20d7, 2023-09, willow/src/transforms/pipeline.cpp,
    getStashCandidateTensors: "Full recompute uses stashes only on the inputs to an IPU").
    So a stage holds one micro-batch of activations plus a stash of its input. The
    backward of forward stage s runs in stage 2 (P - 1) - s (willow/src/transforms/
    autodiff/gradgrowerop.cpp: maxPipelineStage - stage, twice the loss's stage by
    Ir::getMaxPipelineStage in ir.cpp), so the stash holds Pipeline::getStashSize =
    numIndependentStages(s, 2 (P - 1) - s + 1) = 2 (P - 1 - s) + 1 micro-batches, as
    pipeline.cpp's header says: "a stash size of 2*(IPUs to end) + 1, except for the last
    IPU, which has no stash".
    """
    return 0 if stage == num_stages - 1 else 2 * (num_stages - 1 - stage) + 1


def optimizer_slots(config):
    """Parameter-sized optimiser state buffers: sgd's momentum (velocity), rmsprop's mean
    square and momentum, adamw's two moments."""
    momentum = int(config["momentum"] > 0)
    return {"sgd": momentum, "rmsprop": 1 + momentum, "adamw": 2}[config["optimizer"]]


def weight_bytes(config, parameters):
    """Bytes of `parameters` parameters and their gradients in the weight dtype, and of the
    gradient accumulator (only when gradient_accumulation > 1) and the optimiser state."""
    size = parameters * WEIGHT_BYTES[config["precision"].split(".")[1]]
    accumulator = parameters * STATE_BYTES if config["gradient_accumulation"] > 1 else 0
    return {"parameter_bytes": size, "gradient_bytes": size, "accumulator_bytes": accumulator,
            "optimizer_bytes": optimizer_slots(config) * parameters * STATE_BYTES}


def build(config):
    """The config's model, built as training builds it, and its stand-in dataset. With one
    replica: a device holds one replica's micro-batch, which BatchNorm's statistics cover."""
    data = data_shape(config)
    return build_model({**config, "replicas": 1}, data), data


def tensor_bytes(values):
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def measure(model, data, config, micro_batch):
    """One training step at `micro_batch`. Per stage: saved activation bytes, input bytes
    (what its first module receives) and parameters; and the module that begins each
    stage ("input" for stage 0)."""
    dtype = ACTIVATION_DTYPES[config["precision"].split(".")[0]]
    model = model.to(dtype).train()
    generator = torch.Generator().manual_seed(config["seed"])
    images = torch.randn(micro_batch, data.in_channels, data.image_size, data.image_size,
                         generator=generator).to(dtype)
    labels = torch.randint(data.num_classes, (micro_batch,), generator=generator)

    splits = {module: name for name, module in model.named_modules()
              if name in config["pipeline_splits"]}
    starts, inputs, parameter_stage = ["input"], [tensor_bytes([images])], {}

    def enter(module, arguments):  # a split begins the next stage the first time it runs
        if module in splits:
            starts.append(splits.pop(module))
            inputs.append(tensor_bytes(arguments))
        for parameter in module.parameters(recurse=False):
            parameter_stage.setdefault(parameter, len(starts) - 1)

    hooks = [module.register_forward_pre_hook(enter) for module in model.modules()]
    try:
        saved = saved_storages(lambda: F.cross_entropy(model(images), labels).backward(),
                               stage=lambda: len(starts) - 1)
    except (RuntimeError, ValueError) as error:  # e.g. BatchNorm with 1 value per channel
        raise ConfigError(f"{config['model']} with {config['norm']} cannot train at "
                          f"micro-batch {micro_batch} on {data.image_size}x{data.image_size} "
                          f"images: {error_line(error)}") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
    if splits:
        raise ConfigError(f"pipeline_splits: the forward pass never reaches "
                          f"{', '.join(splits.values())}")
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations, parameters = [0] * len(starts), [0] * len(starts)
    for pointer, (stage, size) in saved.items():
        if pointer not in parameter_storages:  # parameters are counted as parameters
            activations[stage] += size
    for parameter in model.parameters():
        parameters[parameter_stage.get(parameter, 0)] += parameter.numel()
    return activations, inputs, parameters, starts


def bytes_per_sample(stage):
    """A fitted stage's bytes per sample: activations and the stash of its input."""
    return (stage["activation_bytes_per_sample"]
            + stage["stash_size"] * stage["input_bytes_per_sample"])


def stage_bytes(stage, micro_batch):
    """A stage's memory at `micro_batch`, from a norm's fit (fit_norm's stages)."""
    return (stage["weight_bytes"] + stage["fixed_activation_bytes"]
            + bytes_per_sample(stage) * micro_batch)


def largest_micro_batch(stages, budget):
    """The largest micro-batch at which every stage's stage_bytes fits `budget` (0: none)."""
    limits = []
    for stage in stages:
        room = budget - stage_bytes(stage, 0)
        per_sample = bytes_per_sample(stage)
        if per_sample > 0:
            limits.append(room // per_sample)
        elif room < 0:  # a stage without activations whose weights alone do not fit
            limits.append(0)
    return max(0, min(limits))


def fit_norm(config):
    """Per stage: the weight bytes, the activations at micro-batch m as fixed + per sample
    x m, measured at m = 1 and 2, the input per sample and the stash size; and the largest
    micro-batch that fits."""
    model, data = build(config)
    one, inputs, parameters, _ = measure(model, data, config, 1)
    two, _, _, _ = measure(model, data, config, 2)
    stages = [{"weight_bytes": sum(weight_bytes(config, count).values()),
               "fixed_activation_bytes": 2 * at_one - at_two,
               "activation_bytes_per_sample": at_two - at_one,
               "input_bytes_per_sample": input_bytes, "stash_size": stash_size(index, len(one))}
              for index, (at_one, at_two, input_bytes, count)
              in enumerate(zip(one, two, inputs, parameters))]
    budget = config["device_memory_mb"] * MB
    return {"stages": stages, "largest_micro_batch": largest_micro_batch(stages, budget)}


def plan(config, norms=PLAN_NORMS):
    """The report: the config's stages at its micro-batch, and fit_norm for each norm."""
    for norm in norms:
        if norm not in NORMS:
            hint = closest(norm, list(NORMS))
            hint = f" (did you mean '{hint}'?)" if hint else ""
            raise ConfigError(f"--plan-norms: unknown norm '{norm}'{hint}; valid: "
                              f"{', '.join(NORMS)}")
    if config["cpu_threads"]:
        torch.set_num_threads(config["cpu_threads"])
    torch.manual_seed(config["seed"])
    model, data = build(config)
    micro_batch = config["micro_batch_size"]
    activations, inputs, parameters, starts = measure(model, data, config, micro_batch)
    budget = config["device_memory_mb"] * MB
    stages = []
    for index, (begins_at, saved, input_bytes, count) in enumerate(
            zip(starts, activations, inputs, parameters)):
        stash = stash_size(index, len(starts))
        weights = weight_bytes(config, count)
        total = sum(weights.values()) + saved + stash * input_bytes
        stages.append({"stage": index, "begins_at": begins_at, "parameters": count, **weights,
                       "activation_bytes": saved, "input_bytes": input_bytes,
                       "stash_size": stash, "stash_bytes": stash * input_bytes,
                       "total_bytes": total, "fits": total <= budget})
    fits = {}
    for norm in norms:
        try:
            fits[norm] = fit_norm({**config, "norm": norm})
        except ConfigError as error:  # e.g. BatchNorm cannot train at micro-batch 1
            fits[norm] = {"error": str(error)}
    activation_precision, weight_precision = config["precision"].split(".")
    fused = ops.fused_enabled() and ops.cpu.load()
    return {
        "config": config["config"], "model": config["model"], "norm": config["norm"],
        "data": config["data"], "num_classes": data.num_classes,
        "in_channels": data.in_channels, "image_size": data.image_size,
        "micro_batch_size": micro_batch, "precision": config["precision"],
        "measured_dtype": str(ACTIVATION_DTYPES[activation_precision]).split(".")[1],
        "weight_bytes_per_parameter": WEIGHT_BYTES[weight_precision],
        "state_bytes_per_parameter": STATE_BYTES,
        "optimizer": config["optimizer"], "optimizer_slots": optimizer_slots(config),
        "gradient_accumulation": config["gradient_accumulation"],
        "pipeline_splits": config["pipeline_splits"],
        "proxy_norm_path": "fused CPU op" if fused else "eager",
        "device_memory_mb": config["device_memory_mb"], "unit": "MB = 10^6 bytes",
        "stages": stages, "norms": fits, "not_modelled": NOT_MODELLED,
    }


def mb(size):
    return f"{size / MB:,.2f}"


def text_table(header, rows):
    """Plain-text columns: the first left-aligned, the rest right-aligned."""
    lines = [header] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


def format_report(report):
    stages, micro_batch = report["stages"], report["micro_batch_size"]
    size = report["image_size"]
    lines = [
        f"{report['config']}: {report['model']} with {report['norm']}, "
        f"{report['num_classes']} classes, {report['in_channels']}x{size}x{size} images, "
        f"micro-batch {micro_batch}, precision {report['precision']}, {len(stages)} pipeline "
        f"stage{'s' if len(stages) > 1 else ''}; memory per device (one replica) in MB "
        f"(10^6 bytes), budget device_memory_mb {report['device_memory_mb']} MB", ""]
    header = ["stage", "parameters", "weights", "gradients", "accumulator", "optimiser",
              "activations", "stash", "total", "fits"]
    rows = [[f"{s['stage']}: {s['begins_at']}", f"{s['parameters']:,}",
             mb(s["parameter_bytes"]), mb(s["gradient_bytes"]), mb(s["accumulator_bytes"]),
             mb(s["optimizer_bytes"]), mb(s["activation_bytes"]),
             f"{s['stash_size']} x {mb(s['input_bytes'])}" if s["stash_size"] else "-",
             mb(s["total_bytes"]), "yes" if s["fits"] else "NO"] for s in stages]
    lines += [text_table(header, rows), ""]
    accumulation, slots = report["gradient_accumulation"], report["optimizer_slots"]
    lines += [
        f"- weights and gradients: {report['weight_bytes_per_parameter']} bytes per parameter "
        f"(precision {report['precision']}); the gradient accumulator (only when "
        f"gradient_accumulation > 1; here {accumulation}) and the optimiser state "
        f"({report['optimizer']}: {slots} buffer{'' if slots == 1 else 's'}) "
        f"{report['state_bytes_per_parameter']} bytes per parameter, float32 as the IPU "
        f"engine keeps them.",
        f"- activations: the distinct storages autograd saved in one training step at "
        f"micro-batch {micro_batch}, parameters excluded, measured on the CPU in "
        f"{report['measured_dtype']}"
        + (" (the 2 bytes of the IPU's float16)" if report["measured_dtype"] == "bfloat16"
           else "")
        + ("; Proxy Norm ran the fused CPU op, the closest to the IPU op."
           if report["proxy_norm_path"] == "fused CPU op" else
           "; Proxy Norm ran its eager path (the fused CPU op is not available), which "
           "saves more than the fused op would."),
        "- stash: PopTorch pipelines recompute each stage's activations in the backward pass "
        "and PopART stashes the stage's input instead, for 2 x (stages after it) + 1 "
        "micro-batches; the last stage stashes nothing." if len(stages) > 1 else
        "- stash: one stage, so no pipeline stash."]
    lines += ["", f"largest micro-batch that fits {report['device_memory_mb']} MB on every "
                  f"stage (measured at micro-batches 1 and 2: fixed + per sample x micro-batch, "
                  f"per sample including the stash; per stage, separated by /):"]
    header = ["norm", "weights+grads+optimiser MB", "activations MB fixed", "per sample",
              "largest micro-batch"]
    rows, errors = [], []
    for norm, fit in report["norms"].items():
        if "error" in fit:
            rows.append([norm, "-", "-", "-", "none (below)"])
            errors.append(f"- {norm}: {fit['error']}")
            continue
        stages = fit["stages"]
        rows.append([norm, " / ".join(mb(s["weight_bytes"]) for s in stages),
                     " / ".join(mb(s["fixed_activation_bytes"]) for s in stages),
                     " / ".join(mb(bytes_per_sample(s)) for s in stages),
                     fit["largest_micro_batch"]])
    lines += [text_table(header, rows)] + errors
    lines += ["", f"not modelled: {report['not_modelled']}."]
    return "\n".join(lines)


def main(argv=None):
    parser = _Parser(
        prog="python -m train.plan", allow_abbrev=False,
        usage="python -m train.plan [--config NAME] [--flag VALUE ...] [--plan-norms NORMS] "
              "[--json PATH]",
        description=__doc__.split("\n\n")[1],
        epilog="Every flag of python -m train is accepted (python -m train --help lists "
               "them); device_memory_mb sets the budget.")
    parser.add_argument("--plan-norms", default=",".join(PLAN_NORMS), metavar="NORMS",
                        help=f"norms to find the largest micro-batch for (default: "
                             f"{','.join(PLAN_NORMS)}; any of {', '.join(NORMS)})")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    try:
        args, training_flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        config, action = parse_command_line(training_flags)
        if action == "list":
            print("\n".join(describe_configs()))
            return 0
        plan_norms = Option("plan_norms", None, list, "", role="bookkeeping")
        norms = parse_flag_value(plan_norms, args.plan_norms, "--plan-norms")
        folder = os.path.dirname(os.path.abspath(args.json or "."))
        if not os.path.isdir(folder):  # before minutes of measuring, not after
            raise ConfigError(f"--json: {folder} is not a folder")
        report = plan(config, norms)
        if args.json:
            from train.files import write_json

            try:
                write_json(args.json, report)
            except OSError as error:
                raise ConfigError(f"--json: cannot write {args.json}: {error.strerror}") from None
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
