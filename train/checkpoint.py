"""Checkpoints: plain dicts, written atomically, read with torch.load(weights_only=True).

A checkpoint holds everything a run needs to continue exactly: the resolved config, the
optimiser step, the engine's state (model and optimiser), the weight average, the random
number generators' states and the best validation accuracy so far. The sample order needs
no state: it is a function of (seed, epoch), and the step says where in the epoch to start.
"""
import glob
import os

import torch

from train.config import MODEL_KEYS, OPTIONS, run_name, show
from train.files import write_atomically

FORMAT = "proxy-norm-train/1"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or from another model: printed as one line."""


def save(path, checkpoint):
    """Written whole or not at all (train.files.write_atomically): a crash never leaves half
    a checkpoint, and a full disk leaves the previous one as it was."""
    write_atomically(path, lambda f: torch.save(checkpoint, f), binary=True)


def load(path, mmap=False):
    """The checkpoint's dict, checked to hold what a resumed run reads; CheckpointError (one
    line) otherwise. mmap: leave the tensors on disk (to read a few numbers of a large one)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # pickle, zip and weights_only errors differ by torch version
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this training application")
    problem = malformed(checkpoint)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}")
    return checkpoint


def malformed(checkpoint):
    """What a checkpoint of the right format lacks or holds wrongly (None if nothing)."""
    def number(value, kind=(int, float)):
        return isinstance(value, kind) and not isinstance(value, bool)

    for key, kind in (("config", dict), ("engine", dict), ("rng", dict)):
        if not isinstance(checkpoint.get(key), kind):
            return f"no {key}"
    step = checkpoint.get("step")
    if not number(step, int) or step < 0:
        return f"step {step!r} is not a step number"
    if not number(checkpoint.get("skipped_images", 0), int):
        return "skipped_images is not a count"
    for key in ("val_accuracy", "best_val_accuracy"):
        value = checkpoint.get(key)
        if value is not None and not (number(value) and 0 <= value <= 1):
            return f"{key} {value!r} is not an accuracy"
    if checkpoint.get("weight_average") is not None and \
            not isinstance(checkpoint["weight_average"], dict):
        return "weight_average is not a state"
    generator = checkpoint["rng"].get("torch")
    expected = torch.get_rng_state()
    if not isinstance(generator, torch.Tensor) or generator.dtype != expected.dtype \
            or generator.shape != expected.shape:
        return "rng holds no CPU generator state of this torch"
    return None


def find_resume(config):
    """The checkpoint to resume from, or None to start afresh.

    resume: null (start afresh), 'auto' (checkpoint_last.pt of --output-dir, or of the
    runs/CONFIG-* folder whose checkpoint was written last; None if there is none), a run
    folder or a checkpoint file.
    """
    resume = config["resume"]
    if resume is None:
        return None
    if resume == "auto":
        if config["output_dir"] is not None:
            candidates = [os.path.join(config["output_dir"], LAST)]
        else:
            pattern = os.path.join("runs", f"{glob.escape(run_name(config))}-*", LAST)
            candidates = glob.glob(pattern)
        candidates = [path for path in candidates if os.path.isfile(path)]
        return max(candidates, key=os.path.getmtime) if candidates else None
    path = os.path.join(resume, LAST) if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {resume}: no checkpoint at {path}")
    return path


# Options that say where a run writes, how often it reports or how it is run, but not what
# it computes: resuming with other values is still an exact continuation. (epochs changes
# the maths only where it changes the learning-rate schedule: train.loop checks that.)
BOOKKEEPING = {"config", "output_dir", "resume", "epochs", "max_steps", "validation",
               "checkpoint_every", "log_every", "wandb_mode", "wandb_project", "data_path",
               "num_workers", "skip_corrupt_images", "cpu_threads", "executable_cache_dir",
               "compile_only", "device_memory_mb", "collective_timeout", "compile"}


def check_compatible(checkpoint, config, path):
    """CheckpointError unless the checkpoint's network is this run's; returns the other
    settings that changed what the run computes (resuming with them is allowed, but is no
    longer exact)."""
    saved = checkpoint["config"]
    differ = [key for key in MODEL_KEYS if saved.get(key) != config[key]
              and (key != "synthetic_num_classes" or config["data"] == "synthetic")]
    if differ:
        described = ", ".join(f"{key} {show(saved.get(key))} (this run: {show(config[key])})"
                              for key in differ)
        raise CheckpointError(f"{path} is from another model: {described}")
    ignore = set(MODEL_KEYS) | BOOKKEEPING
    return [key for key in OPTIONS if key not in ignore and saved.get(key) != config[key]]


def load_state(target, state, path):
    """target.load_state_dict(state), with a mismatch reported as one line."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit this model: {first}") from None


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
