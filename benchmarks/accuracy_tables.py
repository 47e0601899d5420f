"""The accuracy study's markdown: the grid of final accuracies (docs/evidence.md), the wall
time of its runs, and README.md's headline table, built from benchmarks.accuracy_results."""
import collections

from benchmarks.accuracy_results import (KEY_DEFAULTS, NORM_WORDS, NORMS, REGULARISATION,
                                         cell_key, depth_sweep, finished, mean_std,
                                         natural, paired_ci, split_invariant)
from benchmarks.readme import markdown_table
from proxynorm.norms import norm_kind


def percent(values):
    mean, std = mean_std(values)
    return f"{100 * mean:.2f}" if len(values) < 2 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def regularisation(run):
    """The run's extra regularisation, in words ("none" for runs recorded before it was)."""
    parts = [f"{words} {run.get(option, KEY_DEFAULTS[option]):g}"
             for option, words in REGULARISATION.items()
             if run.get(option, KEY_DEFAULTS[option])]
    return ", ".join(parts) or "none"


def table(report):
    """The markdown table: one row per (data, model, norm and its group count where set,
    global batch, length, lr, regularisation), one column per micro-batch; a cell is the
    mean +- std of the final validation accuracy (%) and the number of seeds. A
    split-invariant norm run at one micro-batch shows its value in every column, marked
    with *."""
    runs = report["runs"]
    if not runs:
        return "No runs yet."
    micro_batches = sorted({run["micro_batch_size"] for run in runs})
    groups = {}
    for run in runs:
        row = (run["data"] + (" (holdout)" if run.get("holdout") else ""), run["model"],
               run["norm"], run["global_batch"], run["epochs"], run["max_steps"], run["lr"],
               regularisation(run), run.get("groups") or 0)
        groups.setdefault(row, {}).setdefault(run["micro_batch_size"], []).append(run)
    order = {norm: i for i, norm in enumerate(NORMS)}
    rows, once = [], set()
    for key in sorted(groups, key=lambda k: (k[0], natural(k[1]), k[3], k[4], k[5], k[6],
                                             k[7] != "none", k[7],
                                             order.get(k[2], len(order)), k[2], k[8])):
        data, model, norm, global_batch, epochs, max_steps, lr, extra, group_count = key
        by_micro_batch = groups[key]
        shared = None
        if len(by_micro_batch) == 1 and all(r.get("split_invariant") for runs in
                                            by_micro_batch.values() for r in runs):
            (shared,) = by_micro_batch
            once.add(shared)
        cells = []
        for micro_batch in micro_batches:
            done = by_micro_batch.get(micro_batch if shared is None else shared, [])
            accuracies = [r["val_accuracy"] for r in done if r["val_accuracy"] is not None
                          and finished(r)]
            failed = len(done) - len(accuracies)
            cell = f"{percent(accuracies)} ({len(accuracies)})" if accuracies else "–"
            if failed:
                cell += f", {failed} diverged"
            if shared is not None:
                cell += " *"
            cells.append(cell)
        steps = sorted({r.get("steps") for runs in by_micro_batch.values() for r in runs}
                       - {None})
        length = f"{epochs} epochs" + (f", max {max_steps} steps" if max_steps else "")
        length += f" ({'/'.join(map(str, steps))} steps)" if steps else ""
        shown = f"`{norm}`" + (f", {group_count} groups" if group_count else "")
        rows.append([data, f"`{model}`", shown, global_batch, length, lr, extra, *cells])
    header = ["data", "model", "norm", "global batch", "length", "lr", "regularisation",
              *[f"micro-batch {mb}" for mb in micro_batches]]
    commands = sorted({run["command"] for run in runs})
    seeds = sorted({run["seed"] for run in runs})
    environment = report.get("environment", {})
    threads = sorted({run.get("recipe", {}).get("cpu_threads") for run in runs} - {None})
    threads = " or ".join(map(str, threads)) or "?"
    # a seed reproduces a run only on the same kind of CPU (its kernels round differently)
    runs_by_cpu = collections.Counter(run.get("cpu", "an unrecorded CPU") for run in runs)
    machines = ", ".join(f"{count} on {cpu}" if len(runs_by_cpu) > 1 else cpu
                         for cpu, count in runs_by_cpu.most_common())
    note = (f"Final validation accuracy (%), mean ± standard deviation (n - 1) over seeds "
            f"({', '.join(map(str, seeds))}), the number of seeds in brackets; \"–\": not run "
            f"yet. The global batch is micro-batch x replicas (gradient accumulation 1): "
            f"`batch` normalises over one micro-batch, `sync_batch` over the whole global "
            f"batch, the others over one sample, and at one seed every column sees the same "
            f"batches in the same order. ")
    if once:
        note += (f"*: run once per seed at micro-batch {'/'.join(map(str, sorted(once)))}; "
                 f"this norm's statistics do not depend on how the global batch is split "
                 f"(tests/test_execution_plans.py proves it exactly), so the value stands "
                 f"for every column. ")
    note += (f"Each config's recipe (optimiser, lr, schedule, epochs, regularisation: label "
             f"smoothing and mixup beyond the weight decay every run has) as in configs.yml, lr "
             f"not rescaled for the global batch; {threads} CPU thread(s) per run "
             f"({machines}; torch {environment.get('torch', '?')}). "
             + " ".join(f"`{command}`" for command in commands) + ".")
    return markdown_table(header, rows) + "\n\n" + note


