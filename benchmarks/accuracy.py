"""Accuracy study: final validation accuracy of every norm against the micro-batch, over seeds.

    python -m benchmarks.accuracy [--data digits | --configs NAME ...] [--norms ...]
        [--global-batch 64] [--micro-batches 2 8 64] [--seeds 0 1 2] [--jobs 2]
        [--epochs N] [--max-steps N] [--lr LR] [--data-path DIR] [--no-resume] [--no-readme]

Each cell (config, micro-batch, seed) is one training run of a named config from
configs.yml, through the training application's own API (`train.config.resolve_config`,
`train.loop.run`), with its recipe as written (optimiser, lr, schedule, epochs) except:
the global batch is `--global-batch`, split as `micro_batch_size` x `replicas` with
`gradient_accumulation` 1 (so BatchNorm's statistics cover one micro-batch and sync_batch's,
with `bn_group_size` 0, all replicas: the whole global batch), `cpu_threads` 1, wandb
disabled and the run folder a temporary one, deleted afterwards. `lr` stays the config's
(it is not rescaled for the global batch; `--lr` sets another). The sample order depends
only on the seed and the global batch, so at one seed every micro-batch sees the same
batches: only the normalisation's statistics domain differs.

`--data digits` (the default) takes `digits_resnet_NORM`, `--data cluttered_digits`
`cluttered_digits_resnet20_NORM`, `--data cifar10` `cifar10_resnet20_NORM` (with
`--data-path`); a norm without its own config there takes the family's first config with
`norm` overridden. `--configs` names configs directly (their norms come from them).

Runs go `--jobs` at a time in separate processes (each uses one thread). Every finished
run is added to benchmarks/results/accuracy.json at once (written to a temporary file,
then renamed), so an interrupted study keeps what it finished; by default a cell already
in the JSON with the same settings is skipped (`--no-resume` runs it again and replaces
it), so running the same command again finishes a partial grid. The README table between
the `accuracy` markers is rebuilt from the whole JSON: final validation accuracy, mean +-
standard deviation (n - 1) over the seeds, per (config family, norm) and micro-batch.
"""
import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile

from benchmarks.measure import write_json
from benchmarks.readme import markdown_table, replace_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "accuracy.json")
NORMS = ["batch", "sync_batch", "group", "layer", "group_pn", "layer_pn"]
FAMILIES = {  # --data: the config family, `FAMILY_NORM` in configs.yml
    "digits": "digits_resnet",
    "cluttered_digits": "cluttered_digits_resnet20",
    "cifar10": "cifar10_resnet20",
}
# The settings that make two runs the same cell; a finished cell is skipped when they agree.
KEY = ("config", "norm", "data_path", "global_batch", "micro_batch_size", "seed", "epochs",
       "max_steps", "lr")


class StudyError(Exception):
    """A bad argument or config: one line, exit status 2."""


class RunFailed(Exception):
    """A training run raised: the study stops with what finished kept, exit status 1."""


def load_report(path):
    if not os.path.exists(path):
        return {"runs": []}
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as error:
        raise StudyError(f"cannot read {path}: {error}") from None
    if not isinstance(report, dict) or not isinstance(report.get("runs"), list):
        raise StudyError(f"{path} is not an accuracy study (no 'runs' list)")
    return report


def cell_key(cell):
    return tuple(json.dumps(cell.get(name)) for name in KEY)


def family_configs(configs, data):
    family = FAMILIES[data]
    return [name for name in configs if name.startswith(family + "_")
            and not name.startswith("_")]


def plan(args):
    """The cells of the study, in run order: config, micro-batch, seed; each a dict with the
    KEY settings and the overrides to train it."""
    from train.config import ConfigError, load_configs, resolve_config

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
    for name, norm in names:
        for micro_batch in args.micro_batches:
            for seed in args.seeds:
                overrides = {
                    "seed": seed, "micro_batch_size": micro_batch, "gradient_accumulation": 1,
                    "replicas": args.global_batch // micro_batch, "bn_group_size": 0,
                    "cpu_threads": args.threads, "wandb_mode": "disabled",
                    "max_steps": args.max_steps,
                }
                for option in ("norm", "epochs", "lr", "data_path", "engine"):
                    value = norm if option == "norm" else getattr(args, option)
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
                        "lr": config["lr"]}
                cells.append((cell, overrides))
    return cells


def train_cell(name, overrides, log_dir=None):
    """One training run in this process; returns the summary's numbers (no run folder kept).

    The run's own output goes to a log in its temporary folder; on a failure its tail is in
    the error."""
    from train.config import resolve_config
    from train.loop import run

    with tempfile.TemporaryDirectory(prefix="accuracy-", dir=log_dir) as folder:
        config = resolve_config(name, {**overrides, "output_dir": os.path.join(folder, "run")})
        log_path = os.path.join(folder, "log.txt")
        try:
            with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                summary, _ = run(config)
        except Exception as error:
            with open(log_path) as log:
                tail = log.read()[-2000:]
            raise RunFailed(f"{name} {overrides}: {type(error).__name__}: {error}; the run's "
                            f"output ended:\n{tail}") from None
    keep = ("status", "val_accuracy", "best_val_accuracy", "steps", "epochs",
            "train_images_per_second", "wall_seconds", "steps_per_epoch", "device")
    result = {key: summary[key] for key in keep}
    result["completed_epochs"] = result.pop("epochs")
    result["recipe"] = {key: config[key] for key in (
        "optimizer", "lr", "momentum", "nesterov", "weight_decay", "lr_schedule",
        "warmup_epochs", "epochs", "precision", "engine", "cpu_threads")}
    return result


