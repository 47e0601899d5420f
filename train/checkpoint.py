"""Checkpoints: plain dicts, written atomically, read with torch.load(weights_only=True).

A checkpoint holds everything a run needs to continue exactly: the resolved config, the
optimiser step, the engine's state (model and optimiser), the weight average, the random
number generators' states and the best validation accuracy so far. The sample order needs
no state: it is a function of (seed, epoch), and the step says where in the epoch to start.
"""
import glob
import os

import torch

from train.config import MODEL_KEYS, OPTIONS, show

FORMAT = "proxy-norm-train/1"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or from another model: printed as one line."""


def save(path, checkpoint):
    """Write to a temporary name, then rename: a crash never leaves half a checkpoint."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors differ by torch version
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this training application")
    return checkpoint


def find_resume(config):
    """The checkpoint to resume from, or None to start afresh.

    resume: null (start afresh), 'auto' (checkpoint_last.pt of --output-dir, or of the
    newest runs/CONFIG-* folder that has one; None if there is none), a run folder or a
    checkpoint file.
    """
    resume = config["resume"]
    if resume is None:
        return None
    if resume == "auto":
        if config["output_dir"] is not None:
            candidates = [os.path.join(config["output_dir"], LAST)]
        else:
            candidates = sorted(glob.glob(os.path.join("runs", f"{glob.escape(config['config'])}-*",
                                                       LAST)), reverse=True)
        return next((path for path in candidates if os.path.isfile(path)), None)
    path = os.path.join(resume, LAST) if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {resume}: no checkpoint at {path}")
    return path


def check_compatible(checkpoint, config, path):
    """CheckpointError unless the checkpoint's network is this run's; returns the other
    settings that changed (resuming with them is allowed, but is no longer exact)."""
    saved = checkpoint["config"]
    differ = [key for key in MODEL_KEYS if saved.get(key) != config[key]
              and (key != "synthetic_num_classes" or config["data"] == "synthetic")]
    if differ:
        described = ", ".join(f"{key} {show(saved.get(key))} (this run: {show(config[key])})"
                              for key in differ)
        raise CheckpointError(f"{path} is from another model: {described}")
    ignore = set(MODEL_KEYS) | {"resume", "output_dir", "config", "epochs", "max_steps"}
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