def recipe_table(runs):
    """A study's runs as a grid of recipes: a row per recipe (micro-batch where several, lr,
    extra regularisation, group count where set), a column per norm; a cell is the mean +-
    std of the final validation accuracy (%) over seeds and their number, each column's best
    mean in bold. For reading a search, whose table() rows list one norm each."""
    def recipe(run):
        return (run["micro_batch_size"], run["lr"],
                *(run.get(option, KEY_DEFAULTS[option]) for option in REGULARISATION),
                run.get("groups") or 0)

    cells = {}
    for run in runs:
        if run["val_accuracy"] is not None and finished(run):
            cells.setdefault(recipe(run), {}).setdefault(run["norm"], []).append(
                run["val_accuracy"])
    if not cells:
        return "No runs yet."
    order = {norm: i for i, norm in enumerate(NORMS)}
    norms = sorted({norm for by_norm in cells.values() for norm in by_norm},
                   key=lambda norm: (order.get(norm, len(order)), norm))
    means = {(key, norm): mean_std(values)[0] for key, by_norm in cells.items()
             for norm, values in by_norm.items()}
    best = {norm: max(mean for (_, n), mean in means.items() if n == norm) for norm in norms}
    several_micro_batches = len({key[0] for key in cells}) > 1
    any_groups = any(key[-1] for key in cells)
    rows = []
    for key in sorted(cells):
        micro_batch, lr, *options, groups = key
        extra = regularisation(dict(zip(REGULARISATION, options)))
        row = [micro_batch] if several_micro_batches else []
        row += [lr, extra] + ([groups or "the model's"] if any_groups else [])
        for norm in norms:
            values = cells[key].get(norm)
            if not values:
                row.append("–")
                continue
            shown = percent(values)
            if means[key, norm] == best[norm]:
                shown = f"**{shown}**"
            row.append(f"{shown} ({len(values)})")
        rows.append(row)
    header = (["micro-batch"] if several_micro_batches else []) + ["lr", "regularisation"]
    header += (["groups"] if any_groups else []) + [f"`{norm}`" for norm in norms]
    first = runs[0]
    seeds = sorted({run["seed"] for run in runs})
    note = (f"{first['data']}{' (holdout)' if first.get('holdout') else ''}, "
            f"`{first['model']}`, global batch {first['global_batch']}, {first['epochs']} "
            f"epochs, seeds {', '.join(map(str, seeds))}: final validation accuracy (%), mean "
            f"± standard deviation (n - 1) over the seeds, their number in brackets; each "
            f"column's best mean in bold; \"–\": not run.")
    return markdown_table(header, rows) + "\n\n" + note


