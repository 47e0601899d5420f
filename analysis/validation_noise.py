"""How much of the cluttered-digits study's spread is its validation set's size.

    python -m analysis.validation_noise CHECKPOINT [CHECKPOINT ...] [--canvases 40000]
        [--output JSON] [--no-readme]

The study validates on 2,000 canvases of 360 validation digits: one canvas is 0.05 points.
This evaluates trained networks (the accuracy study's `--keep-checkpoints`) on `--canvases`
new canvases of the same validation digits (datasets.cluttered_digits.more_validation,
normalised as the run's validation set), and splits the noise:

- **Canvases.** Given the 360 digits, canvases are independent draws, so an accuracy over
  N of them has the binomial standard error sqrt(p (1 - p) / N); more canvases cut it
  without limit.
- **Digits.** A new set of 360 digits (other writers) would move every accuracy by the
  digits' own spread: per-digit accuracies a_d over many canvases each have a between-digit
  variance s_b^2 (their variance less the binomial part, mean a_d (1 - a_d) / (n_d - 1)),
  and s_b / sqrt(360) is the floor that no number of canvases of these digits lowers.
- **Seeds.** For two seeds of one recipe (the checkpoints' configs equal but for the seed)
  each canvas where exactly one is right adds to their difference: with v the variance of
  the per-canvas difference over the fresh canvases, v / (2 N) of each run's variance over
  seeds is the canvas draw at N canvases. What is left, the std over seeds less that part,
  is training noise, which more canvases do not remove; the table predicts the std over
  seeds at 2,000 canvases, 10,000 and without limit.

Writes analysis/results/validation_noise.json and the tables between the
`validation_noise` markers of docs/evidence.md. One thread: it is meant to run beside a study.
"""
import argparse
import itertools
import json
import math
import os
import shlex
import sys

import torch

from analysis.power import RESULTS
from benchmarks.accuracy import EVIDENCE
from benchmarks.measure import write_json
from benchmarks.readme import markdown_table, replace_section

CHUNK = 5000  # canvases built and evaluated at a time (memory)
SIZES = (2000, 10000)  # validation sizes the seed table predicts for, then without limit


class NoiseError(Exception):
    """A checkpoint this analysis cannot use: one line, exit status 2."""


def load(path):
    """(model, info, knobs) of a cluttered-digits checkpoint."""
    from datasets import cluttered_digits
    from train.checkpoint import CheckpointError
    from train.evaluate import load_model

    try:
        model, info = load_model(path)
    except CheckpointError as error:
        raise NoiseError(str(error)) from None
    config = info["config"]
    if config["data"] != "cluttered_digits":
        raise NoiseError(f"{path}: a {config['data']} run; this analysis is for "
                         f"cluttered_digits")
    knobs = cluttered_digits.knobs(config["image_size"], **cluttered_digits.options_of(config))
    return model, info, knobs


def correct(model, images, labels, normalise, batch_size=500):
    """Whether the model's top-1 class is each canvas's label (bool, one per canvas)."""
    hits = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(normalise(images[start:start + batch_size]))
            hits.append(logits.argmax(dim=1) == labels[start:start + batch_size])
    return torch.cat(hits)


def measure(model, knobs, canvases):
    """(hits on the run's own validation set, hits on `canvases` fresh canvases, the digit of
    each fresh canvas, the number of validation digits), the fresh ones built CHUNK at a
    time, each chunk its own stream."""
    from datasets import cluttered_digits

    source = cluttered_digits.load(knobs)
    own = correct(model, source.val.images, source.val.labels, source.val_transform)
    hits, digits = [], []
    for stream, start in enumerate(range(0, canvases, CHUNK)):
        images, labels, which = cluttered_digits.more_validation(
            knobs, min(CHUNK, canvases - start), stream)
        hits.append(correct(model, images, labels, source.val_transform))
        digits.append(which)
    return own, torch.cat(hits), torch.cat(digits), len(cluttered_digits.sides(knobs)[3])


def digit_spread(hits, digits):
    """Between-digit std of the per-digit accuracy, over the digits shown twice or more: their
    variance less the binomial part each carries from its finitely many canvases."""
    count = torch.bincount(digits).double()
    right = torch.bincount(digits, weights=hits.double())
    seen = count >= 2
    accuracy = right[seen] / count[seen]
    binomial = (accuracy * (1 - accuracy) / (count[seen] - 1)).mean()
    return math.sqrt(max(0.0, accuracy.var().item() - binomial.item()))


def recipe(config):
    """The config without its seed and bookkeeping: runs of one recipe share it."""
    from train.config import with_role

    skip = {"seed", *with_role("bookkeeping")}
    return json.dumps({key: value for key, value in config.items() if key not in skip},
                      sort_keys=True, default=str)


