"""Channel-wise collapse at initialisation against depth, with the residual branches zeroed
(as trained) and not.

    python -m analysis.init_collapse [--models cifar_preact_resnet20 ...] [--norms group
        group_pn batch] [--seeds 0 1 2] [--output JSON] [--no-readme]

The depth sweep of docs/evidence.md records each run's collapse at initialisation, but its
networks zero their residual branches' last convolution (`zero_init_residual`): at step 0
every block is the identity, so collapse has nothing to compound through. This measures the
same share of the same networks as they start with the branches zeroed (the study's) and
with them kept at their He-normal draw. For each model, norm and seed: the network
train.loop builds for the cluttered-digits config of that norm
(`cluttered_digits_preact_resnet20_NORM`, `model` overridden; torch seeded with the seed
before the data and the model, so the zeroed one is the study's run's model at step 0), and
the accuracy study's measurement of it (`benchmarks.accuracy.collapse_shares`:
analysis.power's channel_squared_mean share of every pre-activation over the first 256
validation canvases, in batches of 64): eval mode for the batch-independent norms, as the
study; BatchNorm in train mode with statistics per replica micro-batch of 8, as in training
(in eval mode at initialisation it would apply its unit running statistics).

Writes analysis/results/init_collapse.json and the table between the `init_collapse` markers
of docs/evidence.md. One thread: it is meant to run beside a study.
"""
import argparse
import os
import shlex
import sys

import torch

from analysis.power import RESULTS
from benchmarks.accuracy import COLLAPSE_IMAGES, EVIDENCE, collapse_shares
from benchmarks.measure import write_json
from benchmarks.readme import markdown_table, replace_section
from proxynorm.norms import norm_kind

MODELS = ("cifar_preact_resnet20", "cifar_preact_resnet56", "cifar_preact_resnet110")
FAMILY = "cluttered_digits_preact_resnet20"


def build(model, norm, seed, zero_init_residual):
    """(network as train.loop builds it for the family's NORM config, its first validation
    canvases), the residual branches zeroed or not."""
    from analysis.checkpoint import first_validation_images
    from train.build import build_model, load_data, resolve_config

    config = resolve_config(f"{FAMILY}_{norm}", {"model": model, "seed": seed})
    torch.manual_seed(seed)  # then the data and the model, in train.loop's order
    data = load_data(config)
    network = build_model(config, data, zero_init_residual=zero_init_residual)
    return network, first_validation_images(data, COLLAPSE_IMAGES)


def measure(model, norm, seed, zero_init_residual):
    network, images = build(model, norm, seed, zero_init_residual)
    names, shares = collapse_shares(network, images, train=norm_kind(norm).batch_statistics)
    return {"model": model, "norm": norm, "seed": seed,
            "zero_init_residual": zero_init_residual, "images": len(images),
            "layers": names, "shares": shares["layers"], "mean": shares["mean"],
            "deepest": shares["deepest"]}


def spread(values):
    """Mean over the seeds, and their range (3 significant digits: BatchNorm's are rounding
    errors, and show as such)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:#.3g}"
    return f"{mean:#.3g} ({min(values):#.3g} to {max(values):#.3g})"


def table(report):
    rows = []
    groups = {}
    for row in report["rows"]:
        groups.setdefault((row["model"], row["norm"]), {}).setdefault(
            row["zero_init_residual"], []).append(row)
    for (model, norm), by_zeroing in groups.items():
        cells = [spread([row[statistic] for row in by_zeroing.get(zeroed, [])])
                 if by_zeroing.get(zeroed) else "–"
                 for statistic in ("mean", "deepest") for zeroed in (True, False)]
        rows.append([f"`{model}`", f"`{norm}`", *cells])
    header = ["model", "norm", "mean over layers, branches zeroed (as trained)",
              "mean over layers, branches not zeroed", "deepest layer, zeroed",
              "deepest layer, not zeroed"]
    setting = report["setting"]
    note = (f"Collapse share at initialisation (analysis.power's channel_squared_mean share "
            f"of each pre-activation's power, first {setting['images']} validation canvases): "
            f"mean over the seeds ({', '.join(map(str, setting['seeds']))}) and their range. "
            f"Batch-independent norms in eval mode, BatchNorm in train mode with statistics "
            f"per replica micro-batch of 8. `{setting['command']}`.")
    return markdown_table(header, rows) + "\n\n" + note


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--norms", nargs="+", default=["group", "group_pn", "batch"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default=os.path.join(RESULTS, "init_collapse.json"))
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite docs/evidence.md's table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for model in args.models:
        for norm in args.norms:
            for seed in args.seeds:
                for zeroed in (True, False):
                    rows.append(measure(model, norm, seed, zeroed))
                    print(f"{model} {norm} seed {seed} zero_init_residual {zeroed}: mean "
                          f"{rows[-1]['mean']:.4f}, deepest {rows[-1]['deepest']:.4f}",
                          flush=True)
    shown = [arg for arg in argv if arg != "--no-readme"]
    report = {"setting": {"images": rows[0]["images"], "seeds": args.seeds,
                          "command": " ".join(["python -m analysis.init_collapse",
                                               *map(shlex.quote, shown)])},
              "rows": rows}
    write_json(args.output, report, significant=5)
    text = table(report)
    print(text)
    if not args.no_readme:
        replace_section("init_collapse", text, EVIDENCE)


if __name__ == "__main__":
    main()
