"""Accuracy study: final validation accuracy of every norm against the micro-batch, over seeds.

    python -m benchmarks.accuracy [--data digits|cluttered_digits|cifar10 | --configs NAME ...]
        [--norms ...] [--global-batch 64] [--micro-batches 2 8 64] [--seeds 0 1 2]
        [--jobs 2] [--epochs N ...] [--max-steps N] [--lr LR ...] [--label-smoothing E ...]
        [--mixup ALPHA ...] [--groups G ...] [--model NAME ...] [--holdout] [--every-split]
        [--data-path DIR] [--figures DIR] [--depth-figure FILE] [--headline]
        [--comparison NAME] [--by-recipe NAME] [--keep-checkpoints DIR] [--output JSON]
        [--markdown FILE --section NAME]
        [--no-resume] [--no-readme] [--report-only]

Each cell (config, epochs, lr, regularisation, micro-batch, seed) is one training run of a
named config from configs.yml, through the training application's own API
(`train.build.resolve_config`, `train.loop.run`), with its recipe as written (optimiser,
lr, schedule, epochs, regularisation) except: the global batch is `--global-batch`, split as
`micro_batch_size` x `replicas` with `gradient_accumulation` 1 (so BatchNorm's statistics
cover one micro-batch and sync_batch's, with `bn_group_size` 0, all replicas: the whole
global batch), `cpu_threads` 1, wandb disabled and the run folder a temporary one, deleted
afterwards (its validation curve is kept in the JSON). `lr` stays the config's (it is not
rescaled for the global batch; `--lr` sets another, several make a search, as several
`--epochs` do; `--label-smoothing` and `--mixup` set the extra regularisation the same way,
a cell for each combination, and `--groups` the group count of `group` and `group_pn` (0:
the model's own, as without it); `--model` trains another model with the same recipe, its
runs a row of their own; several models run one after another, all of the first model's
cells first). The sample order depends only on the seed and the global batch, so at one
seed every micro-batch sees the same batches: only the normalisation's statistics domain
differs.

Every run also records its channel-wise collapse (`collapse`): analysis.power's
`channel_squared_mean` share of the power of each pre-activation (a norm layer followed by
an activation), in eval mode over the first 256 validation images, at initialisation (the
model as built with the run's seed, before the first step) and at the end (the final
weights): the layers' names, each layer's share, their mean and the deepest layer's. In
eval mode BatchNorm uses its running statistics (at initialisation: none yet).

Split-invariant norms (the batch-independent ones, and sync_batch over all replicas) give
the same maths for every split (tests/test_execution_plans.py), so they run once per seed,
at their config's micro-batch where the grid has it (else the largest), and the table
shows that value in every column, marked; `--every-split` runs them at every micro-batch.
`--holdout` (cluttered digits) validates on held-out training digits instead of the
validation digits: for choosing a recipe without looking at the data it is reported on.

`--data digits` (the default) takes `digits_resnet_NORM`, `--data cluttered_digits`
`cluttered_digits_preact_resnet20_NORM`, `--data cifar10` `cifar10_preact_resnet20_NORM`
(with `--data-path`); a norm without its own config there takes the family's first config with
`norm` overridden. `--configs` names configs directly (their norms come from them).

Runs go `--jobs` at a time in separate processes (each uses one thread). Every finished
run is added to `--output` (benchmarks/results/accuracy.json) at once (written to a
temporary file, then renamed), so an interrupted study keeps what it finished; by default
a cell already in the JSON with the same settings is skipped (`--no-resume` runs it again
and replaces it), so running the same command again finishes a partial grid. The table
between the `--section` markers of `--markdown` (docs/evidence.md, `accuracy`) is rebuilt
from the whole JSON: final validation accuracy, mean +- standard deviation (n - 1) over the
seeds, per (config family, norm, lr) and micro-batch, then the wall minutes per run of each
length. `--figures DIR` draws this study's runs: accuracy_vs_microbatch.png and
training_curves.png, and error_vs_budget.png where the JSON holds the same cells trained
for other numbers of epochs; `--depth-figure FILE` draws, against the depth of the
`--model` networks (the number ending each name), the lift in final accuracy from each norm
to its Proxy Norm twin, paired by seed, and the collapse shares at initialisation and at
the end (docs/depth_sweep.png for the depth sweep of docs/evidence.md), and prints them as
a table, with the sweep's pre-registered predictions read by their rule, which also goes
between the `depth_sweep` markers of `--markdown`; `--headline` rewrites README.md's
headline table (`accuracy_headline`) from them: a row per norm and micro-batch, best
first, and each row's paired distance below the best BatchNorm with its 95% confidence
interval and, where the JSON holds the same runs at half the epochs, each row's paired
change since then (the budget rule, applied to every norm); `--comparison NAME` writes the
same table between the NAME markers of `--markdown` (docs/evidence.md's converged
comparison at 48 epochs: `converged`);
`--by-recipe NAME` writes the study's runs as a grid there, a row per recipe (lr,
regularisation, group count) and a column per norm, for reading a search.
`--keep-checkpoints DIR` keeps each run's last checkpoint there, named in the run's record
(`checkpoint`), for analyses of the trained networks (analysis.validation_noise).
`--report-only` runs nothing and rebuilds the tables and figures from what the JSON holds
(while a study is still running).

This module plans and runs the cells; the JSON and the statistics over seeds are
benchmarks/accuracy_results.py's, the markdown tables benchmarks/accuracy_tables.py's and
the figures benchmarks/accuracy_figures.py's.
"""
import argparse
import concurrent.futures
import contextlib
import copy
import hashlib
import itertools
import multiprocessing
import os
import platform
import shlex
import shutil
import sys
import tempfile

