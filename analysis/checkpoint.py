"""A trained model and its validation images, from a training checkpoint, for the analyses.

A checkpoint of the training application (one with its "format") is loaded by
train.evaluate.load_model, the one loader of the application's checkpoints (schema
checked, older formats read, the validated weights). Any other checkpoint is a plain dict
read with torch.load(weights_only=True) holding
  "config": the run's config, with at least "model" and "norm" (and, when the run set
            them, "groups", "act", "group_dim", "expand_ratio", "data", "data_path",
            "image_size"), and
  the model's state_dict: under "model", or under "engine" -> "model".
Its number of classes and input channels come from the state_dict itself (the
classifier's and the first convolution's weights), so no dataset is needed to rebuild
the network. Errors are train.checkpoint.CheckpointError, one line.
"""
import re

import torch

from datasets import error_line
from models import get_model
from train.checkpoint import CheckpointError, unreadable
from train.evaluate import load_model

# config keys that are get_model family options
MODEL_OPTIONS = ("group_dim", "expand_ratio")
# config keys that are get_dataset options
DATA_OPTIONS = ("data_path", "image_size", "synthetic_samples", "synthetic_num_classes")


def load(path):
    """(model in eval mode, config) from the checkpoint at `path`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing file, pickle, zip and weights_only errors differ
        raise CheckpointError(f"cannot read checkpoint {path}: {unreadable(error)}") from None
    if isinstance(checkpoint, dict) and "format" in checkpoint:  # the training application's
        model, info = load_model(path)
        return model, info["config"]
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or not {"model", "norm"} <= set(config):
        raise CheckpointError(f"{path}: no 'config' dict with 'model' and 'norm' keys")
    state = checkpoint.get("model")
    if state is None and isinstance(checkpoint.get("engine"), dict):
        state = checkpoint["engine"].get("model")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: no model state_dict under 'model' or 'engine'/'model'")
    # DistributedDataParallel and torch.compile wrappers prefix every name
    state = {re.sub(r"^(module\.)?(_orig_mod\.)?", "", name): value
             for name, value in state.items()}
    weights = [v for k, v in state.items() if k.endswith("weight")]
    first_conv = next((w for w in weights if w.dim() == 4), None)
    classifier = next((w for w in reversed(weights) if w.dim() == 2), None)
    if first_conv is None or classifier is None:
        raise CheckpointError(f"{path}: the state_dict has no convolution or no classifier")
    options = {key: config[key] for key in MODEL_OPTIONS if config.get(key) is not None}
    try:
        model = get_model(config["model"], norm=config["norm"], num_classes=classifier.shape[0],
                          groups=config.get("groups"), act=config.get("act"),
                          in_channels=first_conv.shape[1], **options)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {config['model']} with norm {config['norm']}: "
                              f"{error_line(error)}") from None
    return model.eval(), config


def validation_images(config, count):
    """The first `count` validation images of the checkpoint's dataset, as the training
    application serves them (its validation transform), stacked into one tensor."""
    from datasets import DataError, get_dataset  # only checkpoint runs need the datasets

    try:
        data = get_dataset(config.get("data", "digits"),
                           **{key: config[key] for key in DATA_OPTIONS if key in config})
    except DataError as error:
        raise CheckpointError(str(error)) from None
    return first_validation_images(data, count)


def first_validation_images(data, count):
    """The first `count` images (or all, if fewer) of a dataset's validation side, with its
    validation transform, stacked into one tensor."""
    count = min(count, len(data.val))
    return torch.stack([data.val[(0, index)][0] for index in range(count)])
