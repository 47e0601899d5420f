"""Checkpoints: plain dicts, written atomically, read with torch.load(weights_only=True).

A checkpoint holds everything a run needs to continue exactly: the resolved config, the
optimiser step, the engine's state (model and optimiser), the weight average, the random
number generators' states and the best validation accuracy so far. The sample order needs
no state: it is a function of (seed, epoch), and the step says where in the epoch to start.
"""
import inspect
import os
import re

import torch

from datasets import error_line
from train.config import (OPTIONS, ConfigError, check_value, defaults, run_name, show,
                          with_role)
from train.files import RunFolder, write_atomically

FORMAT = "proxy-norm-train/2"
# the first version lacked what FORMAT adds (ADDED_IN_2): `load` completes it
FORMAT_1 = "proxy-norm-train/1"
ADDED_IN_2 = ("validation_due", "val_weights", "num_classes", "in_channels", "totals")


# torch.load takes mmap from torch 2.1; torch 2.0 (PopTorch's pin) reads the whole file
LOAD_CAN_MMAP = "mmap" in inspect.signature(torch.load).parameters


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or from another model: printed as one line."""


# The schema, in one place: `make` builds a checkpoint, `load` reads one back and checks it
# with `malformed` before anything is built from it. A checkpoint of FORMAT holds every key
# `make` writes; one of FORMAT_1 may lack any of ADDED_IN_2, which `load` gives it (as
# `make` would have from what it holds), and any checkpoint's config gets the options added
# since it was written (their defaults), so that readers need no fallbacks of their own.
REQUIRED_CONFIG = with_role("model") + ("seed", "epochs", "micro_batch_size",
                                        "gradient_accumulation", "replicas")


def make(*, config, step, steps_per_epoch, engine, weight_average, val_accuracy,
         best_val_accuracy, skipped_images, validation_due, num_classes, in_channels, totals):
    """A checkpoint: engine and weight_average are their state_dicts (weight_average None
    without averaging); the random generators' states are taken here. totals: the run's
    train_seconds, train_images and wall_seconds up to this step, over all of its parts."""
    return {
        "format": FORMAT, "config": config, "step": step, "epoch": step / steps_per_epoch,
        "engine": engine, "weight_average": weight_average, "rng": rng_state(),
        "val_accuracy": val_accuracy, "best_val_accuracy": best_val_accuracy,
        "skipped_images": skipped_images,
        # a resumed run validates first: the checkpoint was taken before a failed validation
        "validation_due": validation_due,
        # what train.evaluate.load_model needs: the accuracy's weights, the network's shape
        "val_weights": "weight_average" if weight_average and weight_average["updates"]
        else "model",
        "num_classes": num_classes, "in_channels": in_channels, "totals": totals,
    }


def save(path, checkpoint):
    """Written whole or not at all (train.files.write_atomically): a crash never leaves half
    a checkpoint, and a full disk leaves the previous one as it was."""
    write_atomically(path, lambda f: torch.save(checkpoint, f), binary=True)


def load(path, mmap=False):
    """The checkpoint's dict, checked against the schema (`malformed`) and completed for an
    older version; CheckpointError (one line) otherwise. mmap: leave the tensors on disk (to
    read a few numbers of a large one; torch 2.0 reads it all, LOAD_CAN_MMAP)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True,
                                **({"mmap": mmap} if LOAD_CAN_MMAP else {}))
    except Exception as error:  # pickle, zip and weights_only errors differ by torch version
        raise CheckpointError(f"cannot read checkpoint {path}: {unreadable(error)}") from None
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found not in (FORMAT, FORMAT_1):
        newer = isinstance(found, str) and found.startswith(FORMAT.split("/")[0] + "/")
        raise CheckpointError(f"{path} is a checkpoint of format {found}, which this version "
                              f"does not read (it reads {FORMAT} and {FORMAT_1})" if newer else
                              f"{path} is not a checkpoint of this training application")
    problem = malformed(checkpoint)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}")
    if found == FORMAT_1:  # the later ones of its files hold some of ADDED_IN_2 already
        average = checkpoint["weight_average"]
        checkpoint.setdefault("validation_due", False)
        checkpoint.setdefault("val_weights", "weight_average" if average and average["updates"]
                              else "model")
        checkpoint.setdefault("num_classes", None)
        checkpoint.setdefault("in_channels", None)
        checkpoint.setdefault("totals", None)  # unknown: the summary covers the parts after it
        checkpoint["format"] = FORMAT
    checkpoint["config"] = {**defaults(), **checkpoint["config"]}
    return checkpoint