from benchmarks.accuracy_figures import (plot_accuracy_vs_micro_batch, plot_depth_sweep,
                                         plot_error_vs_budget, plot_training_curves)
from benchmarks.accuracy_results import (NORMS, REGULARISATION, StudyError, add_run,
                                         budget_runs, cell_key, load_report, split_invariant,
                                         study_runs)
from benchmarks.accuracy_tables import depth_table, headline, recipe_table, table, time_table
from benchmarks.measure import write_json
from benchmarks.readme import README, replace_section
from proxynorm.norms import norm_kind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "accuracy.json")
EVIDENCE = os.path.join(ROOT, "docs", "evidence.md")
FAMILIES = {  # --data: the config family, `FAMILY_NORM` in configs.yml
    "digits": "digits_resnet",
    "cluttered_digits": "cluttered_digits_preact_resnet20",
    "cifar10": "cifar10_preact_resnet20",
}
COLLAPSE_IMAGES = 256  # validation images over which each run's collapse is measured


class RunFailed(Exception):
    """A training run raised: the study stops with what finished kept, exit status 1."""


def family_configs(configs, data):
    family = FAMILIES[data]
    return [name for name in configs if name.startswith(family + "_")
            and not name.startswith("_")]


def plan(args):
    """The cells of the study, in run order: config, micro-batch, seed; each a dict with the
    settings that key it (accuracy_results.KEY_DEFAULTS) and the overrides to train it."""
    from train.build import resolve_config
    from train.config import ConfigError, load_configs

    configs = load_configs()
    if args.configs:
        names = [(name, None) for name in args.configs]
    else:
        members = family_configs(configs, args.data)
        if not members:
            raise StudyError(f"configs.yml has no {FAMILIES[args.data]}_* config")
        names = []
        for norm in args.norms:
            own = f"{FAMILIES[args.data]}_{norm}"
            names.append((own, None) if own in configs else (members[0], norm))
    for micro_batch in args.micro_batches:
        if args.global_batch % micro_batch:
            raise StudyError(f"--micro-batches {micro_batch} does not divide --global-batch "
                             f"{args.global_batch}")
    cells = []
    for model, (name, norm) in itertools.product(args.model or [None], names):
        try:
            recipe = resolve_config(name, {"norm": norm} if norm else {}, configs=configs)
        except ConfigError as error:
            raise StudyError(str(error)) from None
        once = not args.every_split and split_invariant(recipe["norm"])
        micro_batches = args.micro_batches
        if once:  # one run per seed, at the config's own micro-batch where the grid has it
            own = recipe["micro_batch_size"]
            micro_batches = [own if own in micro_batches else max(micro_batches)]
        # --groups varies only a norm whose group count is free (group, group_pn); 0 (None)
        # is the model's own count, the cell of a run without --groups
        group_counts = [count or None for count in args.groups or [0]] \
            if norm_kind(recipe["norm"]).groups == "any" else [None]
        for epochs, lr, smoothing, mixup, groups, micro_batch, seed in itertools.product(
                args.epochs or [None], args.lr or [None], args.label_smoothing or [None],
                args.mixup or [None], group_counts, micro_batches, args.seeds):
            overrides = {
                "seed": seed, "micro_batch_size": micro_batch, "gradient_accumulation": 1,
                "replicas": args.global_batch // micro_batch, "bn_group_size": 0,
                "cpu_threads": args.threads, "wandb_mode": "disabled",
                "max_steps": args.max_steps,
            }
            if args.holdout:
                overrides["clutter_holdout"] = True
            for option, value in (("norm", norm), ("epochs", epochs), ("lr", lr),
                                  ("label_smoothing", smoothing), ("mixup_alpha", mixup),
                                  ("groups", groups),
                                  ("model", model), ("data_path", args.data_path),
                                  ("engine", args.engine)):
                if value is not None:
                    overrides[option] = value
            try:
                config = resolve_config(name, overrides, configs=configs)
            except ConfigError as error:
                raise StudyError(str(error)) from None
            cell = {"config": name, "norm": config["norm"], "data": config["data"],
                    "model": config["model"], "data_path": config["data_path"],
                    "global_batch": args.global_batch, "micro_batch_size": micro_batch,
                    "replicas": config["replicas"], "seed": seed,
                    "epochs": config["epochs"], "max_steps": config["max_steps"],
                    "lr": config["lr"], "groups": config["groups"], "holdout": args.holdout,
                    "split_invariant": once,
                    **{option: config[option] for option in REGULARISATION}}
            cells.append((cell, overrides))
    return cells