def analyse(runs):
    """The report of measured runs: per run, the accuracies and their noise; per recipe with
    two seeds or more, the spread over seeds and its canvas part."""
    rows = []
    for run in runs:
        hits = run["hits"].double()
        p = hits.mean().item()
        digits, between = run["digit_count"], digit_spread(run["hits"], run["digits"])
        rows.append({"checkpoint": run["path"], "norm": run["config"]["norm"],
                     "model": run["config"]["model"], "epochs": run["config"]["epochs"],
                     "seed": run["config"]["seed"], "recorded": run["recorded"],
                     "own": run["own"].double().mean().item(), "own_canvases": len(run["own"]),
                     "fresh": p, "canvases": len(hits),
                     "binomial_2000": math.sqrt(p * (1 - p) / 2000),
                     "digits": digits, "between_digits": between,
                     "digit_floor": between / math.sqrt(digits)})
    recipes = {}
    for run, row in zip(runs, rows):
        recipes.setdefault(recipe(run["config"]), []).append((run, row))
    seeds = []
    for members in recipes.values():
        if len(members) < 2:
            continue
        pairs = [(a["hits"].double() - b["hits"].double()).var().item()
                 for (a, _), (b, _) in itertools.combinations(members, 2)]
        per_canvas = sum(pairs) / len(pairs) / 2  # one run's variance from one canvas
        own = torch.tensor([row["own"] for _, row in members], dtype=torch.float64)
        fresh = torch.tensor([row["fresh"] for _, row in members], dtype=torch.float64)
        canvases = members[0][1]["canvases"]
        training = max(0.0, fresh.var().item() - per_canvas / canvases)
        first = members[0][1]
        seeds.append({"norm": first["norm"], "model": first["model"], "epochs": first["epochs"],
                      "seeds": sorted(row["seed"] for _, row in members),
                      "std_own": own.std().item(), "std_fresh": fresh.std().item(),
                      "per_canvas": per_canvas, "training_std": math.sqrt(training),
                      "predicted": {str(size): math.sqrt(training + per_canvas / size)
                                    for size in SIZES}})
    return {"runs": rows, "recipes": seeds}


def points(value):
    return f"{100 * value:.2f}"


def recorded(row):  # None where the weights loaded are not the ones the run validated
    return "n/a" if row["recorded"] is None else points(row["recorded"])


def tables(report):
    canvases = report["runs"][0]["canvases"]
    runs = markdown_table(
        ["run", "on its validation set (recorded)", f"on {canvases:,} fresh canvases",
         "binomial SE at 2,000", "between-digit std", "digits' floor (SE)"],
        [[f"`{row['norm']}` {row['model']}, {row['epochs']} epochs, seed {row['seed']}",
          f"{points(row['own'])} ({recorded(row)})", points(row["fresh"]),
          points(row["binomial_2000"]), points(row["between_digits"]),
          points(row["digit_floor"])] for row in report["runs"]])
    text = (f"Accuracy (points) of each network on its run's validation set and on "
            f"{canvases:,} fresh canvases of the same {report['runs'][0]['digits']} "
            f"validation digits; the standard error (points) of one accuracy over 2,000 "
            f"canvases of these digits, the spread of the per-digit accuracies, and the "
            f"standard error that the digits themselves set, however many canvases:\n\n{runs}")
    if report["recipes"]:
        seeds = markdown_table(
            ["recipe", "seeds", "std over seeds: on the 2,000", f"on {canvases:,}",
             "training noise", *[f"predicted at {size:,}" for size in SIZES]],
            [[f"`{row['norm']}` {row['model']}, {row['epochs']} epochs",
              ", ".join(map(str, row["seeds"])), points(row["std_own"]),
              points(row["std_fresh"]), points(row["training_std"]),
              *[points(row["predicted"][str(size)]) for size in SIZES]]
             for row in report["recipes"]])
        text += ("\n\nStandard deviation (points, n - 1) over the seeds of one recipe: as "
                 "measured on the 2,000 validation canvases and on the fresh ones; the part "
                 "that is training noise (without the canvas draw); and as predicted for a "
                 f"validation set of each size:\n\n{seeds}")
    return f"{text}\n\n`{report['command']}`"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="cluttered-digits checkpoints or run folders")
    parser.add_argument("--canvases", type=int, default=40000,
                        help="fresh validation canvases per network (default 40000)")
    parser.add_argument("--output", default=os.path.join(RESULTS, "validation_noise.json"))
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite docs/evidence.md's tables")
    args = parser.parse_args(argv)
    if args.canvases < 2:
        parser.error("--canvases must be >= 2")
    torch.set_num_threads(1)
    runs = []
    try:
        for path in args.checkpoints:
            model, info, knobs = load(path)
            own, hits, digits, digit_count = measure(model, knobs, args.canvases)
            runs.append({"path": path, "config": info["config"],
                         "recorded": info["val_accuracy"], "own": own, "hits": hits,
                         "digits": digits, "digit_count": digit_count})
            print(f"{path}: {own.double().mean().item():.2%} on its validation set, "
                  f"{hits.double().mean().item():.2%} on {len(hits)} fresh canvases",
                  flush=True)
    except NoiseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shown, skip = [], False
    for arg in argv:  # the command that reproduces the tables, without output flags
        if not skip and arg not in ("--no-readme", "--output"):
            shown.append(arg)
        skip = arg == "--output"
    report = {**analyse(runs),
              "command": " ".join(["python -m analysis.validation_noise",
                                   *map(shlex.quote, shown)])}
    write_json(args.output, report, significant=5)
    text = tables(report)
    print(text)
    if not args.no_readme:
        replace_section("validation_noise", text, EVIDENCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
