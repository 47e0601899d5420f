"""Load a trained model, and `python -m train.evaluate CHECKPOINT_OR_RUN_DIR`.

In Python, the one way to get a trained network back:

    from train.evaluate import load_model
    model, info = load_model("runs/digits_resnet_group_pn-20261201-120000")
    logits = model(images)          # eval mode, on the CPU
    info["val_accuracy"], info["weights"], info["config"]["norm"]

A run folder means its checkpoint_last.pt (the run's last weights); any checkpoint file
works too. With weight averaging on, a run validates, and records the accuracy of, the
averaged weights: `weights="validated"` (the default) gives the weights the checkpoint's
accuracy belongs to, "model" the trained ones, "weight_average" the average.

From the command line: top-1 and top-5 accuracy and the loss of those weights on the
checkpoint's validation set (`--data-path` where the data lives now).
"""
import argparse
import sys
from types import SimpleNamespace
from typing import Tuple, Union

import torch

from train import checkpoint
from train.checkpoint import CheckpointError
from train.files import RunFolder

WEIGHTS = ("validated", "model", "weight_average")


def network_shape(state):
    """(in_channels, num_classes) of a classifier's state dict: the first convolution's input
    channels and the last linear layer's outputs (checkpoints record both since they record
    val_weights; older ones are read this way)."""
    convolutions = [t for t in state.values() if t.dim() == 4]
    linears = [t for t in state.values() if t.dim() == 2]
    if not convolutions or not linears:
        raise CheckpointError("cannot tell the network's input channels and classes from "
                              "its weights")
    return convolutions[0].shape[1], linears[-1].shape[0]


def load_model(path: str, weights: str = "validated",
               device: Union[str, torch.device] = "cpu") -> Tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, info) from a checkpoint file or a run folder.

    info: "path", "config" (the run's resolved config), "step", "weights" (which were
    loaded), "val_accuracy" and "best_val_accuracy" (None unless `weights` are the
    validated ones, whose accuracy they are). CheckpointError (one line) for a file that is
    not a checkpoint of this application or does not fit its model.
    """
    from train.build import build_model
    from train.config import ConfigError

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    path = RunFolder.checkpoint_of(path)
    saved = checkpoint.load(path)
    validated = saved["val_weights"]
    which = validated if weights == "validated" else weights
    if which == "weight_average":
        if not saved["weight_average"]:
            raise CheckpointError(f"{path} holds no weight average (weight_avg_decay 0)")
        state = saved["weight_average"]["model"]
    else:
        state = saved["engine"]["model"]
    in_channels, num_classes = (saved["in_channels"], saved["num_classes"]) \
        if saved["num_classes"] is not None else network_shape(state)
    config = {**saved["config"], "replicas": 1}  # one sample at a time is fine for eval
    try:
        model = build_model(config, SimpleNamespace(num_classes=num_classes,
                                                    in_channels=in_channels))
    except ConfigError as error:  # a model this version does not have
        raise CheckpointError(f"{path}: {error}") from None
    checkpoint.load_state(model, state, path)
    accurate = which == validated
    info = {"path": path, "config": saved["config"], "step": saved["step"], "weights": which,
            "val_accuracy": saved["val_accuracy"] if accurate else None,
            "best_val_accuracy": saved["best_val_accuracy"] if accurate else None}
    return model.to(device).eval(), info


@torch.no_grad()
def evaluate(model, config, data_path=None, batch_size=256, device="cpu", num_workers=0):
    """{"top1", "top5", "loss", "images"} of the model on the config's validation set."""
    from datasets.pipeline import make_loader
    from train.build import load_data

    # every validation image counts: a corrupt one is an error here, never replaced
    data = load_data({**config, "data_path": data_path or config["data_path"],
                      "skip_corrupt_images": False})
    loader = make_loader(data.val, batch_size, [(0, i) for i in range(len(data.val))],
                         num_workers, False, config["seed"])
    top1 = top5 = loss = seen = 0
    for images, targets, _ in loader:
        logits = model(images.to(device)).float()
        targets = targets.to(device)
        loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (ranked[:, 0] == targets).sum().item()
        top5 += (ranked == targets[:, None]).any(dim=1).sum().item()
        seen += len(targets)
    return {"top1": top1 / seen, "top5": top5 / seen, "loss": loss / seen, "images": seen}


class ArgumentParser(argparse.ArgumentParser):
    """A bad argument is one line, `error: ...`, and exit status 2 (argparse adds a usage
    block)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def count(least):
    """An argparse type: an integer of at least `least`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


def device(text):
    """An argparse type: cpu, or cuda[:N] on a machine with that GPU."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device: cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA GPU here; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    return parsed


def build_parser():
    parser = ArgumentParser(
        prog="python -m train.evaluate",
        description="Top-1/top-5 accuracy and loss of a trained checkpoint on its "
                    "validation set.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR",
                        help="a checkpoint file, or a run folder (its checkpoint_last.pt)")
    parser.add_argument("--data-path", metavar="PATH",
                        help="where the dataset is now (default: the run's data_path)")
    parser.add_argument("--weights", choices=WEIGHTS, default="validated",
                        help="validated: those the run's accuracy belongs to (the weight "
                             "average once it has an update, else the model); model: the "
                             "trained weights; weight_average: the average (default: "
                             "validated)")
    parser.add_argument("--batch-size", type=count(1), default=256, metavar="N",
                        help="images per forward pass (default: 256)")
    parser.add_argument("--device", type=device, default="cpu",
                        help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--num-workers", type=count(0), default=0, metavar="N",
                        help="data loading processes; 0 loads in this one (default: 0)")
    return parser


def main(argv=None):
    from datasets import DataError, error_line
    from train.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        model, info = load_model(args.checkpoint, args.weights, args.device)
        result = evaluate(model, info["config"], args.data_path, args.batch_size, args.device,
                          args.num_workers)
    except (CheckpointError, ConfigError, DataError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    config = info["config"]
    print(f"{info['path']} (step {info['step']}, {info['weights']} weights): {config['model']} "
          f"with {config['norm']} on {config['data']}, {result['images']} validation images: "
          f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, loss {result['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