def checkpoint_name(cell):
    """The file name --keep-checkpoints gives a cell's last checkpoint: readable, and unique
    per cell (a digest of its key)."""
    digest = hashlib.sha256(repr(cell_key(cell)).encode()).hexdigest()[:8]
    return (f"{cell['config']}-{cell['model']}-{cell['epochs']}ep-mb{cell['micro_batch_size']}"
            f"-seed{cell['seed']}-{digest}.pt")


def train_cell(name, overrides, log_dir=None, keep=None):
    """One training run in this process; returns the summary's numbers and the collapse
    shares at initialisation and at the end (no run folder kept; `keep`: a path to copy the
    run's last checkpoint to first, whole or not at all).

    The run's own output goes to a log in its temporary folder; on a failure its tail is in
    the error."""
    from analysis.checkpoint import first_validation_images
    from train.build import resolve_config
    from train.files import RunFolder
    from train.loop import run

    started = {}

    def keep_initial(training):  # before the first step: a copy of the model as built
        started["run"], started["model"] = training, copy.deepcopy(training.engine.model)

    with tempfile.TemporaryDirectory(prefix="accuracy-", dir=log_dir) as folder:
        _running["folder"] = folder
        run_folder = RunFolder(os.path.join(folder, "run"))
        config = resolve_config(name, {**overrides, "output_dir": run_folder.path})
        log_path = os.path.join(folder, "log.txt")
        try:
            with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                summary, _ = run(config, on_start=keep_initial)
        except Exception as error:
            with open(log_path) as log:
                tail = log.read()[-2000:]
            raise RunFailed(f"{name} {overrides}: {type(error).__name__}: {error}; the run's "
                            f"output ended:\n{tail}") from None
        curve = validation_curve(run_folder.metrics)
        kept = keep and os.path.exists(run_folder.last)  # none if it diverged at once
        if kept:
            shutil.copyfile(run_folder.last, f"{keep}.tmp")
            os.replace(f"{keep}.tmp", keep)
    images = first_validation_images(started["run"].data, COLLAPSE_IMAGES)
    names, initial = collapse_shares(started["model"], images)
    _, final = collapse_shares(started["run"].engine.model, images)
    result = {key: summary[key] for key in (
        "status", "val_accuracy", "best_val_accuracy", "steps", "epochs",
        "train_images_per_second", "wall_seconds", "steps_per_epoch", "device")}
    result["completed_epochs"] = result.pop("epochs")
    result["curve"] = curve
    result["collapse"] = {"images": len(images), "layers": names, "init": initial,
                          "end": final}
    if kept:
        result["checkpoint"] = os.path.basename(keep)
    result["recipe"] = {key: config[key] for key in (
        "optimizer", "lr", "momentum", "nesterov", "weight_decay", "lr_schedule",
        "warmup_epochs", "epochs", "label_smoothing", "mixup_alpha", "precision", "engine",
        "cpu_threads")}
    return result