def unreadable(error):
    """Why torch.load failed, in a line. A file that holds more than tensors and plain data
    (weights_only refuses it) is not a checkpoint of ours: never pass on torch's advice to
    load it with weights_only=False, which would let the file run code."""
    text = str(error)
    if "weights_only" in text or "WeightsUnpickler" in text:
        # torch 2.14 names it "Unsupported global: GLOBAL argparse.Namespace",
        # torch 2.0 (PopTorch's pin) "Unsupported class argparse.Namespace"
        found = re.search(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)", text)
        held = f" ({found.group(1)})" if found else ""
        return f"it holds objects{held} besides tensors and plain data, as no checkpoint does"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def is_count(value, least=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_state(value):
    """A state_dict: a non-empty dict of named tensors."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def has_kind(kind, value, item=str):
    if kind is list:
        return isinstance(value, list) and all(has_kind(item, v) for v in value)
    if kind is float:
        return is_number(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
         list: "a list"}


def config_problem(config):
    """What is wrong with a checkpoint's config (None if nothing): a key the network needs
    missing, or a value of the wrong type or out of its option's range."""
    missing = [key for key in REQUIRED_CONFIG if key not in config]
    if missing:
        return f"config has no {', '.join(missing)}"
    for key, value in config.items():
        option = OPTIONS.get(key)
        if option is None or (value is None and option.null_ok):
            continue  # an option this version no longer has is not read
        if not has_kind(option.kind, value, option.item):
            return f"config.{key} is {value!r}, not {KINDS[option.kind]}" + (
                f" of {KINDS[option.item][len('a '):]}s" if option.kind is list else "")
        try:
            check_value(option, value, f"config.{key}")
        except ConfigError as error:
            return str(error)
    return None


def malformed(checkpoint):
    """What a checkpoint of a format `load` reads lacks or holds wrongly (None if nothing)."""
    for key, kind in (("config", dict), ("engine", dict), ("rng", dict)):
        if not isinstance(checkpoint.get(key), kind):
            return f"no {key}"
    for key in ("step", "weight_average", "val_accuracy", "best_val_accuracy",
                "skipped_images") + (ADDED_IN_2 if checkpoint.get("format") != FORMAT_1 else ()):
        if key not in checkpoint:
            return f"no {key}"
    step = checkpoint["step"]
    if not is_count(step):
        return f"step {step!r} is not a step number"
    if not is_count(checkpoint["skipped_images"]):
        return f"skipped_images {checkpoint['skipped_images']!r} is not a count"
    for key in ("val_accuracy", "best_val_accuracy"):
        value = checkpoint[key]
        if value is not None and not (is_number(value) and 0 <= value <= 1):
            return f"{key} {value!r} is not an accuracy"
    engine = checkpoint["engine"]
    if not is_state(engine.get("model")):
        return "engine.model is not a model's state_dict"
    optimizer = engine.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) or \
            not isinstance(optimizer.get("param_groups"), list) or \
            not all(isinstance(group, dict) and isinstance(group.get("params"), list)
                    for group in optimizer["param_groups"]):
        return "engine.optimizer is not an optimiser's state_dict"
    average = checkpoint["weight_average"]
    if average is not None and not (isinstance(average, dict) and is_state(average.get("model"))
                                    and is_count(average.get("updates"))):
        return "weight_average is not a weight average's state"
    if checkpoint.get("val_weights", "model") not in ("model", "weight_average"):
        return f"val_weights {checkpoint['val_weights']!r} is not model or weight_average"
    if checkpoint.get("val_weights") == "weight_average" and not (average and average["updates"]):
        return "val_weights is weight_average, but it holds no weight average"
    if not isinstance(checkpoint.get("validation_due", False), bool):
        return f"validation_due {checkpoint['validation_due']!r} is not true or false"
    for key in ("num_classes", "in_channels"):
        if checkpoint.get(key) is not None and not is_count(checkpoint[key], least=1):
            return f"{key} {checkpoint[key]!r} is not a positive count"
    if (checkpoint.get("num_classes") is None) != (checkpoint.get("in_channels") is None):
        return "num_classes and in_channels go together"
    totals = checkpoint.get("totals")
    if totals is not None and not (isinstance(totals, dict) and all(
            is_number(totals.get(key)) and totals[key] >= 0
            for key in ("train_seconds", "wall_seconds")) and is_count(totals.get("train_images"))):
        return f"totals {totals!r} are not seconds and images"
    problem = config_problem(checkpoint["config"])
    if problem:
        return problem
    generator = checkpoint["rng"].get("torch")
    expected = torch.get_rng_state()
    if not isinstance(generator, torch.Tensor) or generator.dtype != expected.dtype \
            or generator.shape != expected.shape:
        return "rng holds no CPU generator state of this torch"
    return None


