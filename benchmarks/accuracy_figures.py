"""The accuracy study's figures (matplotlib, no pyplot): accuracy against the micro-batch,
training curves, error against the budget, and the depth sweep, each from a study's runs."""
import math
import re

from benchmarks.accuracy_results import NORM_WORDS, NORMS, StudyError, depth_sweep, mean_std
from benchmarks.measure import log2_x_axis, write_png


def plot_accuracy_vs_micro_batch(runs, path, micro_batches=None):
    """Final validation accuracy (mean +- std over seeds) against the micro-batch, a line per
    norm, on the study's grid (`micro_batches`, default: those of the runs). A
    split-invariant norm run once per seed is one measurement, not one per micro-batch: a
    single marker where it ran, and a dashed line across the axis at its mean (any split
    gives the same value)."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to touch

    micro_batches = sorted(set(micro_batches or []) | {run["micro_batch_size"] for run in runs})
    by_norm = {}
    for run in runs:
        by_norm.setdefault(run["norm"], {}).setdefault(run["micro_batch_size"], []).append(
            100 * run["val_accuracy"])
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    order = {norm: i for i, norm in enumerate(NORMS)}
    norms = sorted(by_norm, key=lambda n: order.get(n, len(order)))
    once = [norm for norm in norms if len(by_norm[norm]) == 1 and all(
        r.get("split_invariant") for r in runs if r["norm"] == norm)]
    for color, norm in enumerate(norms):
        points = by_norm[norm]
        if norm in once:
            ((ran, values),) = points.items()
            mean, std = mean_std(values)
            axis.axhline(mean, color=f"C{color}", linestyle="--", linewidth=1)
            # nudged sideways so that the norms measured at one micro-batch keep their
            # error bars apart
            nudge = 1.05 ** (once.index(norm) - (len(once) - 1) / 2)
            axis.errorbar([ran * nudge], [mean], yerr=[std], capsize=3, marker="o",
                          color=f"C{color}", label=f"{norm} (run at {ran}; any split)")
        else:
            xs = sorted(points)
            stats = [mean_std(points[x]) for x in xs]
            axis.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3,
                          marker="o", color=f"C{color}", label=norm)
    log2_x_axis(axis, micro_batches, f"micro-batch (global batch {runs[0]['global_batch']})")
    axis.set_ylabel("final validation accuracy (%)")
    axis.set_title(f"{runs[0]['data']}, {runs[0]['model']}, {runs[0]['epochs']} epochs: "
                   f"mean ± std over seeds")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    write_png(figure, path)


def plain_log_y(axis):
    """A log y axis whose tick labels read as plain numbers (2, 3, 10), not powers of ten."""
    from matplotlib.ticker import ScalarFormatter

    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())


def plot_error_vs_budget(runs, path):
    """Final validation error (mean +- std over seeds) against the number of epochs trained,
    a line per (norm, micro-batch), log scales: how much of a gap is a matter of budget. A
    line stops at the longest budget it has finished runs for, and says so in the legend
    where others go further: nothing is drawn that did not run."""
    from matplotlib.figure import Figure

    groups = {}
    for run in runs:
        key = (run["norm"], 0 if run.get("split_invariant") else run["micro_batch_size"])
        groups.setdefault(key, {}).setdefault(run["epochs"], []).append(
            100 * (1 - run["val_accuracy"]))
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    order = {norm: i for i, norm in enumerate(NORMS)}
    longest = max(run["epochs"] for run in runs)
    for norm, micro_batch in sorted(groups, key=lambda k: (order.get(k[0], len(order)), k)):
        by_epochs = groups[norm, micro_batch]
        epochs = sorted(by_epochs)
        stats = [mean_std(by_epochs[e]) for e in epochs]
        label = norm + (f", micro-batch {micro_batch}" if micro_batch else "")
        if epochs[-1] < longest:
            label += f" (not run past {epochs[-1]})"
        axis.errorbar(epochs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3,
                      marker="o", label=label)
    log2_x_axis(axis, sorted({run["epochs"] for run in runs}),
                "epochs trained (cosine schedule over the whole run)")
    plain_log_y(axis)
    axis.set_ylabel("final validation error (%, 100 - accuracy)")
    axis.set_title(f"{runs[0]['data']}, {runs[0]['model']}: mean ± std over seeds")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    write_png(figure, path)


def plot_training_curves(runs, path):
    """Validation error and training loss against the step, a line per (norm, micro-batch) of
    the runs at the mean over seeds, in a band from the lowest seed to the highest (so that a
    seed far from the others shows); both on log scales, so that the last few tenths of a
    point between the norms show beside the first epochs' tens."""
    from matplotlib.figure import Figure

    groups = {}
    for run in runs:
        label = run["norm"] if run.get("split_invariant") else \
            f"{run['norm']}, micro-batch {run['micro_batch_size']}"
        groups.setdefault(label, []).append(run["curve"])
    figure = Figure(figsize=(11, 4.5))
    error_axis, loss_axis = figure.subplots(1, 2)
    for color, (label, curves) in enumerate(groups.items()):
        length = min(len(curve) for curve in curves)
        steps = [curves[0][i]["step"] for i in range(length)]
        error = [[100 * (1 - c[i]["val_accuracy"]) for c in curves] for i in range(length)]
        loss = [[c[i]["train_loss"] for c in curves]
                if all(c[i]["train_loss"] is not None for c in curves) else [math.nan]
                for i in range(length)]  # None: no training record before that validation
        for axis, values in ((error_axis, error), (loss_axis, loss)):
            axis.plot(steps, [sum(v) / len(v) for v in values], marker=".",
                      color=f"C{color}", label=label)
            known = [(step, v) for step, v in zip(steps, values) if not math.isnan(v[0])]
            if known:  # a NaN in a band breaks a log axis
                axis.fill_between([step for step, _ in known], [min(v) for _, v in known],
                                  [max(v) for _, v in known], color=f"C{color}", alpha=0.15,
                                  linewidth=0)
    error_axis.set_ylabel("validation error (%, 100 - accuracy)")
    plain_log_y(error_axis)
    loss_axis.set_ylabel("training loss (mean since the last validation)")
    loss_axis.set_yscale("log")
    for axis in (error_axis, loss_axis):
        axis.set_xlabel("optimiser step")
        axis.grid(alpha=0.3)
    error_axis.legend(fontsize=7, loc="upper right")
    figure.suptitle(f"{runs[0]['data']}, {runs[0]['model']}: mean over seeds "
                    f"({', '.join(map(str, sorted({r['seed'] for r in runs})))}), "
                    f"shaded from the lowest seed to the highest")
    figure.tight_layout()
    write_png(figure, path)