def collapse_shares(model, images, train=False):
    """(layer names, shares) of `model`'s channel-wise collapse over `images` (analysis.power,
    eval mode, in batches of 64): the channel_squared_mean share of each pre-activation's
    power, in model order, their mean and the deepest layer's. train: in train mode instead
    (BatchNorm on the statistics of each batch, or of each replica chunk of it)."""
    from analysis.power import decompose_model

    layers = decompose_model(model.cpu().train(train), images, batch_size=64)
    shares = [layer["shares"]["channel_squared_mean"] for layer in layers]
    return [layer["layer"] for layer in layers], {
        "layers": shares, "mean": sum(shares) / len(shares), "deepest": shares[-1]}


def validation_curve(path):
    """One record per validation of a run's metrics.jsonl: step, epoch, val_accuracy,
    val_loss, and train_loss, the mean of the training records since the previous one."""
    from train.metrics import read_records

    curve, train_losses = [], []
    for record in read_records(path):
        if record["kind"] == "train":
            train_losses.append(record["loss"])
        elif record["kind"] == "val":
            curve.append({key: record[key] for key in
                          ("step", "epoch", "val_accuracy", "val_loss")})
            curve[-1]["train_loss"] = (sum(train_losses) / len(train_losses)
                                       if train_losses else None)
            train_losses = []
    return curve


_running = {}  # this worker's current run folder, for end_with_parent


def end_with_parent(parent):
    """Pool initializer: on Linux a worker ends when the study's process does, even by
    SIGKILL, removing its current run folder: a stopped study leaves no run training on
    and takes no further cell from its queue."""
    import signal

    from train.distributed import stop_with_launcher

    def end(signum, frame):
        if _running.get("folder"):
            shutil.rmtree(_running["folder"], ignore_errors=True)
        os._exit(128 + signum)

    # SIGHUP, which the training loop leaves alone (it turns SIGINT/SIGTERM into a
    # graceful stop, after which the worker would take the next cell)
    signal.signal(signal.SIGHUP, end)
    stop_with_launcher(signal.SIGHUP, parent)


