"""The accuracy study: a tiny grid's JSON and table, and skipping of finished cells (never its
accuracies or timings)."""
import argparse
import json

import pytest
import torch

from benchmarks import accuracy


@pytest.fixture(autouse=True)
def threads():
    """The runs set torch's thread count: give the next tests theirs back."""
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


def study(tmp_path, *flags):
    output = tmp_path / "accuracy.json"
    status = accuracy.main(["--norms", "group_pn", "--global-batch", "16", "--micro-batches",
                            "2", "8", "--seeds", "0", "--max-steps", "2", "--jobs", "1",
                            "--no-readme", "--output", str(output), *flags])
    return status, json.loads(output.read_text())


def test_tiny_grid_writes_its_cells_and_a_table(tmp_path, capsys):
    status, report = study(tmp_path)
    assert status == 0
    cells = sorted((run["norm"], run["micro_batch_size"], run["replicas"], run["seed"])
                   for run in report["runs"])
    assert cells == [("group_pn", 2, 8, 0), ("group_pn", 8, 2, 0)]
    for run in report["runs"]:
        assert run["config"] == "digits_resnet_group_pn" and run["global_batch"] == 16
        assert run["status"] == "max_steps" and run["steps"] == 2
        assert 0 <= run["val_accuracy"] <= 1
        assert run["recipe"]["cpu_threads"] == 1
        assert run["command"].startswith("python -m benchmarks.accuracy --norms group_pn")
        assert "--no-readme" not in run["command"] and "--output" not in run["command"]
    text = accuracy.table(report)
    assert "| micro-batch 2 | micro-batch 8 |" in text
    assert "| digits | `digits_resnet` | `group_pn` | 16 |" in text
    assert "`python -m benchmarks.accuracy --norms group_pn" in text
    assert "1 CPU thread(s) per run" in text
    assert text in capsys.readouterr().out


def test_finished_cells_are_skipped_and_a_partial_grid_is_finished(tmp_path, capsys):
    study(tmp_path, "--micro-batches", "8")
    capsys.readouterr()
    _, report = study(tmp_path)  # micro-batch 8 is in the JSON: only 2 runs
    out = capsys.readouterr().out
    assert "2 cells, 1 already in" in out and "1 to run" in out
    assert sorted(run["micro_batch_size"] for run in report["runs"]) == [2, 8]
    _, again = study(tmp_path)
    assert "0 to run" in capsys.readouterr().out
    assert again["runs"] == report["runs"]
    _, rerun = study(tmp_path, "--no-resume", "--micro-batches", "8")
    assert "1 to run" in capsys.readouterr().out
    assert sorted(run["micro_batch_size"] for run in rerun["runs"]) == [2, 8]  # replaced


def test_table_shows_mean_and_std_over_seeds():
    runs = [{"data": "digits", "model": "m", "norm": "batch", "global_batch": 64, "epochs": 15,
             "max_steps": 0, "lr": 0.1, "micro_batch_size": 2, "seed": seed, "status": "finished",
             "val_accuracy": value, "command": "python -m benchmarks.accuracy"}
            for seed, value in enumerate([0.5, 0.6, 0.7])]
    runs.append({**runs[0], "seed": 3, "status": "diverged", "val_accuracy": None})
    text = accuracy.table({"runs": runs})
    assert "60.00 ± 10.00 (3), 1 diverged" in text


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
                   "lr": None, "data_path": "data/cifar10", "engine": None, "threads": 1}
    cells = accuracy.plan(argparse.Namespace(data="cifar10", **parser_args))
    # cifar10_resnet20 has no layer config: its first config with norm overridden
    assert [(c["config"], c["norm"], c["replicas"]) for c, _ in cells] == [
        ("cifar10_resnet20_batch", "layer", 8), ("cifar10_resnet20_batch", "layer", 1),
        ("cifar10_resnet20_group_pn", "group_pn", 8), ("cifar10_resnet20_group_pn", "group_pn", 1)]
    assert all(c["data_path"] == "data/cifar10" for c, _ in cells)
    cells = accuracy.plan(argparse.Namespace(
        data="digits", **{**parser_args, "configs": ["cluttered_digits_resnet20_sync_batch"],
                          "data_path": None}))
    assert {(c["data"], c["norm"]) for c, _ in cells} == {("cluttered_digits", "sync_batch")}
    assert all(overrides["bn_group_size"] == 0 for _, overrides in cells)


def test_a_failed_run_stops_the_study_with_its_reason(tmp_path, capsys):
    output = tmp_path / "accuracy.json"
    status = accuracy.main(["--data", "cifar10", "--data-path", str(tmp_path / "missing"),
                            "--norms", "group_pn", "--micro-batches", "8", "--seeds", "0",
                            "--jobs", "1", "--no-readme", "--output", str(output)])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cifar10_resnet20_group_pn ") and "DataError" in err
    assert json.loads(output.read_text())["runs"] == []