def model_depth(model):
    """The depth in a model's name (cifar_preact_resnet110: 110)."""
    found = re.search(r"(\d+)$", model)
    if found is None:
        raise StudyError(f"--depth-figure: the model name {model} ends in no depth")
    return int(found.group(1))


def plot_depth_sweep(runs, path, models=()):
    """Against depth (the models of `runs`, a study's finished runs): Proxy Norm's lift of
    each norm's final validation accuracy (per-seed paired lifts as dots, their mean as a
    line), and the collapse share at initialisation and at the end, mean over the layers and
    the deepest layer (each seed a dot, the mean over seeds a line). The x axis has a tick
    for each of `models` (the study's) too: a model with no finished run has no point there,
    absent, not zero."""
    from matplotlib.figure import Figure

    if len({run["epochs"] for run in runs}) > 1:
        raise StudyError("--depth-figure draws one budget: give one --epochs")
    sweep = depth_sweep(runs)
    depths = {model: model_depth(model) for model in [*models, *sweep]}
    norms = sorted({norm for model in sweep.values() for norm in model["collapse"]},
                   key=lambda n: NORMS.index(n) if n in NORMS else len(NORMS))
    figure = Figure(figsize=(13, 4.6))
    lift_axis, *share_axes = figure.subplots(1, 3)

    def series(axis, values_by_model, offset, color, label, **style):
        """Each seed a dot, the mean over seeds a line; dots nudged sideways (log x) so
        that the series at one depth do not hide each other."""
        xs, means = [], []
        for model, values in values_by_model.items():
            x = depths[model] * 1.04 ** offset
            axis.scatter([x] * len(values), list(values.values()), s=18, color=color,
                         alpha=0.5, linewidths=0)
            xs.append(x)
            means.append(sum(values.values()) / len(values))
        axis.plot(xs, means, color=color, marker="o", label=label, **style)

    bases = sorted({norm for model in sweep.values() for norm in model["lifts"]})
    for i, norm in enumerate(bases):
        series(lift_axis, {model: values["lifts"][norm] for model, values in sweep.items()
                           if norm in values["lifts"]}, 0, f"C{i}",
               f"{NORM_WORDS.get(norm, norm)} → + Proxy Norm")
    lift_axis.axhline(0, color="black", linewidth=0.8)
    lift_axis.set_ylabel("lift in final validation accuracy (points)")
    lift_axis.set_title("Proxy Norm's lift, paired by seed")
    for axis, statistic, title in zip(share_axes, ("mean", "deepest"),
                                      ("collapse share, mean over layers",
                                       "collapse share, deepest layer")):
        for i, norm in enumerate(norms):
            for when, style, offset in (("init", "--", -1), ("end", "-", 1)):
                shares = {model: {seed: record[when][statistic]
                                  for seed, record in values["collapse"][norm].items()}
                          for model, values in sweep.items() if norm in values["collapse"]}
                series(axis, shares, offset + 0.5 * i, f"C{i}",
                       f"{NORM_WORDS.get(norm, norm)}, "
                       f"{'at initialisation' if when == 'init' else 'at the end'}",
                       linestyle=style, markerfacecolor="white" if when == "init" else None)
        axis.set_ylim(bottom=0)
        axis.set_ylabel("channel_squared_mean share of the power")
        axis.set_title(title)
    for axis in (lift_axis, *share_axes):
        ticks = sorted(set(depths.values()))
        log2_x_axis(axis, ticks, "depth (layers)")
        axis.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
        axis.grid(alpha=0.3)
    if bases:
        lift_axis.legend(fontsize=8)
    else:
        lift_axis.text(0.5, 0.5, "no norm has finished beside its\nProxy Norm twin at a seed yet",
                       transform=lift_axis.transAxes, ha="center", va="center")
    # the two collapse panels share their series: one legend under both
    figure.legend(*share_axes[0].get_legend_handles_labels(), loc="lower right",
                  bbox_to_anchor=(0.99, 0), ncol=2, fontsize=8)
    first = runs[0]
    figure.suptitle(f"{first['data']}, {', '.join(sweep)}, {first['epochs']} epochs, "
                    f"seeds {', '.join(map(str, sorted({run['seed'] for run in runs})))}: "
                    f"dots are seeds, lines their mean", fontsize=10)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    write_png(figure, path)
