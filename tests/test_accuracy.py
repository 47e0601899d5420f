"""The accuracy study: a tiny grid's JSON and table, and skipping of finished cells (never its
accuracies or timings)."""
import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import accuracy
from benchmarks.accuracy_figures import plot_error_vs_budget
from benchmarks.accuracy_results import budget_runs, cell_key, depth_sweep
from benchmarks.accuracy_tables import headline, recipe_table, table, time_table
from tests.processes import alive, children


@pytest.fixture(autouse=True)
def threads():
    """The runs set torch's thread count: give the next tests theirs back."""
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


def study(tmp_path, *flags):
    output = tmp_path / "accuracy.json"
    status = accuracy.main(["--norms", "batch", "group_pn", "--global-batch", "16", "--micro-batches",
                            "2", "8", "--seeds", "0", "--max-steps", "2", "--jobs", "1",
                            "--no-readme", "--output", str(output), *flags])
    return status, json.loads(output.read_text())


def test_tiny_grid_writes_its_cells_a_table_and_figures(tmp_path, capsys):
    status, report = study(tmp_path, "--figures", str(tmp_path / "docs"))
    assert status == 0
    for name in ("accuracy_vs_microbatch.png", "training_curves.png"):
        assert (tmp_path / "docs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = sorted((run["norm"], run["micro_batch_size"], run["replicas"], run["seed"])
                   for run in report["runs"])
    # group_pn ignores the split: run once, at its config's micro-batch (8)
    assert cells == [("batch", 2, 8, 0), ("batch", 8, 2, 0), ("group_pn", 8, 2, 0)]
    for run in report["runs"]:
        assert run["config"] == f"digits_resnet_{run['norm']}" and run["global_batch"] == 16
        assert run["status"] == "max_steps" and run["steps"] == 2
        assert run["split_invariant"] == (run["norm"] == "group_pn")
        assert 0 <= run["val_accuracy"] <= 1
        assert run["recipe"]["cpu_threads"] == 1
        assert run["command"].startswith("python -m benchmarks.accuracy --norms batch group_pn")
        assert "--no-readme" not in run["command"] and "--output" not in run["command"]
        assert "--figures" not in run["command"]
        assert [point["step"] for point in run["curve"]] == [2]  # validated once, at the end
        assert run["curve"][0]["val_accuracy"] == run["val_accuracy"]
    text = table(report)
    assert "| micro-batch 2 | micro-batch 8 |" in text
    assert "| digits | `digits_preact_resnet` | `batch` | 16 |" in text
    shown = next(run for run in report["runs"] if run["norm"] == "group_pn")["val_accuracy"]
    cell = f"{100 * shown:.2f} (1) *"
    assert (f"| `group_pn` | 16 | 15 epochs, max 2 steps (2 steps) | 0.1 | none | {cell} | {cell} |"
            in text)
    assert "*: run once per seed at micro-batch 8" in text
    assert "`python -m benchmarks.accuracy --norms batch group_pn" in text
    assert "1 CPU thread(s) per run" in text
    assert text in capsys.readouterr().out
    # every run records its machine; runs from several machines are counted by machine
    cpu = accuracy.environment()["cpu"]
    assert {run["cpu"] for run in report["runs"]} == {cpu}
    assert f"({cpu}; torch " in text
    older = {**report["runs"][0], "seed": 1}
    del older["cpu"]
    mixed = table({**report, "runs": [*report["runs"], older]})
    assert f"(3 on {cpu}, 1 on an unrecorded CPU; torch " in mixed


