"""python -m train.compare: a table and a plot of runs read back from their folders."""
import json
import os
import shutil

import pytest

from tests.test_evaluate import options_are_documented
from tests.test_train import SYNTHETIC, plan, train
from train.compare import build_parser, figure, main, read_run
from train.metrics import read_records

RUN = [*SYNTHETIC, *plan(16, 1, 1)]


def test_compare_tables_and_plots_runs(tmp_path, capsys):
    for seed in (0, 1):
        assert train(tmp_path / f"seed{seed}", *RUN, "--epochs", 2, "--seed", seed) == 0
    # a run that crashed before its summary: shown from its metrics
    assert train(tmp_path / "crashed", *RUN, "--epochs", 2, "--max-steps", 4) == 0
    (tmp_path / "crashed" / "summary.json").unlink()
    capsys.readouterr()
    plot = tmp_path / "curves.png"
    assert main([str(tmp_path / "seed*"), str(tmp_path / "crashed"), "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "config", "model", "norm"]
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"seed0", "seed1", "crashed"}
    summary = json.loads((tmp_path / "seed1" / "summary.json").read_text())
    assert f"{100 * summary['val_accuracy']:.2f}" in rows["seed1"]
    assert "16 x 1 x 1" in rows["seed1"] and " finished " in rows["seed1"]
    assert "running or stopped" in rows["crashed"] and " 4 " in rows["crashed"]
    assert lines[-1] == f"validation curves: {plot}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'} is not a run folder (no " \
                                      f"config.yml)\n"


@pytest.fixture(scope="module")
def two_batches(tmp_path_factory):
    """Two 2-epoch runs of 64 images, at global batches of 16 (4 steps an epoch) and 8 (8),
    in runs/ of a folder of their own."""
    root = tmp_path_factory.mktemp("compare")
    for batch in (16, 8):
        assert train(root / "runs" / f"batch{batch}", *SYNTHETIC, *plan(batch, 1, 1),
                     "--epochs", 2) == 0
    return root


def test_the_plot_goes_beside_the_runs(two_batches, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where the runs are
    runs = two_batches / "runs"
    assert main([str(runs / "batch*")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"validation curves: {runs / 'compare.png'}"
    assert (runs / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == []
    monkeypatch.chdir(two_batches)  # shown as given when it is below here
    assert main(["runs/batch16", "runs/batch8"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "validation curves: runs/compare.png"


@pytest.mark.parametrize("x_axis, batch16, batch8, label", [
    ("epochs", [1, 2], [1, 2], "epochs"),
    ("samples", [64, 128], [64, 128], "training samples"),
    ("steps", [4, 8], [8, 16], "optimiser steps"),
])
def test_curves_compare_runs_of_different_global_batches(two_batches, x_axis, batch16, batch8,
                                                         label):
    runs = [read_run(str(two_batches / "runs" / f"batch{b}")) for b in (16, 8)]
    drawn = figure(runs, x_axis)
    accuracy_axis, loss_axis = drawn.axes
    assert [list(line.get_xdata()) for line in accuracy_axis.lines] == [batch16, batch8]
    assert [list(line.get_xdata()) for line in loss_axis.lines] == [batch16, batch8]
    assert accuracy_axis.get_xlabel() == loss_axis.get_xlabel() == label
    assert loss_axis.get_yscale() == "log"
    assert drawn._suptitle.get_text() == "Validation of 2 runs (digits_resnet_group_pn)"


def copy_run(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.pt", ".lock"))
    return target


@pytest.mark.parametrize("damage, problem", [
    (lambda s: [s], "summary.json is not a run's summary (a JSON object)"),
    (lambda s: {**s, "val_accuracy": "0.5"}, "summary.json: val_accuracy '0.5' is not a number"),
    (lambda s: {**s, "best_val_accuracy": None, "train_images_per_second": "fast"},
     "summary.json: train_images_per_second 'fast' is not a number"),
    (lambda s: {**s, "status": 3}, "summary.json: status 3 is not a word"),
])
def test_a_damaged_summary_is_one_line(two_batches, tmp_path, capsys, damage, problem):
    run = copy_run(two_batches / "runs" / "batch16", tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(damage(summary)))
    assert main([str(run), "--plot", str(tmp_path / "curves.png")]) == 2
    assert capsys.readouterr().err == f"error: {run / problem}\n"


def test_a_run_config_that_expands_without_bound_is_one_line(two_batches, tmp_path, capsys):
    """config.yml is read with the trainer's bounded YAML loader: nested aliases that would
    expand past its bound (here to 111,110 values; 9 levels took 1.4 GB) are one line."""
    run = copy_run(two_batches / "runs" / "batch16", tmp_path / "run")
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 5)]
    (run / "config.yml").write_text("\n".join(levels) + "\n")
    assert main([str(run), "--plot", str(tmp_path / "curves.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read run folder {run}: ") and err.count("\n") == 1


def test_damaged_records_are_left_out(two_batches, tmp_path, capsys):
    """Records without a step, with an accuracy that is not a number, or lines that are not
    UTF-8 are left out of the table and the curves."""
    run = copy_run(two_batches / "runs" / "batch16", tmp_path / "run")
    (run / "summary.json").unlink()  # the table reads the last record
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    val = json.loads(lines[-1])
    extra = [json.dumps({**val, "step": 9, "val_accuracy": "0.99"}) + "\n",
             json.dumps({key: value for key, value in val.items() if key != "step"}) + "\n"]
    (run / "metrics.jsonl").write_bytes(b"".join(lines) + b"\xff\xfe{}\n"
                                        + "".join(extra).encode())
    assert read_records(str(run / "metrics.jsonl"))[:len(lines)] == [
        json.loads(line) for line in lines]
    assert main([str(run), "--plot", str(tmp_path / "curves.png")]) == 0
    out, err = capsys.readouterr()
    assert err == (f"warning: {run}: 2 validation record(s) without a step, an accuracy in "
                   f"0..1 or a loss left out\n")
    assert f" {100 * val['val_accuracy']:.2f} " in out.splitlines()[2]
    assert [line.get_xdata()[-1] for line in figure([read_run(str(run))]).axes[0].lines] == [2]


def test_help_documents_every_option(capsys):
    options_are_documented(build_parser())
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "PNG." in " ".join(out.split())
    with pytest.raises(SystemExit) as exit:
        main(["run", "--x", "hours"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: argument --x: invalid choice: 'hours' (choose "
                                       "from 'epochs', 'samples', 'steps')\n")
