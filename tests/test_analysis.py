"""The evidence tools: power decomposition, batch-dependence probe, checkpoint loading."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import batch_dependence, checkpoint, power
from models import get_model
from proxynorm.norms import get_norm_act


def test_terms_add_up_to_the_power_and_match_an_independent_computation():
    scale = torch.tensor([1.0, 2.0, 0.5])[:, None, None]
    y = torch.randn(5, 3, 4, 6, dtype=torch.float64) * scale + 0.7
    result = power.decompose(y)
    terms = result["terms"]
    # independent: channel statistics over (inputs, positions), instance ones per (n, c)
    instance_mean = y.mean(dim=(2, 3))
    instance_var = y.var(dim=(2, 3), unbiased=False)
    expected = {
        "channel_squared_mean": y.mean(dim=(0, 2, 3)).square().mean(),
        "instance_mean_variance": instance_mean.var(dim=0, unbiased=False).mean(),
        "mean_instance_variance": instance_var.mean(),
        "instance_std_variance": instance_var.sqrt().var(dim=0, unbiased=False).mean(),
    }
    for name, value in expected.items():
        assert terms[name] == pytest.approx(value.item(), rel=1e-12)
    assert result["power"] == pytest.approx(y.square().mean().item(), rel=1e-12)
    assert (terms["channel_squared_mean"] + terms["instance_mean_variance"]
            + terms["mean_instance_variance"]) == pytest.approx(result["power"], rel=1e-12)
    assert (terms["instance_std_variance"] + terms["instance_std_squared_mean"]
            == pytest.approx(terms["mean_instance_variance"], rel=1e-12))
    assert result["shares"]["channel_squared_mean"] == pytest.approx(
        terms["channel_squared_mean"] / result["power"])


def test_known_channel_means_give_the_known_channel_squared_mean():
    # channel c is m_c plus a +-1 checkerboard: every instance has mean m_c and variance 1
    means = torch.tensor([1.0, -2.0, 3.0])
    checkerboard = (torch.arange(4)[:, None] + torch.arange(4)) % 2 * 2.0 - 1.0
    y = means[None, :, None, None] + checkerboard.expand(2, 3, 4, 4)
    terms = power.decompose(y)["terms"]
    assert terms["channel_squared_mean"] == pytest.approx(14 / 3)
    assert terms["instance_mean_variance"] == 0
    assert terms["mean_instance_variance"] == pytest.approx(1.0)
    assert power.decompose(y)["power"] == pytest.approx(14 / 3 + 1)


def test_zero_power_has_no_shares():
    assert power.decompose(torch.zeros(2, 3, 4))["shares"]["channel_squared_mean"] is None


@pytest.mark.parametrize("norm", ["batch", "layer", "group_pn"])
def test_decompose_model_measures_the_pre_activation_of_layers_with_an_activation(norm):
    layer = get_norm_act(norm, 8, groups=2)
    with torch.no_grad():
        layer.weight.normal_(1.0, 0.2)
        layer.bias.normal_(0.0, 0.2)
    no_act = get_norm_act(norm, 8, groups=2, apply_act=False)
    model = nn.Sequential(layer, no_act).train()
    x = torch.randn(6, 8, 5, 5) + 0.5
    results = power.decompose_model(model, x)
    assert [r["layer"] for r in results] == ["0"]  # the norm without an activation is skipped
    if norm == "batch":
        y = F.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
    else:
        y = F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)
    expected = power.decompose(y)
    for name, value in expected["terms"].items():
        assert results[0]["terms"][name] == pytest.approx(value, rel=1e-5, abs=1e-9)


def test_decompose_model_accumulates_over_batches():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), get_norm_act("group_pn", 8, groups=4))
    x = torch.randn(10, 3, 6, 6)
    whole, = power.decompose_model(model, x)
    split, = power.decompose_model(model, x, batch_size=3)
    for name, value in whole["terms"].items():
        assert split["terms"][name] == pytest.approx(value, rel=1e-6, abs=1e-12)


def test_instance_norm_has_zero_variance_of_instance_means():
    images = power.random_inputs("gaussian", 6, 8, seed=0)
    net = power.RandomNet("instance", 3, width=8, depth=3, groups=2).randomise(0).train()
    for layer in power.decompose_model(net, images):
        assert layer["terms"]["instance_mean_variance"] < 1e-12
        assert layer["shares"]["mean_instance_variance"] > 0.5


def test_power_cli_writes_json_and_figure(tmp_path, capsys):
    json_path, figure_path = tmp_path / "power.json", tmp_path / "power.png"
    power.main(["--width", "8", "--depth", "3", "--size", "8", "--images", "6", "--threads", "1",
                "--json", str(json_path), "--figure", str(figure_path)])
    report = json.loads(json_path.read_text())
    assert list(report["norms"]) == list(power.NORMS)
    assert [r["depth"] for r in report["norms"]["layer_pn"]] == [1, 2, 3]
    assert figure_path.read_bytes()[:4] == b"\x89PNG"


def probe_inputs(batch_size, trials=2):
    return torch.randn(1 + (trials + 1) * (batch_size - 1), 1, 16, 16)


@pytest.mark.parametrize("norm", ["group_pn", "layer_pn", "group"])
def test_batch_independent_norms_do_not_depend_on_the_batch(norm):
    model = get_model("digits_resnet", norm=norm, num_classes=10, in_channels=1)
    result = batch_dependence.probe_model(model, probe_inputs(4), batch_size=4)
    assert result["train"] <= 1e-6 and result["eval"] <= 1e-6


def test_batchnorm_depends_on_the_batch_in_train_mode_only():
    model = get_model("digits_resnet", norm="batch", num_classes=10, in_channels=1)
    result = batch_dependence.probe_model(model, probe_inputs(4), batch_size=4)
    assert result["train"] > 1e-3
    assert result["eval"] <= 1e-6


def test_batch_dependence_cli(tmp_path, capsys):
    json_path = tmp_path / "dependence.json"
    batch_dependence.main(["--model", "digits_resnet", "--norms", "batch", "group_pn",
                           "--resolution", "16", "--batch-size", "3", "--trials", "1",
                           "--threads", "1", "--json", str(json_path)])
    report = json.loads(json_path.read_text())
    assert report["relative_change"]["group_pn"] == {"train": 0.0, "eval": 0.0}
    assert report["relative_change"]["batch"]["train"] > 0
    assert "group_pn" in capsys.readouterr().out


def save_checkpoint(path, state_key, norm="group_pn"):
    model = get_model("digits_resnet", norm=norm, num_classes=10, in_channels=1)
    config = {"model": "digits_resnet", "norm": norm, "groups": None, "act": None,
              "data": "digits"}
    state = {"model": model.state_dict()}
    torch.save({"config": config, **({"engine": state} if state_key == "engine" else state)}, path)
    return model.eval()


@pytest.mark.parametrize("state_key", ["model", "engine"])
def test_checkpoint_loads_the_trained_model(tmp_path, state_key):
    path = tmp_path / "checkpoint.pt"
    original = save_checkpoint(path, state_key)
    model, config = checkpoint.load(str(path))
    x = torch.randn(2, 1, 16, 16)
    assert config["norm"] == "group_pn" and not model.training
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(str(tmp_path / "missing.pt"))
    torch.save({"model": {}}, tmp_path / "bad.pt")
    with pytest.raises(checkpoint.CheckpointError, match="'model' and 'norm'"):
        checkpoint.load(str(tmp_path / "bad.pt"))


def test_power_cli_on_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, "engine", norm="batch")
    json_path = tmp_path / "power.json"
    power.main(["--checkpoint", str(path), "--images", "8", "--threads", "1",
                "--json", str(json_path),
                "--figure", str(tmp_path / "power.png")])
    report = json.loads(json_path.read_text())
    layers = report["norms"]["batch"]
    assert report["setting"]["images"] == 8 and layers[0]["layer"] == "bn1"


def test_reruns_that_differ_by_float_noise_write_the_same_file(tmp_path):
    """make analysis rewrites tracked JSON: noise below 5 significant digits changes nothing."""
    from benchmarks.measure import write_json

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_json(first, {"x": [0.123456789, 3], "y": {"z": 1e-9 / 3}}, significant=5)
    write_json(second, {"x": [0.123456781, 3], "y": {"z": 1.0000001e-9 / 3}}, significant=5)
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(first.read_text()) == {"x": [0.12346, 3], "y": {"z": 3.3333e-10}}


def test_init_collapse_measures_the_studys_network_with_its_branches_zeroed_or_not(monkeypatch):
    """Zeroed, the network is the study's run's model at step 0 and the first stage's
    blocks, identities, all see the stem's output; not zeroed, only the branches' last
    convolutions differ and each block changes what the next one sees."""
    from analysis import init_collapse

    monkeypatch.setattr(init_collapse, "COLLAPSE_IMAGES", 64)
    zeroed, images = init_collapse.build("cifar_preact_resnet20", "group", 1, True)
    kept, _ = init_collapse.build("cifar_preact_resnet20", "group", 1, False)
    assert len(images) == 64
    torch.manual_seed(1)  # the run's seed, then its model, as test_accuracy checks the study
    study = get_model("cifar_preact_resnet20", norm="group", num_classes=10, in_channels=1)
    assert all(torch.equal(value, zeroed.state_dict()[key])
               for key, value in study.state_dict().items())
    last_convs = {f"layer{stage}.{block}.conv2.weight" for stage in (1, 2, 3) for block in range(3)}
    for key, value in kept.state_dict().items():
        if key in last_convs:
            assert not zeroed.state_dict()[key].any() and value.abs().sum() > 0
        else:
            assert torch.equal(value, zeroed.state_dict()[key]), key

    def first_stage(row):
        share = dict(zip(row["layers"], row["shares"]))
        return [share[f"layer1.{block}.bn1"] for block in range(3)]

    row = init_collapse.measure("cifar_preact_resnet20", "group", 1, True)
    assert first_stage(row)[0] == first_stage(row)[1] == first_stage(row)[2] > 0
    assert row["mean"] == pytest.approx(sum(row["shares"]) / len(row["shares"]))
    row = init_collapse.measure("cifar_preact_resnet20", "group", 1, False)
    assert len(set(first_stage(row))) == 3
    # BatchNorm in train mode, statistics per replica micro-batch: each channel's mean over
    # the images is its shift, zero at initialisation
    row = init_collapse.measure("cifar_preact_resnet20", "batch", 1, False)
    assert max(row["shares"]) < 1e-12
