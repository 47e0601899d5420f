"""train/config.py: configs.yml + flags merged and validated in one place, one-line errors."""
import pytest
import yaml

from train.build import parse_command_line, resolve_config
from train.config import (CONFIGS_PATH, DEFAULT_CONFIG, OPTIONS, ConfigError, build_parser,
                          config_names, load_configs)


def write_configs(tmp_path, text):
    path = tmp_path / "configs.yml"
    path.write_text(text)
    return str(path)


def test_every_config_resolves_and_the_default_exists():
    configs = load_configs()
    names = config_names(configs)
    assert DEFAULT_CONFIG in names
    for name in names:
        config = resolve_config(name, configs=configs)
        assert list(config) == list(OPTIONS) and config["config"] == name


def test_required_configs_exist():
    names = set(config_names(load_configs()))
    norms = ("batch", "sync_batch", "group", "layer", "instance", "group_pn", "layer_pn", "none")
    assert {f"digits_resnet_{norm}" for norm in norms} <= names
    for depth in (20, 56):
        assert {f"cifar10_preact_resnet{depth}_{n}"
                for n in ("batch", "group", "group_pn", "layer_pn")} <= names
    assert {f"resnet50_{n}" for n in ("batch", "sync_batch", "group")} <= names
    assert {f"resnet50v2_{n}" for n in ("group_pn", "layer_pn")} <= names
    assert {f"resnext50v2_32x4d_{n}" for n in ("group_pn", "layer_pn")} <= names
    for b in (0, 1, 2):
        for g in (1, 16):
            assert {f"efficientnet_b{b}_g{g}_{n}" for n in ("group", "layer_pn")} <= names


def test_proxy_norm_configs_train_models_where_it_covers_every_activation():
    """A v1 ResNet's ReLU after each add has no norm before it; Proxy Norm configs use the
    pre-activation ResNets (or EfficientNet, whose every activation follows a norm)."""
    from models import efficientnet, preact_resnet
    covered = {*preact_resnet.IMAGENET_ARCHS, *preact_resnet.SMALL_ARCHS, *efficientnet.ARCHS}
    configs = load_configs()
    proxy = [resolve_config(name, configs=configs) for name in config_names(configs)]
    proxy = [config for config in proxy if config["norm"] in ("group_pn", "layer_pn")]
    assert len(proxy) > 10 and all(config["model"] in covered for config in proxy)


def test_efficientnet_recipe():
    config = resolve_config("efficientnet_b0_g16_layer_pn")
    global_batch = config["micro_batch_size"] * config["gradient_accumulation"] * config["replicas"]
    assert config["lr"] == pytest.approx(2 ** -14 * global_batch)
    assert (config["optimizer"], config["lr_schedule"], config["lr_decay"]) == \
        ("rmsprop", "exponential", 0.97)
    assert (config["warmup_epochs"], config["label_smoothing"], config["weight_avg_decay"]) == \
        (5, 0.1, 0.97)
    assert config["drop_path_rate"] == pytest.approx(1 - 0.8) and config["drop_rate"] > 0
    assert config["mixup_alpha"] > 0 and config["group_dim"] == 16 and config["engine"] == "ipu"


def test_yaml_anchors_are_shared_and_overridden(tmp_path):
    path = write_configs(tmp_path,
                         "_base: &base {lr: 0.5, epochs: 3}\nmine: {<<: *base, epochs: 4}\n")
    config = resolve_config("mine", path=path)
    assert (config["lr"], config["epochs"]) == (0.5, 4)
    with pytest.raises(ConfigError, match="unknown config '_base'"):
        resolve_config("_base", path=path)  # bases are not configs