def time_table(report):
    """The markdown table of what the runs took: per (data, model, length), the wall minutes
    of one run, lowest to highest, for the norms with batch statistics and for the
    batch-independent ones, and the hours of all the row's runs together."""
    groups = {}
    for run in report["runs"]:
        if run.get("wall_seconds") is None:
            continue
        row = (run["data"] + (" (holdout)" if run.get("holdout") else ""), run["model"],
               run["epochs"], run["max_steps"])
        kind = "independent" if split_invariant(run["norm"]) and run["norm"] != "sync_batch" \
            else "batch"
        groups.setdefault(row, {}).setdefault(kind, []).append(run["wall_seconds"] / 60)
    if not groups:
        return "No timed runs yet."

    def minutes(values):
        if not values:
            return "–"
        return f"{min(values):.0f}–{max(values):.0f} ({len(values)})"

    rows = []
    for key in sorted(groups, key=lambda k: (k[0], natural(k[1]), k[2], k[3])):
        data, model, epochs, max_steps = key
        by_kind = groups[key]
        every = [m for values in by_kind.values() for m in values]
        length = f"{epochs} epochs" + (f", max {max_steps} steps" if max_steps else "")
        rows.append([data, f"`{model}`", length, minutes(by_kind.get("batch", [])),
                     minutes(by_kind.get("independent", [])), f"{sum(every) / 60:.1f}"])
    header = ["data", "model", "length", "`batch`, `sync_batch`: minutes per run",
              "batch-independent norms: minutes per run", "all the runs: hours"]
    note = ("Wall time of each run (one process, one thread), from its start to its summary, "
            "lowest to highest, the number of runs in brackets; the hours add up the row's "
            "runs. The studies ran `--jobs 2` on a 2-core machine, so each run shared the "
            "cores with another (and at times with a third process or other work): these "
            "are the times the runs took, not a speed benchmark.")
    return markdown_table(header, rows) + "\n\n" + note


