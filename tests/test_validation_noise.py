"""analysis.validation_noise: trained networks on fresh canvases of their validation digits,
the noise split against independent formulas, and one line for a checkpoint it cannot use."""
import json
import math

import pytest
import torch

from analysis import validation_noise
from analysis.validation_noise import analyse, digit_spread
from tests.test_train import train

CLUTTERED = ["--clutter-train-samples", 64, "--clutter-val-samples", 48, "--max-steps", 3,
             "--micro-batch-size", 16, "--gradient-accumulation", 1, "--replicas", 1,
             "--log-every", 1]


@pytest.fixture
def one_thread():
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


def test_networks_are_measured_on_fresh_canvases_of_their_digits(tmp_path, monkeypatch,
                                                                 capsys, one_thread):
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"seed{seed}")
        assert train(runs[-1], *CLUTTERED, "--seed", seed,
                     config="cluttered_digits_preact_resnet20_group") == 0
    monkeypatch.setattr(validation_noise, "CHUNK", 120)  # three streams of fresh canvases
    page = tmp_path / "evidence.md"
    page.write_text("<!-- validation_noise:start -->\n<!-- validation_noise:end -->\n")
    monkeypatch.setattr(validation_noise, "EVIDENCE", str(page))
    output = tmp_path / "noise.json"
    capsys.readouterr()
    assert validation_noise.main([*map(str, runs), "--canvases", "300",
                                  "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    for row in report["runs"]:
        # its own validation set, evaluated here, gives the accuracy its run recorded
        assert row["own"] == pytest.approx(row["recorded"], rel=1e-4) and row["own_canvases"] == 48
        assert row["canvases"] == 300 and row["digits"] == 360
        assert row["binomial_2000"] == pytest.approx(  # the JSON keeps 5 significant digits
            math.sqrt(row["fresh"] * (1 - row["fresh"]) / 2000), rel=1e-4)
    assert [row["seed"] for row in report["runs"]] == [0, 1]
    (pair,) = report["recipes"]  # the two seeds are one recipe
    assert pair["seeds"] == [0, 1] and pair["norm"] == "group"
    assert report["command"] == (f"python -m analysis.validation_noise {runs[0]} {runs[1]} "
                                 f"--canvases 300")
    text = page.read_text()
    assert "| `group` cifar_preact_resnet20, 24 epochs, seed 1 |" in text
    assert "predicted at 10,000" in text and report["command"] in text


def test_a_run_of_other_data_is_one_line(tmp_path, capsys):
    assert train(tmp_path / "digits", "--max-steps", 1) == 0  # digits_resnet_group_pn
    capsys.readouterr()
    assert validation_noise.main([str(tmp_path / "digits"), "--no-readme",
                                  "--output", str(tmp_path / "noise.json")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'digits'}: a digits run; this "
                                       f"analysis is for cluttered_digits\n")
    assert not (tmp_path / "noise.json").exists()


def test_digit_spread_removes_the_binomial_part():
    # 4 digits of 200 canvases each; true accuracies 0.6, 0.8, 0.9, 1.0 drawn without noise
    # (exactly those shares right): their variance less mean a(1-a)/(n-1)
    accuracies = [0.6, 0.8, 0.9, 1.0]
    digits = torch.arange(4).repeat_interleave(200)
    hits = torch.cat([torch.arange(200) < 200 * a for a in accuracies])
    a = torch.tensor(accuracies, dtype=torch.float64)
    expected = a.var() - (a * (1 - a) / 199).mean()
    assert digit_spread(hits, digits) == pytest.approx(math.sqrt(expected))
    # every digit alike: nothing between digits, however noisy the canvases
    alike = torch.rand(4000, generator=torch.Generator().manual_seed(0)) < 0.9
    assert digit_spread(alike, torch.arange(4000) % 4) < 0.01


def test_a_seeds_canvas_part_is_half_the_variance_of_the_per_canvas_difference():
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(5000, generator=generator) < 0.9
    flips = [torch.rand(5000, generator=generator) < rate for rate in (0.02, 0.05, 0.03)]
    config = {"norm": "group", "model": "m", "epochs": 48, "lr": 0.1, "output_dir": "x"}
    runs = [{"path": f"s{seed}", "hits": base ^ flip, "own": base ^ flip, "recorded": None,
             "digits": torch.arange(5000) % 360, "digit_count": 360,
             "config": {**config, "seed": seed, "output_dir": f"runs/{seed}"}}
            for seed, flip in enumerate(flips)]
    runs.append({**runs[0], "config": {**config, "seed": 0, "lr": 0.2}})  # a recipe alone
    report = analyse(runs)
    (row,) = report["recipes"]
    assert row["seeds"] == [0, 1, 2]
    pairs = [(runs[i]["hits"].double() - runs[j]["hits"].double()).var().item()
             for i, j in ((0, 1), (0, 2), (1, 2))]
    assert row["per_canvas"] == pytest.approx(sum(pairs) / 6)
    fresh = torch.tensor([run["hits"].double().mean() for run in runs[:3]])
    training = max(0.0, fresh.var().item() - row["per_canvas"] / 5000)
    assert row["training_std"] == pytest.approx(math.sqrt(training))
    assert row["predicted"]["2000"] == pytest.approx(math.sqrt(training + row["per_canvas"]
                                                               / 2000))
    assert row["predicted"]["2000"] > row["predicted"]["10000"] >= row["training_std"]