def test_flags_override_the_config():
    config, _ = parse_command_line(["--config", "digits_resnet_group_pn", "--lr", "1e-3",
                                    "--epochs", "2", "--nesterov", "false", "--groups", "none",
                                    "--pipeline-splits", "layer1,layer2", "--skip-corrupt-images",
                                    "--adam-betas", "[0.8, 0.9]"])
    assert config["lr"] == 1e-3 and config["epochs"] == 2 and config["nesterov"] is False
    assert config["groups"] is None and config["pipeline_splits"] == ["layer1", "layer2"]
    assert config["skip_corrupt_images"] is True and config["adam_betas"] == [0.8, 0.9]
    assert config["norm"] == "group_pn"  # from configs.yml


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "0.1"], "unknown option --lrr (did you mean --lr?)"),
    (["--micro-batch", "4"], "did you mean --micro-batch-size?"),
    (["--config", "digits_resnet_gruop_pn"],
     "unknown config 'digits_resnet_gruop_pn' (did you mean 'digits_resnet_group_pn'?); configs: "),
    (["--epochs", "two"], "--epochs expects an integer, got 'two'"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--momentum", "1.5"], "--momentum must be >= 0 and < 1, got 1.5"),
    (["--nesterov", "maybe"], "--nesterov expects true or false"),
    (["--optimizer", "adam"],
     "--optimizer: 'adam' is not one of sgd, rmsprop, adamw (did you mean 'adamw'?)"),
    (["--norm", "group_np"], "unknown norm 'group_np' (did you mean 'group_pn'?)"),
    (["--model", "resnet51"], "unknown model 'resnet51' (did you mean 'resnet50'?)"),
    (["--adam-betas", "[0.9]"], "--adam-betas expects a list of 2 values"),
    (["--epochs"], "argument --epochs: expected one argument"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_flags_raise_one_line(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_command_line(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("c: {lrr: 0.1}\n", "config 'c': unknown key lrr (did you mean lr?)"),
    ("c: {epochs: 1.5}\n", "configs.yml 'c': epochs expects an integer, got '1.5'"),
    ("c: {precision: 16.16}\n",
     "precision expects a string, got the number 16.16 (quote it in YAML)"),
    ("c: {warmup_epochs: -1}\n", "warmup_epochs must be >= 0, got -1"),
    ("c: {lr_schedule: step}\n", "lr_schedule step needs lr_milestones"),
    ("c: {norm: sync_batch, replicas: 4, bn_group_size: 3}\n",
     "bn_group_size 3 does not divide replicas 4"),
    ("c: [1, 2\n", "invalid YAML"),
    ("c: {lr: .nan}\n", "configs.yml 'c': lr expects a finite number, got 'nan'"),
    ("c: {lr: 1.0e+308}\n", "configs.yml 'c': lr must be at most 3.402823e+38 in magnitude"),
])
def test_bad_configs_raise_one_line(tmp_path, text, message):
    path = write_configs(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        resolve_config("c", path=path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_yaml_scientific_notation_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float option still takes it
    path = write_configs(tmp_path, "c: {weight_decay: 1e-4}\n")
    assert resolve_config("c", path=path)["weight_decay"] == 1e-4


def test_help_lists_every_option_with_its_default():
    text = build_parser().format_help()
    for option in OPTIONS.values():
        assert option.flag in text
    assert "(default: group_pn)" in text and "--list-configs" in text


def test_list_configs():
    config, list_configs = parse_command_line(["--list-configs"])
    assert list_configs and config is None


def test_configs_path_is_the_repository_file():
    assert CONFIGS_PATH.endswith("configs.yml")


def test_options_page_is_the_option_table():
    """docs/options.md is generated from the option table, byte for byte: a help text,
    default, bound or role changed in train/config.py shows there."""
    import os

    from train.config import options_markdown

    page = os.path.join(os.path.dirname(CONFIGS_PATH), "docs", "options.md")
    with open(page, "rb") as f:
        text = f.read()
    assert text == options_markdown().encode(), \
        "docs/options.md is out of date: run `make docs` (python -m train.config --markdown " \
        "docs/options.md)"


# What resuming did with each option before roles replaced the two lists (MODEL_KEYS and
# train.checkpoint.BOOKKEEPING): every other option warned.
MUST_MATCH = ("model", "norm", "groups", "act", "group_dim", "expand_ratio", "data",
              "synthetic_num_classes")
FREE_ON_RESUME = {"config", "output_dir", "resume", "epochs", "max_steps", "validation",
                  "checkpoint_every", "log_every", "wandb_mode", "wandb_project", "data_path",
                  "num_workers", "skip_corrupt_images", "cpu_threads", "executable_cache_dir",
                  "compile_only", "device_memory_mb", "collective_timeout", "compile",
                  "compile_mode"}


def test_every_option_has_a_role_and_resume_treats_each_as_before():
    """A new option must say what a change of it does to a resumed run; a changed key is
    refused (model), allowed with a warning (compute) or allowed (bookkeeping)."""
    from train.checkpoint import CheckpointError, check_compatible
    from train.config import ROLES, with_role

    assert {name: option.role for name, option in OPTIONS.items()
            if option.role not in ROLES} == {}
    assert with_role("model") == MUST_MATCH  # in this order in the refusal's line
    assert set(with_role("bookkeeping")) == FREE_ON_RESUME
    saved = {"config": resolve_config(overrides={"data": "synthetic"})}
    for key in OPTIONS:
        config = {**saved["config"], key: "changed"}
        if key in MUST_MATCH:
            with pytest.raises(CheckpointError, match=f"from another model: {key} "):
                check_compatible(saved, config, "c.pt")
        else:
            assert check_compatible(saved, config, "c.pt") == (
                [] if key in FREE_ON_RESUME else [key]), key


def main_error(capsys, argv):
    """The one stderr line of `python -m train ARGV`, which must exit with status 2."""
    from train.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):-1]


def test_collective_timeout_option(capsys):
    assert resolve_config()["collective_timeout"] == 300
    config, _ = parse_command_line(["--collective-timeout", "5"])
    assert config["collective_timeout"] == 5
    assert main_error(capsys, ["--collective-timeout", "0"]) == \
        "--collective-timeout must be >= 1 and <= 1000000000, got 0"
    assert main_error(capsys, ["--collective-timeout", "1.5"]) == \
        "--collective-timeout expects an integer, got '1.5'"


def test_seeds_are_within_what_torch_accepts(capsys):
    for flag in ("--seed", "--clutter-seed"):
        config, _ = parse_command_line([flag, str(2 ** 63 - 1)])
        assert config[flag[2:].replace("-", "_")] == 2 ** 63 - 1
        assert main_error(capsys, [flag, str(2 ** 64)]) == \
            f"{flag} must be >= 0 and <= 9223372036854775807, got 18446744073709551616"


@pytest.mark.parametrize("name", [name for name, option in OPTIONS.items()
                                  if float in (option.kind, option.item)])
@pytest.mark.parametrize("value, shown", [("inf", None), ("-inf", None), ("nan", None),
                                          ("1e308", "1e+308")])
def test_float_options_refuse_what_float32_cannot_hold(capsys, name, value, shown):
    """Non-finite numbers, and finite ones that overflow float32 in the optimiser (an lr of
    1e308 stopped the first step with a traceback)."""
    option = OPTIONS[name]
    text = f"[{value}, {value}]" if option.kind is list else value
    message = main_error(capsys, [f"{option.flag}={text}"])
    if shown is None:
        assert message == f"{option.flag} expects a finite number, got '{value}'"
    else:
        shown = f"[{shown}, {shown}]" if option.kind is list else shown
        assert message == (f"{option.flag} must be at most 3.402823e+38 in magnitude (the "
                           f"largest float32), got {shown}")


@pytest.mark.parametrize("entry, message", [
    ("model: null", "configs.yml 'c': model must be set (it cannot be null)"),
    ("norm: 5", "configs.yml 'c': norm expects a string, got the number 5 (quote it in YAML)"),
    ("replicas: two", "configs.yml 'c': replicas expects an integer, got 'two'"),
])
def test_list_configs_names_a_config_with_a_bad_shown_value(tmp_path, monkeypatch, capsys,
                                                            entry, message):
    import functools

    import train.__main__
    from train.config import describe_configs

    path = write_configs(tmp_path, f"ok: {{model: resnet50}}\nc: {{{entry}}}\n")
    monkeypatch.setattr(train.__main__, "describe_configs",
                        functools.partial(describe_configs, path=path))
    assert main_error(capsys, ["--list-configs"]) == message


def test_list_configs_shows_every_config(tmp_path):
    from train.config import describe_configs

    path = write_configs(tmp_path, "a: {model: resnet50, replicas: 4}\nb: {}\n_base: {}\n")
    header, *lines = describe_configs(path=path)
    assert len(lines) == 2 and lines[0].split()[:2] == ["a", "resnet50"]
    assert "global batch 128 (32 x 1 x 4)" in lines[0]
    # the header says what the columns and the three factors are
    assert header.split()[:4] == ["config", "model", "norm", "data"]
    assert header.endswith("global batch (micro_batch_size x gradient_accumulation x replicas), "
                           "engine")
    assert header.index("model") == lines[0].index("resnet50")


def test_a_config_file_of_your_own(tmp_path, capsys, monkeypatch):
    """--config PATH.yml: a flat mapping over a named config (or the defaults), checked as
    configs.yml is; --print-config shows the result; --help shows its values."""
    from train.__main__ import main

    mine = tmp_path / "mine.yml"
    mine.write_text("config: cluttered_digits_preact_resnet20_group_pn\nlr: 0.05\n")
    config = resolve_config(str(mine), {"seed": "3"})
    assert (config["lr"], config["seed"], config["model"], config["mixup_alpha"]) == \
        (0.05, 3, "cifar_preact_resnet20", 0.2)
    assert main(["--config", str(mine), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == {**config, "seed": 0}
    mine.write_text("lr: 0.05\nweight_dekay: 0.1\n")
    assert main_error(capsys, ["--config", str(mine)]) == \
        "mine.yml: unknown key weight_dekay (did you mean weight_decay?)"
    mine.write_text("config: cluttered_digits_preact_resnet20_group\nlr: fast\n")
    assert main_error(capsys, ["--config", str(mine)]).startswith("mine.yml: lr ")
    mine.write_text("config: clutered_digits_preact_resnet20_group_pn\n")
    assert main_error(capsys, ["--config", str(mine)]) == (
        f"{mine}: unknown config 'clutered_digits_preact_resnet20_group_pn' (did you "
        f"mean 'cluttered_digits_preact_resnet20_group_pn'?)")
    assert main_error(capsys, ["--config", str(tmp_path / "missing.yml")]) == \
        f"--config {tmp_path / 'missing.yml'}: no such file"
    with pytest.raises(SystemExit):
        main(["--config", "cluttered_digits_preact_resnet20_group_pn", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.2; >= 0)" in help_text and \
        "cluttered_digits_preact_resnet20_group_pn's values" in help_text


def test_a_run_of_a_config_file_is_named_after_it(tmp_path, monkeypatch):
    from train.config import run_name

    assert run_name({"config": "dir/mine.yml"}) == "mine"
    assert run_name({"config": "digits_resnet_batch"}) == "digits_resnet_batch"


def nested_aliases(levels):
    """lr: a list whose aliases nest `levels` deep, each of 9: 9**levels values."""
    items = ["&l0 [" + ", ".join(["1"] * 9) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return f"lr: [{', '.join(items)}]\n"


def test_yaml_aliases_cannot_expand_without_bound(tmp_path, capsys):
    """Aliases of aliases multiply: 9 levels of 9 in 337 bytes printed a 1.4 GB line after
    1 min 45 s (10 levels ran out of memory); 6 levels are half a million values. What a file
    expands to is counted before anything is built or printed; configs.yml keeps its
    anchors, and a recursive alias is refused as well."""
    mine = tmp_path / "mine.yml"
    for levels in (6, 9):
        mine.write_text(nested_aliases(levels))
        assert main_error(capsys, ["--config", str(mine)]) == (
            f"{mine}: its aliases expand to more than 50000 values (aliases of aliases "
            f"multiply); a config needs far fewer")
    mine.write_text("lr: &a [1, *a]\n")
    assert main_error(capsys, ["--config", str(mine)]) == \
        f"{mine} line 1: an alias inside the value it names (a recursive alias)"
    assert main_error(capsys, ["--lr-milestones", "[&a [1, 2], *a]"]) == \
        "--lr-milestones expects a finite number, got '[1, 2]'"
    configs = load_configs()  # shares settings through anchors: loads as before
    assert configs == yaml.safe_load(open(CONFIGS_PATH))


def test_a_key_given_twice_is_one_line(tmp_path, capsys):
    """YAML keeps the last of two equal keys, silently; a merge (<<) still overrides."""
    mine = tmp_path / "mine.yml"
    mine.write_text("lr: 0.1\nepochs: 2\nlr: 0.2\n")
    with pytest.raises(ConfigError) as error:  # (not main(): the old code trained with lr 0.2)
        parse_command_line(["--config", str(mine)])
    assert str(error.value) == \
        f"{mine} line 3: key lr appears twice in one mapping (lines 1 and 3); give it once"
    path = write_configs(tmp_path, "_b: &b {lr: 1}\nc: {<<: *b, lr: 2}\nc: {lr: 3}\n")
    with pytest.raises(ConfigError) as error:
        resolve_config("c", path=path)
    assert str(error.value) == \
        f"{path} line 3: key c appears twice in one mapping (lines 2 and 3); give it once"


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """A file starting with UTF-16's byte-order mark \\xff\\xfe was a UnicodeDecodeError
    traceback: read as bytes, YAML decodes UTF-8 or UTF-16 by its mark."""
    mine = tmp_path / "mine.yml"
    mine.write_bytes(b"\xff\xfe" + "lr: 0.5\n".encode("utf-16-le"))
    assert resolve_config(str(mine))["lr"] == 0.5
    mine.write_bytes(b"\xff\xfelr: 0.5\n\n")
    assert main_error(capsys, ["--config", str(mine)]).startswith(f"{mine}: not a text file in "
                                                                  f"UTF-8 or UTF-16 (")
    mine.write_bytes(b"lr: 0.5 \xe9\n")
    assert main_error(capsys, ["--config", str(mine)]) == (
        f"{mine}: not a text file in UTF-8 or UTF-16 (invalid continuation byte at byte 8)")


@pytest.mark.parametrize("flag, value, limits", [
    ("--image-size", "100000", ">= 8 and <= 2048"),  # asked for 71 TB
    ("--micro-batch-size", "1000000", ">= 1 and <= 65536"),
    ("--expand-ratio", "100000", ">= 1 and <= 64"),
    ("--synthetic-samples", "10000000000", ">= 1 and <= 10000000"),
    ("--num-workers", "100000", ">= 0 and <= 256"),
])
def test_numbers_that_can_only_be_a_mistake_are_bounded(flag, value, limits):
    with pytest.raises(ConfigError) as error:  # (not main(): the old code started the run)
        parse_command_line([flag, value])
    assert str(error.value) == f"{flag} must be {limits}, got {value}"
    help_text = " ".join(build_parser().format_help().split())
    assert f"; {limits})" in help_text.split(f"{flag} INT")[1].split("--")[0]


def test_every_unknown_key_is_named_at_once(tmp_path, capsys):
    mine = tmp_path / "mine.yml"
    mine.write_text("lrr: 0.05\nweight_dekay: 0.1\nepochs: 2\nxyzzy: 1\n")
    assert main_error(capsys, ["--config", str(mine)]) == (
        "mine.yml: unknown keys lrr (did you mean lr?), weight_dekay (did you mean "
        "weight_decay?), xyzzy")
    assert main_error(capsys, ["--lrr", "0.1", "--epoch=3"]) == \
        "unknown options --lrr (did you mean --lr?), --epoch (did you mean --epochs?)"
