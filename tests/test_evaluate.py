"""train.evaluate: a trained checkpoint loads back as a model, and evaluates to the accuracy
its run recorded."""
import argparse

import pytest
import torch

from tests.test_train import SYNTHETIC, load, plan, train
from train.evaluate import build_parser, load_model, main

RUN = [*SYNTHETIC, *plan(16, 1, 1)]


def test_a_digits_checkpoint_evaluates_to_its_recorded_accuracy(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, "--max-steps", 20, "--log-every", 5) == 0  # digits_resnet_group_pn
    model, info = load_model(run_dir)
    assert not model.training and info["weights"] == "model" and info["step"] == 20
    saved = load(run_dir / "checkpoint_last.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["engine"]["model"][name]), name
    capsys.readouterr()
    assert main([str(run_dir)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{run_dir}/checkpoint_last.pt (step 20, model weights): "
                           f"digits_preact_resnet with group_pn on digits, 360 validation "
                           f"images: top-1 {info['val_accuracy']:.2%}, top-5 ")


def test_the_validated_weights_are_the_average_when_the_run_averages(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, *RUN, "--epochs", 2, "--weight-avg-decay", 0.5) == 0
    model, info = load_model(run_dir)
    assert info["weights"] == "weight_average" and info["val_accuracy"] is not None
    saved = load(run_dir / "checkpoint_last.pt")
    assert saved["val_weights"] == "weight_average"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["weight_average"]["model"][name]), name
    raw, raw_info = load_model(run_dir, weights="model")
    assert raw_info["val_accuracy"] is None  # not the weights the accuracy belongs to
    assert not all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(),
                                                     model.state_dict().values()))


def test_a_foreign_file_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert main([str(junk)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read checkpoint {junk}")


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--batch-size", "-3"], "argument --batch-size: must be at least 1, got -3"),
    (["--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    (["--num-workers", "-1"], "argument --num-workers: must be at least 0, got -1"),
    (["--device", "cuda"], "argument --device: cuda: torch sees no CUDA GPU here; use cpu"),
    (["--device", "banana"], "argument --device: 'banana' is not a device: cpu, cuda or cuda:N"),
    (["--weights", "best"], "argument --weights: invalid choice: 'best' (choose from "
     "'validated', 'model', 'weight_average')"),
])
def test_bad_options_are_one_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path), *flags])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def options_are_documented(parser):
    """Every option has help that gives its default; the description is whole sentences."""
    assert parser.description.rstrip().endswith(".")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.dest
        if action.option_strings:
            assert "(default: " in action.help, action.dest


def test_help_documents_every_option(capsys):
    options_are_documented(build_parser())
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0 and "--num-workers N" in capsys.readouterr().out
