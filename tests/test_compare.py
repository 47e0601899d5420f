"""python -m train.compare: a table and a plot of runs read back from their folders."""
import json

from tests.test_train import SYNTHETIC, plan, train
from train.compare import main

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