def command_line(argv):
    """The command that reproduces the results (README and output flags left out)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--no-readme", "--no-resume", "--resume", "--report-only", "--headline"):
            continue
        if arg in ("--output", "--jobs", "--markdown", "--section", "--figures",
                   "--depth-figure", "--comparison", "--by-recipe", "--keep-checkpoints"):
            skip = True
            continue
        if arg.startswith(("--output=", "--jobs=", "--markdown=", "--section=", "--figures=",
                           "--depth-figure=", "--comparison=", "--by-recipe=",
                           "--keep-checkpoints=")):
            continue
        shown.append(arg)
    return " ".join(["python -m benchmarks.accuracy", *map(shlex.quote, shown)])


def environment():
    import torch

    from benchmarks.layer import cpu_name
    return {"cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits", choices=list(FAMILIES),
                        help="config family: digits_resnet_NORM, "
                             "cluttered_digits_preact_resnet20_NORM, cifar10_preact_resnet20_NORM")
    parser.add_argument("--configs", nargs="+", help="config names (instead of --data/--norms)")
    parser.add_argument("--norms", nargs="+", default=NORMS)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[2, 8, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", nargs="+", type=int,
                        help="override the configs' epochs (several: each a cell)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop every run after this many steps (0 = the whole recipe)")
    parser.add_argument("--lr", nargs="+", type=float,
                        help="override the configs' lr (several: a search, each lr a cell)")
    parser.add_argument("--label-smoothing", nargs="+", type=float,
                        help="override the configs' label_smoothing (several: a search)")
    parser.add_argument("--mixup", nargs="+", type=float,
                        help="override the configs' mixup_alpha (several: a search)")
    parser.add_argument("--groups", nargs="+", type=int,
                        help="override GroupNorm's group count of group and group_pn (several: "
                             "a search; 0: the model's own; the other norms run once)")
    parser.add_argument("--model", nargs="+",
                        help="override the configs' model (models.list_models(): "
                             "cifar_preact_resnet56, say); its runs are rows of their own; "
                             "several run in order, each model's cells before the next's")
    parser.add_argument("--data-path", help="dataset folder (CIFAR-10: data/cifar10)")
    parser.add_argument("--engine", help="override the configs' engine (cpu, cuda)")
    parser.add_argument("--holdout", action="store_true",
                        help="cluttered_digits: validate on held-out training digits "
                             "(clutter_holdout), for tuning a recipe")
    parser.add_argument("--every-split", action="store_true",
                        help="run split-invariant norms at every micro-batch too (default: "
                             "once per seed)")
    parser.add_argument("--threads", type=int, default=1, help="cpu_threads of each run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip cells already in the JSON with the same settings (default)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild the table and figures from the JSON")
    parser.add_argument("--output", default=RESULTS, help="JSON path")
    parser.add_argument("--markdown", default=EVIDENCE,
                        help="the markdown file whose table to rewrite (default docs/evidence.md)")
    parser.add_argument("--section", default="accuracy",
                        help="the table's marker name in --markdown (<!-- NAME:start -->)")
    parser.add_argument("--figures", metavar="DIR",
                        help="also draw this study's accuracy_vs_microbatch.png, "
                             "training_curves.png and, where the JSON holds other budgets, "
                             "error_vs_budget.png into DIR")
    parser.add_argument("--depth-figure", metavar="FILE",
                        help="also draw, against the depth of the --model networks, Proxy "
                             "Norm's paired lift and the collapse shares of this study's runs "
                             "into FILE (docs/depth_sweep.png), and write them as a table "
                             "between the depth_sweep markers of --markdown")
    parser.add_argument("--headline", action="store_true",
                        help="also rewrite README.md's headline table (accuracy_headline) "
                             "from this study's runs")
    parser.add_argument("--comparison", metavar="NAME",
                        help="also write the headline's table of this study's runs between the "
                             "NAME markers of --markdown (converged)")
    parser.add_argument("--by-recipe", metavar="NAME",
                        help="also write this study's runs as a grid, a row per recipe (lr, "
                             "regularisation, group count) and a column per norm, between the "
                             "NAME markers of --markdown (for reading a search)")
    parser.add_argument("--keep-checkpoints", metavar="DIR",
                        help="keep each run's last checkpoint in DIR (named in its JSON "
                             "record), for analyses of the trained networks: "
                             "analysis.validation_noise")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite any table (--markdown's, nor the headline)")
    args = parser.parse_args(argv)
    try:
        return study(args, command_line(argv))
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def study(args, command):
    if args.jobs < 1 or args.global_batch < 1 or min(args.micro_batches) < 1:
        raise StudyError("--jobs, --global-batch and --micro-batches must be >= 1")
    cells = plan(args)
    if args.keep_checkpoints and not args.report_only:
        try:  # before the first run, not after it
            os.makedirs(args.keep_checkpoints, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.keep_checkpoints):
                pass
        except OSError as error:
            raise StudyError(f"--keep-checkpoints {args.keep_checkpoints}: cannot write there "
                             f"({error.strerror})") from None
    report = load_report(args.output)
    report["environment"] = environment()
    done = {cell_key(run) for run in report["runs"]}
    todo = []
    for cell, overrides in cells:
        if args.resume and cell_key(cell) in done:
            continue
        todo.append((cell, overrides))
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {args.output}, "
          f"{len(todo)} to run, {args.jobs} at a time", flush=True)
    if args.report_only:
        todo = []

    def kept(cell):  # where --keep-checkpoints puts the cell's last checkpoint
        return (os.path.join(args.keep_checkpoints, checkpoint_name(cell))
                if args.keep_checkpoints else None)

    def record(cell, result):
        add_run(report, {**cell, **result, "command": command,
                         "cpu": report["environment"]["cpu"]})
        write_json(args.output, report)
        accuracy = result["val_accuracy"]
        print(f"{len(report['runs'])} in JSON: {cell['config']} model {cell['model']} norm "
              f"{cell['norm']} epochs {cell['epochs']} micro-batch "
              f"{cell['micro_batch_size']} x {cell['replicas']} seed {cell['seed']}: "
              f"{result['status']}, val_accuracy "
              f"{'n/a' if accuracy is None else f'{accuracy:.2%}'}, "
              f"{result['wall_seconds']:.0f} s", flush=True)

    status = 0
    try:
        if args.jobs == 1:
            for cell, overrides in todo:
                record(cell, train_cell(cell["config"], overrides, keep=kept(cell)))
        elif todo:
            context = multiprocessing.get_context("spawn")  # no torch state forked into workers
            with concurrent.futures.ProcessPoolExecutor(
                    args.jobs, mp_context=context, initializer=end_with_parent,
                    initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(train_cell, cell["config"], overrides,
                                       keep=kept(cell)): cell
                           for cell, overrides in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        record(futures[future], future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    except RunFailed as error:
        # a run that raised (missing data, a bug): stop, keep what finished, show its log
        print(f"error: {error}", file=sys.stderr)
        status = 1
    except concurrent.futures.process.BrokenProcessPool:
        # a worker ended from outside (a kill, the out-of-memory killer): the pool is gone
        print(f"error: a run's process ended abruptly (killed, or out of memory); the runs "
              f"that finished are in {args.output}, and the same command runs the rest",
              file=sys.stderr)
        status = 1
    write_json(args.output, report)
    publish(args, report, cells)
    return status


def publish(args, report, cells):
    """Prints the tables of the whole JSON and writes what the flags ask for: the figures
    of the study's runs, the --markdown sections and README.md's headline."""
    text = table(report) + "\n\n" + time_table(report)
    print(text)
    runs = study_runs(report, cells)
    if args.figures and runs:
        path = os.path.join(args.figures, "accuracy_vs_microbatch.png")
        plot_accuracy_vs_micro_batch(runs, path, args.micro_batches)
        print(f"wrote {path}")
        path = os.path.join(args.figures, "training_curves.png")
        plot_training_curves(runs, path)
        print(f"wrote {path}")
        budgets = budget_runs(report, cells)
        if len({run["epochs"] for run in budgets}) > 1:
            path = os.path.join(args.figures, "error_vs_budget.png")
            plot_error_vs_budget(budgets, path)
            print(f"wrote {path}")
    if args.depth_figure and runs:
        plot_depth_sweep(runs, args.depth_figure, args.model or ())
        print(f"wrote {args.depth_figure}")
        depth = depth_table(runs, args.model or ())
        print(depth)
    if not args.no_readme:
        try:
            replace_section(args.section, text, args.markdown)
            if args.depth_figure and runs:
                replace_section("depth_sweep", depth, args.markdown)
            if args.headline or args.comparison:
                paired = headline(runs, [cell for cell, _ in cells], budget_runs(report, cells))
            if args.headline:
                replace_section("accuracy_headline", paired, README)
            if args.comparison:
                replace_section(args.comparison, paired, args.markdown)
            if args.by_recipe:
                replace_section(args.by_recipe, recipe_table(runs), args.markdown)
        except ValueError as error:
            raise StudyError(str(error)) from None


if __name__ == "__main__":
    sys.exit(main())
