"""Batch-dependence probe: how much a sample's output moves when its batch mates change.

    python -m analysis.batch_dependence [--model cifar_resnet20] [--norms ...] [--batch-size 8]
    python -m analysis.batch_dependence --checkpoint PATH

For each norm, one probe sample is put first in `trials + 1` batches that differ in every
other sample; the dependence is the largest absolute change of the probe's output (its
logits) over those batches, divided by the largest absolute logit of the first batch's
output. It is measured in train mode (BatchNorm on batch statistics) and in eval mode
(running statistics). Dropout and stochastic depth stay off in both, so only
normalisation statistics can couple samples. A name + norm model is freshly initialised
and fed Gaussian inputs; a checkpoint's model gets its validation images. Prints a table
and writes analysis/results/batch_dependence[_MODEL_NORM].json.
"""
import argparse
import os

import torch
from torch import nn

from analysis import checkpoint
from analysis.power import RESULTS
from benchmarks.measure import write_json
from models import get_model
from models.layers import DropPath
from proxynorm.norms import BATCH_INDEPENDENT, NORMS


def set_mode(model, train):
    """Norms in train or eval mode; dropout and stochastic depth always off."""
    model.train(train)
    for module in model.modules():
        if isinstance(module, (nn.modules.dropout._DropoutNd, DropPath)):
            module.eval()
    return model


def batch_dependence(model, probe, mates, batch_size):
    """Largest change of the probe's output over batches [probe, mates...] that differ in
    their mates, relative to the largest absolute value of its first output.

    probe: one sample (1, C, H, W); mates: at least 2 * (batch_size - 1) other samples,
    consumed batch_size - 1 at a time. Runs under no_grad in the model's current mode.
    """
    batches = [batch for batch in mates.split(batch_size - 1) if len(batch) == batch_size - 1]
    if len(batches) < 2:
        raise ValueError(f"need at least {2 * (batch_size - 1)} batch mates, got {len(mates)}")
    with torch.no_grad():
        outputs = [model(torch.cat([probe, batch]))[0] for batch in batches]
    change = max((out - outputs[0]).abs().max().item() for out in outputs[1:])
    return change / outputs[0].abs().max().item()


def probe_model(model, inputs, batch_size):
    """{"train": ..., "eval": ...} for a model and inputs (probe first, then mates)."""
    return {mode: batch_dependence(set_mode(model, mode == "train"), inputs[:1], inputs[1:],
                                   batch_size)
            for mode in ("train", "eval")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a training checkpoint, instead of --model/--norms")
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    parser.add_argument("--resolution", type=int, default=32, help="input side (name + norm)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--trials", type=int, default=3, help="batches of new mates compared "
                        "with the first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="output JSON (default analysis/results/"
                        "batch_dependence.json, or batch_dependence_MODEL_NORM.json)")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (a sample and a mate)")
    torch.set_num_threads(args.threads)
    count = 1 + (args.trials + 1) * (args.batch_size - 1)

    results = {}
    if args.checkpoint:
        try:
            model, config = checkpoint.load(args.checkpoint)
            inputs = checkpoint.validation_images(config, count)
        except checkpoint.CheckpointError as error:
            raise SystemExit(f"analysis.batch_dependence: {error}")
        if len(inputs) < 1 + 2 * (args.batch_size - 1):
            raise SystemExit(f"analysis.batch_dependence: {args.checkpoint}: only "
                             f"{len(inputs)} validation images; lower --batch-size")
        results[config["norm"]] = probe_model(model, inputs, args.batch_size)
        setting = {"checkpoint": args.checkpoint, "config": config}
        default_json = f"batch_dependence_{config['model']}_{config['norm']}.json"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        inputs = torch.randn(count, 3, args.resolution, args.resolution, generator=generator)
        for norm in args.norms:
            torch.manual_seed(args.seed)
            model = get_model(args.model, norm=norm, num_classes=10)
            results[norm] = probe_model(model, inputs, args.batch_size)
        setting = {"model": args.model, "resolution": args.resolution, "inputs": "gaussian",
                   "initialisation": "fresh", "seed": args.seed}
    setting.update(batch_size=args.batch_size, trials=args.trials)
    json_path = args.json or os.path.join(RESULTS, default_json if args.checkpoint
                                          else "batch_dependence.json")
    write_json(json_path, {"setting": setting, "relative_change": results}, significant=5)

    print(f"{'norm':12} {'train':>10} {'eval':>10}  batch-independent by design")
    for norm, modes in results.items():
        print(f"{norm:12} {modes['train']:10.2e} {modes['eval']:10.2e}  "
              f"{'yes' if norm in BATCH_INDEPENDENT else 'no'}")
    print(f"largest change of a sample's logits when its {args.batch_size - 1} batch mates "
          f"change, / its largest |logit|; wrote {os.path.relpath(json_path)}")


if __name__ == "__main__":
    main()