def headline(runs, planned=(), budgets=()):
    """The README's headline table of one study's runs (one recipe per norm): a row per
    (norm, micro-batch), best first, with each row's distance below the best BatchNorm row
    as the mean of the per-seed differences (a seed fixes the batches, so the comparison
    is paired) and its 95% confidence interval. Where `budgets` (the same cells at other
    lengths: accuracy_results.budget_runs) hold runs of half the epochs, a column gives
    each row's paired change since then: the budget rule, applied to every norm. Rows of
    `planned` cells (the study's plan) with no finished run yet follow, marked so."""
    def row_key(run):
        return run["norm"], None if run.get("split_invariant") else run["micro_batch_size"]

    groups = {}
    for run in runs:
        if run["val_accuracy"] is not None and finished(run):
            groups.setdefault(row_key(run), {})[run["seed"]] = run
    missing = {}
    for cell in planned:
        if row_key(cell) not in groups:
            missing.setdefault(row_key(cell), cell)
    if not groups and not missing:
        return "No runs yet."
    mean = {key: mean_std([r["val_accuracy"] for r in by_seed.values()])[0]
            for key, by_seed in groups.items()}
    # on a tie (sync_batch over all replicas is BatchNorm over the whole global batch) the
    # synchronised one is the reference
    batchnorms = sorted((key for key in groups if norm_kind(key[0]).batch_statistics),
                        key=lambda k: not norm_kind(k[0]).synchronised)
    best = max(batchnorms, key=mean.get) if batchnorms else None

    def statistics_over(run):
        replicas = run["global_batch"] // run["micro_batch_size"]
        if norm_kind(run["norm"]).synchronised:
            return f"{run['global_batch']} samples (synchronised over {replicas} replicas)"
        if norm_kind(run["norm"]).batch_statistics:
            return f"{run['micro_batch_size']} samples (" + (
                "one replica)" if replicas == 1 else f"per replica, {replicas} replicas)")
        return "1 sample"

    def label(norm):
        return f"{NORM_WORDS.get(norm, norm)} (`{norm}`)"

    at_half = {cell_key(run): run for run in budgets}

    def since_half(by_seed):
        changes = [100 * (run["val_accuracy"] - half["val_accuracy"])
                   for run in by_seed.values()
                   if (half := at_half.get(cell_key({**run, "epochs": run["epochs"] // 2})))]
        return f"{mean_std(changes)[0]:+.2f} ({len(changes)})" if changes else "–"

    rows = []
    for key in sorted(groups, key=lambda k: (-mean[k], k != best)):
        by_seed = groups[key]
        run = next(iter(by_seed.values()))
        below = "–"
        if best is not None and key != best:
            paired = [100 * (groups[best][seed]["val_accuracy"] - r["val_accuracy"])
                      for seed, r in by_seed.items() if seed in groups[best]]
            if paired:
                mean_below, low, high = paired_ci(paired)
                below = f"{mean_below:.2f}"
                if len(paired) > 1:
                    below += f" [{low:.2f}, {high:.2f}]"
        accuracies = [r["val_accuracy"] for r in by_seed.values()]
        rows.append([label(key[0]), statistics_over(run), regularisation(run),
                     f"{percent(accuracies)} ({len(accuracies)})", below,
                     since_half(by_seed)])
    for key, cell in missing.items():
        rows.append([label(key[0]), statistics_over(cell), regularisation(cell),
                     "not run yet", "–", "–"])
    first = runs[0] if runs else next(iter(missing.values()))
    header = ["norm", "statistics over", "extra regularisation",
              "final validation accuracy (%)",
              "below the best BatchNorm (points) [95% CI]",
              f"since {first['epochs'] // 2} epochs (points)"]
    shown = any(row[-1] != "–" for row in rows)
    if not shown:
        header, rows = header[:-1], [row[:-1] for row in rows]
    seeds = sorted({run["seed"] for run in [*runs, *planned]})
    note = (f"{first['data']}, `{first['model']}`, global batch {first['global_batch']}, "
            f"{first['epochs']} epochs, seeds {', '.join(map(str, seeds))}: mean ± standard "
            f"deviation (n - 1) over the seeds, their number in brackets. Below the best "
            f"BatchNorm: the mean of the per-seed differences (a seed fixes the batches) and "
            f"its 95% confidence interval in brackets (Student's t, n - 1 degrees of freedom: "
            f"4.30 standard errors either side at 3 seeds); negative is above it, and an "
            f"interval that holds 0 does not tell the two apart.")
    if shown:
        note += (f" Since {first['epochs'] // 2} epochs: the mean per-seed change from the same "
                 f"runs at half the budget, the number of seeds in brackets; by the budget rule "
                 f"a norm within 0.3 points had converged at half the budget.")
    return markdown_table(header, rows) + "\n\n" + note


def depth_table(runs, models=()):
    """A depth sweep (a study's finished runs at one budget) as markdown: per model, each
    norm's and its Proxy Norm twin's final accuracy per seed, the lift paired by seed, and
    the collapse shares (mean over the layers, mean over the seeds) at initialisation and at
    the end; then each prediction of docs/evidence.md's pre-registration read by its rule,
    once every model of `models` has all its seeds paired."""
    sweep = depth_sweep(runs)
    order = sorted({*models, *sweep}, key=natural)
    seeds = sorted({run["seed"] for run in runs})
    accuracy = {(run["model"], run["norm"], run["seed"]): 100 * run["val_accuracy"]
                for run in runs}
    bases = sorted({norm for model in sweep.values() for norm in model["lifts"]} |
                   {run["norm"] for run in runs if not norm_kind(run["norm"]).proxy})
    rows = []
    for base in bases:
        twin = base + "_pn"
        for model in order:
            def per_seed(norm):
                return " / ".join(f"{accuracy[model, norm, seed]:.2f}"
                                  if (model, norm, seed) in accuracy else "–" for seed in seeds)
            lifts = sweep.get(model, {}).get("lifts", {}).get(base, {})
            lift = " / ".join(f"{lifts[seed]:+.2f}" if seed in lifts else "–" for seed in seeds)
            if lifts:
                lift += f" (mean {mean_std(list(lifts.values()))[0]:+.2f})"
            shares = []
            for when in ("init", "end"):
                for norm in (base, twin):
                    values = [record[when]["mean"] for record in
                              sweep.get(model, {}).get("collapse", {}).get(norm, {}).values()]
                    shares.append(f"{mean_std(values)[0]:.3f}" if values else "–")
            rows.append([f"`{model}`", per_seed(base), per_seed(twin), lift,
                         f"{shares[0]} / {shares[1]}", f"{shares[2]} / {shares[3]}"])
    header = ["model", f"{NORM_WORDS.get(bases[0], bases[0]) if bases else 'norm'} (%)",
              "+ Proxy Norm (%)", "lift (points)", "collapse share at initialisation: "
              "without / with Proxy Norm", "collapse share at the end: without / with"]
    first = runs[0]
    note = (f"{first['data']}, {first['epochs']} epochs, seeds "
            f"{' / '.join(map(str, seeds))} in that order; \"–\": not finished. Lift: the "
            f"Proxy Norm twin's final validation accuracy minus the norm's, paired by seed. "
            f"Collapse share: analysis.power's channel_squared_mean share of each "
            f"pre-activation's power over the first {first['collapse']['images']} "
            f"validation canvases, mean over the layers, then over the seeds.")
    readings = [reading(base, sweep, order, len(seeds)) for base in bases]
    return markdown_table(header, rows) + "\n\n" + note + "\n\n" + "\n".join(readings)


def reading(base, sweep, models, seeds):
    """The pre-registered rule applied to one norm's sweep (docs/evidence.md, "Depth
    sweep"): over the models in order of depth, a quantity is supported if its mean over the
    seeds grows at every step and every seed's value at the deepest is above every seed's at
    the shallowest; refuted if the deepest's mean is not above the shallowest's; otherwise
    inconclusive. Read only with every seed of every model in."""
    def initial_shares(norm):  # per model {seed: mean over the layers at initialisation}
        return [{seed: record["init"]["mean"] for seed, record in
                 sweep.get(model, {}).get("collapse", {}).get(norm, {}).items()}
                for model in models]

    lifts = [sweep.get(model, {}).get("lifts", {}).get(base, {}) for model in models]
    collapse, twins = initial_shares(base), initial_shares(base + "_pn")
    words = NORM_WORDS.get(base, base)
    if len(models) < 2 or any(len(values) < seeds for values in [*lifts, *collapse, *twins]):
        return (f"Not read against the pre-registered rule yet ({words}): a model's runs "
                f"have not all finished beside their Proxy Norm twins.")

    def mean(values):
        return mean_std(list(values.values()))[0]

    def rule(series):
        means = [mean(values) for values in series]
        if means[-1] <= means[0]:
            return "refuted"
        if all(a < b for a, b in zip(means, means[1:])) and \
                min(series[-1].values()) > max(series[0].values()):
            return "supported"
        return "inconclusive"

    nearer = all(mean(t) < mean(c) / 2 for t, c in zip(twins, collapse))
    return (f"Read by the pre-registered rule ({words}): prediction 2, the lift grows with "
            f"depth: **{rule(lifts)}**. Prediction 1, {words}'s collapse share at "
            f"initialisation grows with depth: **{rule(collapse)}**; with Proxy Norm it is "
            f"nearer BatchNorm's (zero) than {words}'s at every depth: "
            f"**{'yes' if nearer else 'no'}**.")