def percent(values):
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{100 * mean:.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def table(report):
    """The README table: one row per (config family, norm, global batch, epochs), one column
    per micro-batch; a cell is the mean +- std of the final validation accuracy (%) and the
    number of seeds."""
    runs = report["runs"]
    if not runs:
        return "No runs yet."
    micro_batches = sorted({run["micro_batch_size"] for run in runs})
    groups = {}
    for run in runs:
        row = (run["data"], run["model"], run["norm"], run["global_batch"], run["epochs"],
               run["max_steps"], run["lr"])
        groups.setdefault(row, {}).setdefault(run["micro_batch_size"], []).append(run)
    order = {norm: i for i, norm in enumerate(NORMS)}
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[3], k[4], k[5], k[6],
                                             order.get(k[2], len(order)), k[2])):
        data, model, norm, global_batch, epochs, max_steps, lr = key
        cells = []
        for micro_batch in micro_batches:
            done = groups[key].get(micro_batch, [])
            accuracies = [r["val_accuracy"] for r in done if r["val_accuracy"] is not None
                          and r["status"] in ("finished", "max_steps")]
            failed = len(done) - len(accuracies)
            cell = f"{percent(accuracies)} ({len(accuracies)})" if accuracies else "–"
            if failed:
                cell += f", {failed} diverged"
            cells.append(cell)
        steps = sorted({r.get("steps") for runs in groups[key].values() for r in runs} - {None})
        length = f"{epochs} epochs" + (f", max {max_steps} steps" if max_steps else "")
        length += f" ({'/'.join(map(str, steps))} steps)" if steps else ""
        rows.append([data, f"`{model}`", f"`{norm}`", global_batch, length, lr, *cells])
    header = ["data", "model", "norm", "global batch", "length", "lr",
              *[f"micro-batch {mb}" for mb in micro_batches]]
    commands = sorted({run["command"] for run in runs})
    seeds = sorted({run["seed"] for run in runs})
    environment = report.get("environment", {})
    threads = sorted({run.get("recipe", {}).get("cpu_threads") for run in runs} - {None})
    threads = " or ".join(map(str, threads)) or "?"
    note = (f"Final validation accuracy (%), mean ± standard deviation (n - 1) over seeds "
            f"({', '.join(map(str, seeds))}), the number of seeds in brackets; \"–\": not run "
            f"yet. The global batch is micro-batch x replicas (gradient accumulation 1): "
            f"`batch` normalises over one micro-batch, `sync_batch` over the whole global "
            f"batch, the others over one sample, and at one seed every column sees the same "
            f"batches in the same order. Each config's recipe (optimiser, lr, schedule, "
            f"epochs) as in configs.yml, lr not rescaled for the global batch; {threads} "
            f"CPU thread(s) per run ({environment.get('cpu', 'CPU')}, torch "
            f"{environment.get('torch', '?')}). "
            + " ".join(f"`{command}`" for command in commands) + ".")
    return markdown_table(header, rows) + "\n\n" + note


def command_line(argv):
    """The command that reproduces the results (README and output flags left out)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--no-readme", "--no-resume", "--resume"):
            continue
        if arg in ("--output", "--jobs"):
            skip = True
            continue
        if arg.startswith(("--output=", "--jobs=")):
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
                        help="config family: digits_resnet_NORM, cluttered_digits_resnet20_NORM, "
                             "cifar10_resnet20_NORM")
    parser.add_argument("--configs", nargs="+", help="config names (instead of --data/--norms)")
    parser.add_argument("--norms", nargs="+", default=NORMS)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[2, 8, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override the configs' epochs")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop every run after this many steps (0 = the whole recipe)")
    parser.add_argument("--lr", type=float, help="override the configs' lr")
    parser.add_argument("--data-path", help="dataset folder (CIFAR-10: data/cifar10)")
    parser.add_argument("--engine", help="override the configs' engine (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="cpu_threads of each run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip cells already in the JSON with the same settings (default)")
    parser.add_argument("--output", default=RESULTS, help="JSON path")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
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

    def record(cell, result):
        key = cell_key(cell)
        report["runs"] = [run for run in report["runs"] if cell_key(run) != key]
        report["runs"].append({**cell, **result, "command": command})
        write_json(report, args.output)
        accuracy = result["val_accuracy"]
        print(f"{len(report['runs'])} in JSON: {cell['config']} norm {cell['norm']} micro-batch "
              f"{cell['micro_batch_size']} x {cell['replicas']} seed {cell['seed']}: "
              f"{result['status']}, val_accuracy "
              f"{'n/a' if accuracy is None else f'{accuracy:.2%}'}, "
              f"{result['wall_seconds']:.0f} s", flush=True)

    status = 0
    try:
        if args.jobs == 1:
            for cell, overrides in todo:
                record(cell, train_cell(cell["config"], overrides))
        elif todo:
            context = multiprocessing.get_context("spawn")  # no torch state forked into workers
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
                futures = {pool.submit(train_cell, cell["config"], overrides): cell
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
    write_json(report, args.output)
    text = table(report)
    print(text)
    if not args.no_readme:
        try:
            replace_section("accuracy", text)
        except ValueError as error:
            raise StudyError(str(error)) from None
    return status


if __name__ == "__main__":
    sys.exit(main())