def test_every_run_records_its_collapse_shares_at_initialisation_and_at_the_end(
        tmp_path, monkeypatch):
    """The record holds analysis.power's channel_squared_mean shares, in eval mode over the
    first validation images, of the model as the seed builds it and of the trained one."""
    from analysis.power import decompose_model
    from models import get_model
    from train import loop
    from train.build import load_data, resolve_config

    trained = []
    original = loop.conclude

    def keep_trained(run, config):  # the run's own model, after its last step
        result = original(run, config)
        trained.append(copy.deepcopy(run.engine.model))
        return result

    monkeypatch.setattr(loop, "conclude", keep_trained)
    monkeypatch.setattr(accuracy, "COLLAPSE_IMAGES", 40)
    _, report = study(tmp_path, "--norms", "group", "--micro-batches", "8", "--lr", "0.5")
    (run,) = report["runs"]
    collapse = run["collapse"]
    data = load_data(resolve_config(run["config"], {"seed": run["seed"]}))
    images = torch.stack([data.val[(0, i)][0] for i in range(40)])
    torch.manual_seed(0)  # the run's seed, then its data and model, as train.loop builds them
    initial = get_model(run["model"], norm="group", num_classes=10, in_channels=1)
    for key, model in (("init", initial), ("end", trained[0])):
        layers = decompose_model(model.eval(), images)
        expected = [layer["shares"]["channel_squared_mean"] for layer in layers]
        assert collapse[key]["layers"] == pytest.approx(expected, rel=1e-9)
        assert collapse[key]["mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-9)
        assert collapse[key]["deepest"] == collapse[key]["layers"][-1]
    assert collapse["images"] == 40
    assert collapse["layers"] == [layer["layer"] for layer in layers]
    assert run["model"] == "digits_preact_resnet"  # 3 blocks of 2 norm-acts, then bn_final
    assert collapse["layers"][-1] == "bn_final" and len(collapse["layers"]) == 7
    # two steps at a large lr move the shares: init and end are different models
    assert collapse["init"]["layers"] != pytest.approx(collapse["end"]["layers"], rel=1e-3)


def test_finished_cells_are_skipped_and_a_partial_grid_is_finished(tmp_path, capsys):
    study(tmp_path, "--micro-batches", "8")
    capsys.readouterr()
    _, report = study(tmp_path)  # micro-batch 8 is in the JSON: only batch at 2 runs
    out = capsys.readouterr().out
    assert "3 cells, 2 already in" in out and "1 to run" in out
    assert sorted(run["micro_batch_size"] for run in report["runs"]) == [2, 8, 8]
    _, again = study(tmp_path)
    assert "0 to run" in capsys.readouterr().out
    assert again["runs"] == report["runs"]
    _, reported = study(tmp_path, "--report-only", "--micro-batches", "2", "8", "16")
    assert "4 cells, 3 already in" in capsys.readouterr().out  # batch at 16 not run
    assert reported["runs"] == report["runs"]
    page = tmp_path / "evidence.md"
    page.write_text("<!-- accuracy:start -->\n<!-- accuracy:end -->\n"
                    "<!-- converged:start -->\n<!-- converged:end -->\n")
    assert accuracy.main(["--norms", "batch", "group_pn", "--global-batch", "16",
                          "--micro-batches", "2", "8", "--seeds", "0", "--max-steps", "2",
                          "--report-only", "--output", str(tmp_path / "accuracy.json"),
                          "--markdown", str(page), "--comparison", "converged"]) == 0
    converged = page.read_text().split("<!-- converged:start -->")[1]
    assert "| BatchNorm (`batch`) | 8 samples (per replica, 2 replicas) |" in converged
    assert "below the best BatchNorm (points) [95% CI]" in converged
    _, rerun = study(tmp_path, "--no-resume", "--micro-batches", "8")
    assert "2 to run" in capsys.readouterr().out
    assert sorted(run["micro_batch_size"] for run in rerun["runs"]) == [2, 8, 8]  # replaced


def test_kept_checkpoints_are_each_runs_last_weights(tmp_path, capsys):
    from train.evaluate import load_model

    kept = tmp_path / "kept"
    status, report = study(tmp_path, "--micro-batches", "8", "--keep-checkpoints", str(kept))
    assert status == 0
    names = sorted(run["checkpoint"] for run in report["runs"])
    assert names == sorted(os.listdir(kept)) and len(set(names)) == 2
    for run in report["runs"]:
        assert run["checkpoint"].startswith(f"{run['config']}-digits_preact_resnet-15ep-mb8-seed0-")
        assert "--keep-checkpoints" not in run["command"]
        _, info = load_model(kept / run["checkpoint"])
        assert info["step"] == 2 and info["config"]["norm"] == run["norm"]
        assert info["val_accuracy"] == run["val_accuracy"]
    capsys.readouterr()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    status, _ = study(tmp_path, "--keep-checkpoints", str(blocked / "kept"))
    assert status == 2
    assert capsys.readouterr().err == (f"error: --keep-checkpoints {blocked}/kept: cannot write "
                                       "there (Not a directory)\n")


def test_cells_recorded_before_a_setting_existed_keep_their_key():
    old = {"config": "c", "model": "m", "norm": "batch", "data_path": None, "global_batch": 64,
           "micro_batch_size": 8, "seed": 0, "epochs": 3, "max_steps": 0, "lr": 0.1}
    assert cell_key(old) == cell_key({**old, "holdout": False})
    assert cell_key(old) != cell_key({**old, "holdout": True})
    # a config that gains label smoothing is a new cell, not one already done
    assert cell_key(old) == cell_key({**old, "label_smoothing": 0.0})
    assert cell_key(old) != cell_key({**old, "label_smoothing": 0.1})


def test_table_shows_mean_and_std_over_seeds():
    runs = [{"data": "digits", "model": "m", "norm": "batch", "global_batch": 64, "epochs": 15,
             "max_steps": 0, "lr": 0.1, "micro_batch_size": 2, "seed": seed, "status": "finished",
             "val_accuracy": value, "command": "python -m benchmarks.accuracy"}
            for seed, value in enumerate([0.5, 0.6, 0.7])]
    runs.append({**runs[0], "seed": 3, "status": "diverged", "val_accuracy": None})
    text = table({"runs": runs})
    assert "60.00 ± 10.00 (3), 1 diverged" in text
    assert "| 0.1 | none | 60.00" in text
    regularised = [{**run, "label_smoothing": 0.1, "mixup_alpha": 0.2, "val_accuracy": 0.9}
                   for run in runs[:1]]
    text = table({"runs": runs + regularised})
    # its own row, after the unregularised one
    assert text.index("| 0.1 | none | 60.00") < text.index(
        "| 0.1 | label smoothing 0.1, mixup 0.2 | 90.00 (1) |")
    grouped = [{**run, "norm": "group", "groups": count, "val_accuracy": value}
               for run, count, value in ((runs[0], None, 0.8), (runs[0], 16, 0.85))]
    text = table({"runs": runs + grouped})
    # a group count set is part of the row: each its own, the model's own count first
    assert text.index("| `group` | 64 |") < text.index("| `group`, 16 groups | 64 |")
    assert "| `group`, 16 groups | 64 | 15 epochs | 0.1 | none | 85.00 (1) |" in text


def test_time_table_gives_each_lengths_minutes_per_run_by_kind_of_norm():
    def run(norm, epochs, seconds):
        return {"data": "d", "model": "m", "norm": norm, "epochs": epochs, "max_steps": 0,
                "wall_seconds": seconds}

    runs = [run("batch", 24, 600), run("sync_batch", 24, 1200), run("group_pn", 24, 660),
            run("layer", 3, 120)]
    lines = time_table({"runs": runs}).splitlines()
    assert lines[2:4] == ["| d | `m` | 3 epochs | – | 2–2 (1) | 0.0 |",
                          "| d | `m` | 24 epochs | 10–20 (2) | 11–11 (1) | 0.7 |"]
    assert "`--jobs 2` on a 2-core machine" in lines[-1]


def test_paired_ci_is_students_t_interval():
    """Mean ± t(0.975, n - 1) x sd / sqrt(n): three differences 0.35, 0.60, 0.85 have sd
    0.25 and t(2 dof) 4.303, so 0.60 ± 0.621; one difference has no interval."""
    from benchmarks.accuracy_results import paired_ci

    mean, low, high = paired_ci([0.35, 0.60, 0.85])
    assert mean == pytest.approx(0.60)
    assert (low, high) == pytest.approx((0.60 - 4.303 * 0.25 / 3 ** 0.5,
                                         0.60 + 4.303 * 0.25 / 3 ** 0.5))
    assert paired_ci([0.4]) == (0.4, 0.4, 0.4)


def test_headline_ranks_norms_by_their_paired_distance_below_the_best_batchnorm():
    def run(norm, micro_batch, seed, value, status="finished"):
        return {"data": "cluttered_digits", "model": "m", "norm": norm, "global_batch": 64,
                "epochs": 24, "micro_batch_size": micro_batch, "seed": seed, "status": status,
                "val_accuracy": value, "split_invariant": norm != "batch",
                "mixup_alpha": 0.2}
    runs = [run("batch", 8, 0, 0.97), run("batch", 8, 1, 0.98),
            run("sync_batch", 8, 0, 0.98), run("sync_batch", 8, 1, 0.99),
            run("group_pn", 8, 0, 0.96), run("group_pn", 8, 1, 0.985),
            run("group_pn", 8, 2, None, status="diverged")]
    lines = headline(runs).splitlines()
    assert lines[2:5] == [
        "| BatchNorm (`sync_batch`) | 64 samples (synchronised over 8 replicas) | mixup 0.2 "
        "| 98.50 ± 0.71 (2) | – |",
        "| BatchNorm (`batch`) | 8 samples (per replica, 8 replicas) | mixup 0.2 "
        "| 97.50 ± 0.71 (2) | 1.00 [1.00, 1.00] |",
        # differences 2.00 and 0.50: standard error 0.75, t(1 dof) 12.706
        "| GroupNorm + Proxy Norm (`group_pn`) | 1 sample | mixup 0.2 "
        "| 97.25 ± 1.77 (2) | 1.25 [-8.28, 10.78] |"]
    assert "24 epochs, seeds 0, 1, 2" in lines[-1]
    assert headline([run("group", 8, 0, None, status="diverged")]) == "No runs yet."
    # a planned row with no finished run yet is shown, last, as such
    planned = [run("batch", 2, 0, None, status=None), run("group_pn", 8, 0, None, status=None)]
    lines = headline(runs, planned).splitlines()
    assert lines[5] == ("| BatchNorm (`batch`) | 2 samples (per replica, 32 replicas) | mixup 0.2 "
                        "| not run yet | – |")
    assert len(lines) == 8


def test_headline_applies_the_budget_rule_to_every_norm_given_the_runs_at_half_the_budget():
    def run(norm, epochs, seed, value):
        return {"data": "cluttered_digits", "model": "m", "norm": norm, "global_batch": 64,
                "epochs": epochs, "micro_batch_size": 8, "seed": seed, "status": "finished",
                "val_accuracy": value, "split_invariant": norm != "batch"}
    runs = [run("batch", 48, 0, 0.975), run("batch", 48, 1, 0.98),
            run("group", 48, 0, 0.97), run("group", 48, 1, 0.976)]
    # batch: -0.10 and +0.20 since 24 epochs, paired by seed; group: seed 1 only
    shorter = [run("batch", 24, 0, 0.976), run("batch", 24, 1, 0.978),
               run("group", 24, 1, 0.97), run("group", 12, 0, 0.5), run("layer", 24, 0, 0.9)]
    lines = headline(runs, budgets=runs + shorter).splitlines()
    assert lines[0].endswith("| since 24 epochs (points) |")
    assert lines[2].endswith("| 97.75 ± 0.35 (2) | – | +0.05 (2) |")
    assert lines[3].endswith("| 97.30 ± 0.42 (2) | 0.45 [-0.19, 1.09] | +0.60 (1) |")
    assert "a norm within 0.3 points had converged at half the budget" in lines[-1]
    # without runs at half the budget there is no such column
    assert "since" not in headline(runs, budgets=runs).splitlines()[0]


def test_recipe_table_is_a_grid_of_recipes_by_norm_with_each_columns_best_in_bold():
    def run(norm, seed, value, mixup=0.0, groups=None, status="finished"):
        return {"data": "cluttered_digits", "model": "m", "norm": norm, "global_batch": 64,
                "epochs": 12, "micro_batch_size": 8, "seed": seed, "status": status,
                "val_accuracy": value, "lr": 0.2, "mixup_alpha": mixup, "groups": groups,
                "holdout": True}
    runs = [run("batch", 0, 0.97), run("batch", 1, 0.96), run("batch", 0, 0.95, mixup=0.4),
            run("group_pn", 0, 0.96), run("group_pn", 0, 0.98, mixup=0.4),
            run("group_pn", 1, None, mixup=0.4, status="diverged"),
            run("group_pn", 0, 0.99, groups=16)]
    lines = recipe_table(runs).splitlines()
    assert lines[0] == "| lr | regularisation | groups | `batch` | `group_pn` |"
    assert lines[2:5] == ["| 0.2 | none | the model's | **96.50 ± 0.71** (2) | 96.00 (1) |",
                          "| 0.2 | none | 16 | – | **99.00** (1) |",
                          "| 0.2 | mixup 0.4 | the model's | 95.00 (1) | 98.00 (1) |"]
    assert "(holdout), `m`, global batch 64, 12 epochs, seeds 0, 1:" in lines[-1]
    assert recipe_table([runs[-2]]) == "No runs yet."


def test_budget_runs_are_the_plans_cells_at_every_length(tmp_path):
    cell = {"config": "c", "model": "m", "norm": "group_pn", "data_path": None,
            "global_batch": 64, "micro_batch_size": 8, "seed": 0, "epochs": 12,
            "max_steps": 0, "lr": 0.2, "holdout": False, "mixup_alpha": 0.2}
    extra = {"data": "d", "status": "finished", "val_accuracy": 0.9, "split_invariant": True}
    longer = {**cell, **extra, "epochs": 24}
    shorter = {**cell, **extra, "epochs": 3, "val_accuracy": 0.5}
    other_recipe = {**longer, "mixup_alpha": 0.0}
    other_seed = {**longer, "seed": 1}
    failed = {**shorter, "seed": 0, "epochs": 6, "status": "diverged", "val_accuracy": None}
    report = {"runs": [longer, shorter, other_recipe, other_seed, failed]}
    assert budget_runs(report, [(cell, {})]) == [longer, shorter]
    path = tmp_path / "error_vs_budget.png"
    plot_error_vs_budget([longer, shorter], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_depth_sweep_pairs_each_norm_with_its_proxy_norm_twin_by_seed():
    def run(model, norm, seed, accuracy_, epochs=6, init=0.2):
        return {"data": "cluttered_digits", "config": f"c_{norm}", "model": model, "norm": norm,
                "seed": seed, "epochs": epochs, "global_batch": 64, "micro_batch_size": 8,
                "max_steps": 0, "lr": 0.2, "mixup_alpha": 0.2, "status": "finished",
                "val_accuracy": accuracy_, "collapse": {
                    "init": {"mean": init, "deepest": 2 * init, "layers": [init]},
                    "end": {"mean": init / 2, "deepest": init, "layers": [init / 2]}}}

    runs = [run("resnet20", "group", 0, 0.90), run("resnet20", "group_pn", 0, 0.95),
            run("resnet20", "group", 1, 0.92), run("resnet20", "group_pn", 1, 0.91),
            run("resnet20", "group", 2, 0.80),  # its group_pn did not finish: no lift
            run("resnet20", "group_pn", 2, 0.99, epochs=12),  # another budget: no partner
            run("resnet56", "group_pn", 0, 0.97, init=0.05)]  # no plain group yet
    sweep = depth_sweep(runs)
    assert list(sweep) == ["resnet20", "resnet56"]  # a depth with no run is absent
    lifts = sweep["resnet20"]["lifts"]
    assert list(lifts) == ["group"] and set(lifts["group"]) == {0, 1}
    assert lifts["group"][0] == pytest.approx(5.0) and lifts["group"][1] == pytest.approx(-1.0)
    assert sweep["resnet56"]["lifts"] == {}
    assert sweep["resnet56"]["collapse"] == {"group_pn": {0: {
        "init": {"mean": 0.05, "deepest": 0.1}, "end": {"mean": 0.025, "deepest": 0.05}}}}
    assert set(sweep["resnet20"]["collapse"]["group"]) == {0, 1, 2}


def sweep_runs(lifts, shares, twin_share=0.03):
    """Finished 6-epoch runs of group and group_pn for each model of `lifts` (model: the
    per-seed lifts in points) with group's initial collapse shares `shares[model]`."""
    runs = []
    for model, by_seed in lifts.items():
        for seed, lift in enumerate(by_seed):
            for norm, accuracy_, share in (("group", 0.9, shares[model][seed]),
                                           ("group_pn", 0.9 + lift / 100, twin_share)):
                runs.append({
                    "data": "cluttered_digits", "config": f"c_{norm}", "model": model,
                    "norm": norm, "seed": seed, "epochs": 6, "global_batch": 64,
                    "micro_batch_size": 8, "max_steps": 0, "lr": 0.2, "mixup_alpha": 0.2,
                    "status": "finished", "val_accuracy": accuracy_, "collapse": {
                        "images": 256, "init": {"mean": share, "deepest": share},
                        "end": {"mean": share, "deepest": share}}})
    return runs


def test_the_depth_table_reads_the_predictions_by_the_pre_registered_rule():
    """Supported: means grow at every depth and the deepest's every seed tops the shallowest's
    every seed; refuted: the deepest's mean is not above the shallowest's; else
    inconclusive; and no reading while a run is missing."""
    from benchmarks.accuracy_tables import depth_table

    models = ("cifar_preact_resnet20", "cifar_preact_resnet56", "cifar_preact_resnet110")
    flat = {model: [0.2, 0.2, 0.2] for model in models}
    growing = dict(zip(models, ([1, 2, 3], [3, 4, 5], [4, 6, 8])))  # 110's 4 > 20's 3
    overlapping = dict(zip(models, ([1, 2, 6], [3, 4, 5], [4, 6, 8])))  # 20's 6 > 110's 4
    shrinking = dict(zip(models, ([3, 4, 5], [3, 3, 3], [1, 2, 3])))
    text = depth_table(sweep_runs(growing, flat), models)
    assert "prediction 2, the lift grows with depth: **supported**" in text
    assert "grows with depth: **refuted**" in text  # the flat shares: 110's mean not above
    assert "than GroupNorm's at every depth: **yes**" in text
    assert "+1.00 / +2.00 / +3.00 (mean +2.00)" in text
    assert "lift grows with depth: **inconclusive**" in depth_table(
        sweep_runs(overlapping, flat), models)
    assert "lift grows with depth: **refuted**" in depth_table(
        sweep_runs(shrinking, flat), models)
    assert "at every depth: **no**" in depth_table(sweep_runs(growing, flat, 0.15), models)
    # the rows come in order of depth, whatever order the runs are in
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(models)
    unfinished = sweep_runs(growing, flat)[:-1]  # ResNet-110 seed 2's group_pn
    assert "Not read against the pre-registered rule yet" in depth_table(unfinished, models)
    assert "| 90.00 / 90.00 / 90.00 | 94.00 / 96.00 / – |" in depth_table(unfinished, models)


def test_bad_micro_batch_is_one_line(tmp_path, capsys):
    status = accuracy.main(["--global-batch", "16", "--micro-batches", "3", "--no-readme",
                            "--output", str(tmp_path / "a.json")])
    assert status == 2
    assert capsys.readouterr().err == ("error: --micro-batches 3 does not divide "
                                       "--global-batch 16\n")
    assert not (tmp_path / "a.json").exists()


def test_other_config_families_are_planned_without_training():
    parser_args = {"configs": None, "norms": ["layer", "group_pn"], "global_batch": 64,
                   "micro_batches": [8, 64], "seeds": [0], "epochs": None, "max_steps": 0,
                   "lr": None, "data_path": "data/cifar10", "engine": None, "threads": 1,
                   "holdout": False, "every_split": True, "label_smoothing": None,
                   "mixup": None, "model": None, "groups": None}
    cells = accuracy.plan(argparse.Namespace(data="cifar10", **parser_args))
    # cifar10_preact_resnet20 has no layer config: its first config with norm overridden
    assert [(c["config"], c["norm"], c["replicas"]) for c, _ in cells] == [
        ("cifar10_preact_resnet20_batch", "layer", 8), ("cifar10_preact_resnet20_batch", "layer", 1),
        ("cifar10_preact_resnet20_group_pn", "group_pn", 8), ("cifar10_preact_resnet20_group_pn", "group_pn", 1)]
    assert all(c["data_path"] == "data/cifar10" for c, _ in cells)
    # once per seed: at the config's micro-batch (16) where the grid has it, else the largest
    cells = accuracy.plan(argparse.Namespace(data="cifar10", **{**parser_args,
                                                                "every_split": False}))
    assert [(c["norm"], c["micro_batch_size"]) for c, _ in cells] == [("layer", 64),
                                                                      ("group_pn", 64)]
    cells = accuracy.plan(argparse.Namespace(
        data="digits", **{**parser_args, "configs": ["cluttered_digits_preact_resnet20_sync_batch"],
                          "data_path": None, "every_split": False, "holdout": True,
                          "lr": [0.1, 0.2], "micro_batches": [2, 8, 64]}))
    assert [(c["data"], c["norm"], c["micro_batch_size"], c["lr"], c["holdout"])
            for c, _ in cells] == [("cluttered_digits", "sync_batch", 8, 0.1, True),
                                   ("cluttered_digits", "sync_batch", 8, 0.2, True)]
    assert all(overrides["bn_group_size"] == 0 and overrides["clutter_holdout"]
               for _, overrides in cells)
    # a regularisation search: a cell per combination, each carried into the run's options
    cells = accuracy.plan(argparse.Namespace(
        data="cluttered_digits", **{**parser_args, "norms": ["group_pn"], "data_path": None,
                                    "every_split": False, "label_smoothing": [0, 0.1],
                                    "mixup": [0.2], "micro_batches": [8]}))
    assert [(c["label_smoothing"], c["mixup_alpha"]) for c, _ in cells] == [(0, 0.2), (0.1, 0.2)]
    assert [(o["label_smoothing"], o["mixup_alpha"]) for _, o in cells] == [(0, 0.2), (0.1, 0.2)]
    assert len({cell_key(c) for c, _ in cells}) == 2
    # a group-count search varies group and group_pn; a norm without a free count runs once
    cells = accuracy.plan(argparse.Namespace(
        data="cluttered_digits", **{**parser_args, "norms": ["batch", "group_pn", "layer"],
                                    "data_path": None, "every_split": False,
                                    "micro_batches": [8], "groups": [8, 16]}))
    assert [(c["norm"], c["groups"], o.get("groups")) for c, o in cells] == [
        ("batch", None, None), ("group_pn", 8, 8), ("group_pn", 16, 16), ("layer", None, None)]
    assert len({cell_key(c) for c, _ in cells}) == 4
    # 0 is the model's own count: the cell of a run without --groups, which it finds again
    cells = accuracy.plan(argparse.Namespace(
        data="cluttered_digits", **{**parser_args, "norms": ["group_pn"], "data_path": None,
                                    "every_split": False, "micro_batches": [8],
                                    "groups": [0, 16]}))
    assert [(c["groups"], o.get("groups")) for c, o in cells] == [(None, None), (16, 16)]
    (own,) = accuracy.plan(argparse.Namespace(
        data="cluttered_digits", **{**parser_args, "norms": ["group_pn"], "data_path": None,
                                    "every_split": False, "micro_batches": [8]}))
    assert cell_key(cells[0][0]) == cell_key(own[0])
    # another model with the same recipe: its own cells, the model carried into the run
    deeper = accuracy.plan(argparse.Namespace(
        data="cluttered_digits", **{**parser_args, "norms": ["group_pn"], "data_path": None,
                                    "every_split": False, "micro_batches": [8],
                                    "model": ["cifar_preact_resnet56"]}))
    ((cell, overrides),) = deeper
    assert (cell["model"], overrides["model"]) == ("cifar_preact_resnet56",) * 2
    # several models: each model's cells before the next model's, in the given order
    sweep = accuracy.plan(argparse.Namespace(
        data="cluttered_digits", **{**parser_args, "norms": ["group", "group_pn"],
                                    "data_path": None, "every_split": False,
                                    "micro_batches": [8], "seeds": [0, 1],
                                    "model": ["cifar_preact_resnet110", "cifar_preact_resnet20"]}))
    assert [(c["model"][len("cifar_preact_"):], c["norm"], c["seed"]) for c, _ in sweep] == [
        (depth, norm, seed) for depth in ("resnet110", "resnet20")
        for norm in ("group", "group_pn") for seed in (0, 1)]
    shipped = accuracy.plan(argparse.Namespace(
        data="cluttered_digits", **{**parser_args, "norms": ["group_pn"], "data_path": None,
                                    "every_split": False, "micro_batches": [8]}))
    assert shipped[0][0]["model"] == "cifar_preact_resnet20"
    assert cell_key(cell) != cell_key(shipped[0][0])


def test_a_failed_run_stops_the_study_with_its_reason(tmp_path, capsys):
    output = tmp_path / "accuracy.json"
    status = accuracy.main(["--data", "cifar10", "--data-path", str(tmp_path / "missing"),
                            "--norms", "group_pn", "--micro-batches", "8", "--seeds", "0",
                            "--jobs", "1", "--no-readme", "--output", str(output)])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cifar10_preact_resnet20_group_pn ") and "DataError" in err
    assert json.loads(output.read_text())["runs"] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_study_ends_its_runs(tmp_path):
    """A study stopped by SIGKILL (no clean-up of its own) leaves no run training on, and
    no worker takes the next cell (a SIGTERM would only stop the current run gracefully)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    study = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.accuracy", "--norms", "batch", "--micro-batches",
         "2", "8", "--global-batch", "16", "--epochs", "200", "--seeds", "0", "1", "2",
         "--jobs", "2", "--no-readme",
         "--output", str(tmp_path / "a.json")], cwd=root, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 120
    while len(children(study.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = children(study.pid)
    assert len(workers) >= 2, "the study started no workers"
    time.sleep(2)  # past the workers' start-up, into their runs
    study.send_signal(signal.SIGKILL)
    study.wait()
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # on failure, no orphan keeps a core busy after the test
        os.kill(pid, signal.SIGKILL)
    assert not left
    assert not list(tmp_path.glob("accuracy-*"))  # their run folders went with them


def test_a_run_killed_from_outside_is_one_line(tmp_path):
    """A worker killed (by a user, or the out-of-memory killer) ends the study with one line,
    no traceback, and the JSON written."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = tmp_path / "a.json"
    study = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.accuracy", "--norms", "batch", "--micro-batches",
         "2", "8", "--global-batch", "16", "--epochs", "200", "--seeds", "0", "1",
         "--jobs", "2", "--no-readme", "--output", str(output)], cwd=root,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)})

    def workers():  # the pool's processes, not its resource tracker
        found = []
        for pid in children(study.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"spawn_main" in f.read():
                        found.append(pid)
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 120
    while len(workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert len(workers()) >= 2, "the study started no workers"
        os.kill(workers()[0], signal.SIGKILL)
        _, err = study.communicate(timeout=120)
    finally:
        study.kill()
        for pid in workers():  # on failure, no orphan keeps a core busy after the test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert study.returncode == 1
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: a run's process ended abruptly (killed, or out of memory); the runs that "
        f"finished are in {output}, and the same command runs the rest")
    assert json.loads(output.read_text())["runs"] == []