def find_resume(config, passed_over=None):
    """The checkpoint to resume from, or None to start afresh.

    resume: null (start afresh), 'auto' (checkpoint_last.pt of --output-dir, or the newest
    checkpoint_last.pt of the runs/CONFIG-* folders that this run can continue: one of
    another network (a --model or --norm override) or a damaged one is passed over, its
    reason appended to `passed_over`; None if there is none), a run folder or a checkpoint
    file. A run folder whose run stopped before its first checkpoint gives None: the run
    starts afresh there.
    """
    resume = config["resume"]
    if resume is None:
        return None
    if resume == "auto":
        if config["output_dir"] is not None:
            path = RunFolder(config["output_dir"]).last
            return path if os.path.isfile(path) else None
        candidates = [folder.last for folder in RunFolder.of_config(run_name(config))
                      if os.path.isfile(folder.last)]
        for path in sorted(candidates, key=os.path.getmtime, reverse=True):
            try:
                check_compatible(load(path, mmap=True), config, path)
            except CheckpointError as error:
                if passed_over is not None:
                    passed_over.append(str(error))
                continue
            return path
        return None
    path = RunFolder.checkpoint_of(resume)
    if os.path.isdir(resume) and RunFolder(resume).holds_unfinished_start():
        return None
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {resume}: no checkpoint at {path}")
    return path


def check_compatible(checkpoint, config, path):
    """CheckpointError unless the checkpoint's network is this run's; returns the other
    settings that changed what the run computes (resuming with them is allowed, but is no
    longer exact)."""
    saved = checkpoint["config"]
    differ = [key for key in with_role("model") if saved.get(key) != config[key]
              and (key != "synthetic_num_classes" or config["data"] == "synthetic")]
    if differ:
        described = ", ".join(f"{key} {show(saved.get(key))} (this run: {show(config[key])})"
                              for key in differ)
        raise CheckpointError(f"{path} is from another model: {described}")
    # bookkeeping options change nothing computed (epochs changes the maths only where it
    # changes the learning-rate schedule: train.loop checks that)
    return [key for key in with_role("compute") if saved.get(key) != config[key]]


def load_state(target, state, path):
    """target.load_state_dict(state), with a mismatch reported as one line."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} does not fit this model: {error_line(error)}") from None


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
