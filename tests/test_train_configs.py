"""Every config in configs.yml resolves and builds its model, optimiser and data pipeline.

The small models run one training-mode forward pass on a micro-batch per replica. The
ImageNet models are built on the meta device (no weights allocated or initialised) and
run a meta forward pass at 64x64, which checks shapes, norm options and pipeline split
names without computing anything. Datasets that are not on this machine are replaced by
synthetic data of the same shape and classes.
"""
import os

import pytest
import torch

from datasets import cluttered_digits, get_dataset
from datasets.pipeline import EpochOrder, make_loader
from train.build import build_model, resolve_config
from train.config import config_names, load_configs
from train.optim import build_optimizer

CONFIGS = load_configs()
CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
SMALL_MODELS = ("digits_resnet", "cifar_resnet20", "cifar_resnet56", "cifar_preact_resnet20",
                "cifar_preact_resnet56", "digits_preact_resnet")


def data_for(config):
    """The config's dataset, or synthetic data of its shape where it is absent."""
    name, path = config["data"], config["data_path"] or f"data/{config['data']}"
    if name in CLASSES and not os.path.isdir(path):
        size = config["image_size"] or (224 if name == "imagenet" else 32)
        return get_dataset("synthetic", image_size=size,
                           synthetic_samples=config["micro_batch_size"] * config["replicas"],
                           synthetic_num_classes=CLASSES[name])
    return get_dataset(name, data_path=path, image_size=config["image_size"], seed=config["seed"],
                       clutter_options=cluttered_digits.options_of(config))


@pytest.mark.parametrize("name", config_names(CONFIGS))
def test_config_builds(name):
    config = resolve_config(name, configs=CONFIGS)
    data = data_for(config)
    replica_batch = config["micro_batch_size"] * config["replicas"]
    order = EpochOrder(len(data.train), config["micro_batch_size"], config["seed"])
    images, targets, _ = next(iter(make_loader(data.train, config["micro_batch_size"], order)))
    assert images.shape[1:] == (data.in_channels, data.image_size, data.image_size)
    if config["model"] in SMALL_MODELS:
        model = build_model(config, data)
        build_optimizer(config, model)
        batch = images.repeat(config["replicas"], 1, 1, 1)[:replica_batch]
        assert model.train()(batch).shape == (replica_batch, data.num_classes)
    else:
        with torch.device("meta"):
            model = build_model(config, data)  # also checks pipeline_splits
            build_optimizer(config, model)
            logits = model.train()(torch.empty(2 * config["replicas"], 3, 64, 64))
        assert logits.shape == (2 * config["replicas"], data.num_classes)
