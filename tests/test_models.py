"""models/: every family with every norm, against torchvision and published counts.

Parameter counts are checked on the meta device (no memory, no init cost); forward and
backward runs use tiny inputs (batch 2, 16x16 for the small models, 64x64 for the
ImageNet ones, so the last stage still has 2x2 positions for instance norm).
"""
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models import get_model, list_models, model_options
from models.efficientnet import ARCHS as EFFICIENTNETS, conv_groups, make_divisible
from models.layers import DropPath, NormAct
from proxynorm.norms import BATCH_INDEPENDENT, NORMS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


SMALL = ["cifar_resnet20", "cifar_resnet56", "digits_resnet", "cifar_preact_resnet20",
         "cifar_preact_resnet56", "cifar_preact_resnet110", "digits_preact_resnet"]
PREACT = ["resnet50v2", "resnet101v2", "resnext50v2_32x4d", "cifar_preact_resnet20",
          "cifar_preact_resnet56", "cifar_preact_resnet110", "digits_preact_resnet"]
LARGE = [name for name in list_models() if name not in SMALL]


def count(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(name, **kw):
    with torch.device("meta"):
        return get_model(name, **kw)


def sample_input(name, batch=2, in_channels=3, seed=0):
    size = 16 if name in SMALL else 64
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, size, size, generator=g)


def randomise(model, seed=0):
    """Move every 1-D parameter (norm scales/shifts, proxy parameters, biases) off its
    init, so zeroed residual scales or zero proxy parameters hide nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


# ---- the registry -------------------------------------------------------------------

def test_list_models_names_every_family():
    assert list_models() == [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
        "cifar_resnet20", "cifar_resnet56", "digits_resnet", "resnet50v2", "resnet101v2",
        "resnext50v2_32x4d", "cifar_preact_resnet20", "cifar_preact_resnet56",
        "cifar_preact_resnet110", "digits_preact_resnet", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
        "efficientnet_b4", "efficientnet_b5"]


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet05' \(did you mean 'resnet50'\?\);"
                                         r" valid names: resnet18, resnet34, .*efficientnet_b5"):
        get_model("resnet05")


def test_unknown_norm_and_activation_and_option():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'.*valid names: batch, sync_batch"):
        get_model("digits_resnet", norm="batchnorm")
    with pytest.raises(ValueError, match="unknown activation 'swish'.*valid names: relu, silu"):
        get_model("digits_resnet", act="swish")
    with pytest.raises(TypeError, match="model 'resnet50' has no option group_dim; its options: "
                                        "zero_init_residual"):
        get_model("resnet50", group_dim=16)
    assert model_options("efficientnet_b0") == {
        "group_dim": 1, "expand_ratio": 6, "drop_rate": None, "drop_path_rate": 0.2}


@pytest.mark.parametrize("name,groups,message", [
    ("resnet18", 48, r"^bn1: .*64 channels are not divisible by 48 groups"),
    ("cifar_resnet20", 32, r"^bn1: .*16 channels are not divisible by 32 groups"),
    ("resnet50v2", 128, r"^layer1\.0\.bn1: .*64 channels are not divisible by 128 groups"),
    ("cifar_preact_resnet20", 32, r"^layer1\.0\.bn1: .*16 channels are not divisible by 32 "
                                  r"groups"),
    ("efficientnet_b0", 16,
     r"^blocks\.1\.0\.project\.bn: .*24 channels are not divisible by 16 groups"),
])
@pytest.mark.parametrize("norm", ["group", "group_pn"])
def test_impossible_combination_names_the_layer(name, groups, message, norm):
    with pytest.raises(ValueError, match=message):
        meta_model(name, norm=norm, groups=groups)


def test_norm_options_that_a_norm_does_not_take_name_the_layer():
    with pytest.raises(TypeError, match=r"^bn1: .*unexpected keyword argument 'fused'"):
        get_model("digits_resnet", norm="batch", norm_kwargs={"fused": False})


@pytest.mark.parametrize("name", list_models())
def test_every_norm_layer_is_built_by_name_at_its_reported_path(name, monkeypatch):
    """The paths in error messages are real, and no norm layer bypasses get_norm_act."""
    built = {}
    original = NormAct.__call__

    def record(self, layer_name, channels, apply_act=True):
        module = original(self, layer_name, channels, apply_act)
        built[self.path(layer_name)] = module
        return module

    monkeypatch.setattr(NormAct, "__call__", record)
    model = meta_model(name, norm="group_pn", groups=8)
    modules = dict(model.named_modules())
    assert all(modules[path] is module for path, module in built.items())
    norms = {path for path, m in modules.items() if isinstance(m, (_BatchNorm, nn.GroupNorm))}
    assert norms == set(built)


# ---- parameter counts ---------------------------------------------------------------

@pytest.mark.parametrize("name,kw,expected", [
    # published by torchvision (torchvision.models.*_Weights meta["num_params"])
    ("resnet18", {}, 11_689_512),
    ("resnet50", {}, 25_557_032),
    ("resnext50_32x4d", {}, 25_028_904),
    ("efficientnet_b0", {"group_dim": 1}, 5_288_548),
    ("efficientnet_b1", {}, 7_794_184),
    ("efficientnet_b5", {}, 30_389_784),
])
def test_parameter_counts_equal_torchvision(name, kw, expected):
    assert count(meta_model(name, norm="batch", **kw)) == expected


@pytest.mark.parametrize("name,norm,kw,expected", [
    # computed once by this code; the models table in docs/models.md lists the same numbers
    ("resnet50", "group", {}, 25_557_032),
    ("resnet50", "group_pn", {}, 25_553_320),
    ("resnet50v2", "batch", {}, 25_549_352),
    ("resnet50v2", "group_pn", {}, 25_594_792),
    # timm's resnetv2_101 has the same 44.5M (its stem and BiT details aside)
    ("resnet101v2", "batch", {}, 44_541_480),
    ("resnext50v2_32x4d", "batch", {}, 25_021_224),
    # the 10-class, 1-channel pre-activation ResNet-20 of shared/research (written apart
    # from this code): 271,994 with BatchNorm
    ("cifar_preact_resnet20", "batch", {"num_classes": 10, "in_channels": 1}, 271_994),
    ("cifar_preact_resnet20", "group_pn", {"num_classes": 10, "in_channels": 1}, 273_370),
    ("cifar_preact_resnet56", "batch", {"num_classes": 10}, 855_578),
    ("cifar_preact_resnet110", "group_pn", {"num_classes": 10, "in_channels": 1}, 1_738_330),
    ("efficientnet_b0", "batch", {"group_dim": 16, "expand_ratio": 4}, 5_913_796),
    ("efficientnet_b0", "group_pn", {"group_dim": 16, "expand_ratio": 4}, 5_938_484),
    ("efficientnet_b0", "group_pn", {"group_dim": 1}, 5_325_140),
    ("cifar_resnet20", "batch", {"num_classes": 10}, 272_474),
    ("digits_resnet", "group_pn", {"num_classes": 10, "in_channels": 1}, 78_074),
])
def test_parameter_counts_of_our_variants(name, norm, kw, expected):
    assert count(meta_model(name, norm=norm, **kw)) == expected


def preact_cifar_count(blocks, num_classes=10, in_channels=3):
    """He et al. 2016's pre-activation CIFAR ResNet with BatchNorm, counted by hand: a 3x3
    stem to 16 channels; per basic block a norm (2 per channel) and a 3x3 conv, twice, and
    a 1x1 projection where the width doubles; a final norm and the classifier."""
    total, inplanes = in_channels * 16 * 9, 16
    for planes in (16, 32, 64):
        for block in range(blocks):
            total += 2 * inplanes + inplanes * planes * 9 + 2 * planes + planes * planes * 9
            total += inplanes * planes if inplanes != planes else 0
            inplanes = planes
    return total + 2 * 64 + 64 * num_classes + num_classes


@pytest.mark.parametrize("name,blocks", [("cifar_preact_resnet20", 3),
                                         ("cifar_preact_resnet56", 9),
                                         ("cifar_preact_resnet110", 18)])
def test_preact_cifar_resnets_count_as_he_et_al(name, blocks):
    assert count(meta_model(name, norm="batch", num_classes=10)) == preact_cifar_count(blocks)
    convs = [m for m in meta_model(name, norm="batch").modules() if isinstance(m, nn.Conv2d)
             and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 6 * blocks + 2  # 6n+2 weighted layers: the 3x3 convs and fc


def test_preact_resnet110_has_the_published_size():
    # He et al. 2016: 1.7M parameters (with zero-padded shortcuts; our 1x1 projections add
    # 2,560)
    assert round(count(meta_model("cifar_preact_resnet110", norm="batch", num_classes=10)) / 1e6,
                 1) == 1.7


def test_proxy_norm_adds_two_parameters_per_activated_channel_and_drops_residual_shifts():
    model = meta_model("resnet18", norm="group_pn")
    plain = meta_model("resnet18", norm="group")
    activated = sum(m.num_channels for m in model.modules() if hasattr(m, "proxy_weight"))
    scale_only = sum(m.num_channels for m in model.modules()
                     if isinstance(m, nn.GroupNorm) and m.bias is None)
    # stem bn1 + each block's bn1 carry Proxy Norm; each bn2 and downsample norm is scale-only
    assert activated == 64 + 2 * (64 + 128 + 256 + 512)
    assert scale_only == 2 * (64 + 128 + 256 + 512) + (128 + 256 + 512)
    assert count(model) - count(plain) == 2 * activated - scale_only


# ---- torchvision equivalence --------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_output(name):
    reference = getattr(torchvision.models, name)()
    randomise(reference)  # running statistics stay at init; weights are random
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    ours = get_model(name, norm="batch")
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval(), reference.eval()
    x = sample_input(name)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


# ---- every model with every norm ----------------------------------------------------

def forward_backward(name, norm, **kw):
    model = get_model(name, norm=norm, num_classes=7, **kw).train()
    x = sample_input(name).requires_grad_()
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", SMALL)
def test_small_models_forward_backward_every_norm(name, norm):
    forward_backward(name, norm)


REPRESENTATIVE = [("resnet18", "group"), ("resnet50", "group_pn"), ("resnet50", "batch"),
                  ("resnext50_32x4d", "layer_pn"), ("resnet50v2", "group_pn"),
                  ("resnext50v2_32x4d", "layer_pn"),
                  ("resnet50v2", "instance"), ("efficientnet_b0", "group_pn"),
                  ("efficientnet_b0", "batch")]


@pytest.mark.parametrize("name,norm", REPRESENTATIVE)
def test_large_models_forward_backward(name, norm):
    forward_backward(name, norm)


def test_efficientnet_g16_forward_backward():
    forward_backward("efficientnet_b0", "group_pn", group_dim=16, expand_ratio=4)


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", LARGE)
def test_large_models_forward_backward_every_norm(name, norm):
    forward_backward(name, norm)
    if name.startswith("efficientnet"):
        forward_backward(name, norm, group_dim=16, expand_ratio=4)


@pytest.mark.parametrize("name", ["digits_resnet", "resnet18", "efficientnet_b0"])
def test_one_input_channel(name):
    model = get_model(name, norm="group_pn", num_classes=10, in_channels=1).eval()
    assert model(sample_input(name, in_channels=1)).shape == (2, 10)


# ---- batch (in)dependence -----------------------------------------------------------

INDEPENDENCE_MODELS = ["digits_resnet", "resnet18", "resnet50v2", "cifar_preact_resnet20",
                       "cifar_preact_resnet110",
                       "efficientnet_b0"]


def batch_model(name, norm):
    """Random norm parameters and no zeroed branches, so every layer matters. Dropout and
    stochastic depth draw per-sample masks whose order depends on the batch, so they are
    off: what is tested is that no statistic crosses samples."""
    kw = {"zero_init_residual": False} if "efficientnet" not in name else {
        "drop_rate": 0.0, "drop_path_rate": 0.0, "group_dim": 16}
    return randomise(get_model(name, norm=norm, num_classes=5, **kw))


@pytest.mark.parametrize("norm", BATCH_INDEPENDENT)
@pytest.mark.parametrize("name", INDEPENDENCE_MODELS)
def test_batch_independent_models_ignore_batch_mates(name, norm):
    # Tolerance: float32 rounding, amplified by norms over few values (instance norm on
    # 2x2 positions), moves these outputs by up to ~2e-4 of their scale; a statistic
    # shared across the batch moves them by ~0.5 of it (the BatchNorm test below).
    model = batch_model(name, norm)
    x = sample_input(name, batch=3)
    with torch.no_grad():
        for mode in (model.train, model.eval):
            mode()
            together = model(x)
            tolerance = 1e-3 * together.abs().max().item()
            for i in range(3):
                torch.testing.assert_close(model(x[i:i + 1]), together[i:i + 1],
                                           rtol=0, atol=tolerance)


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
@pytest.mark.parametrize("name", INDEPENDENCE_MODELS)
def test_batch_norm_models_depend_on_batch_mates_in_training(name, norm):
    model = batch_model(name, norm).train()
    x = sample_input(name, batch=4)
    with torch.no_grad():
        together = model(x)
        # 20x the batch-independent tolerance above
        assert (model(x[:2]) - together[:2]).abs().max() > 0.02 * together.abs().max()


# ---- options reach the layers ---------------------------------------------------------

def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))]


def test_activation_groups_eps_and_norm_kwargs_reach_every_layer():
    model = meta_model("resnet18", norm="group_pn", act="gelu", groups=16,
                       norm_kwargs={"fused": False, "proxy_eps": 0.1})
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert all(m.groups == 16 and m.eps == 1e-5 for m in norm_layers(model))
    proxy = [m for m in model.modules() if hasattr(m, "proxy_weight")]
    assert proxy and all(not m.fused and m.proxy_eps == 0.1 for m in proxy)

    model = meta_model("efficientnet_b0", norm="sync_batch",
                       norm_kwargs={"bn_group_size": 2, "stats_chunks": 4})
    assert all(m.bn_group_size == 2 and m.stats_chunks == 4 and m.eps == 1e-3
               for m in norm_layers(model))
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    model = meta_model("efficientnet_b0", norm="group", norm_kwargs={"eps": 1e-5})
    assert all(m.eps == 1e-5 and m.groups == 4 for m in norm_layers(model))
    assert all(m.groups == 8 for m in norm_layers(meta_model("cifar_resnet20", norm="group")))


@pytest.mark.parametrize("norm", ["batch", "group_pn", "none"])
def test_zero_init_residual_zeroes_the_last_scale_of_every_branch(norm):
    model = get_model("resnet50", norm=norm)
    for block in [b for layer in (model.layer1, model.layer4) for b in layer]:
        last = block.bn3.weight if norm != "none" else block.conv3.weight
        assert torch.equal(last, torch.zeros_like(last))
        assert block.conv2.weight.abs().sum() > 0
    kept = get_model("resnet18", norm=norm, zero_init_residual=False).layer1[0]
    assert (kept.bn2.weight if norm != "none" else kept.conv2.weight).abs().sum() > 0
    # a zeroed branch makes every block the identity: the output of a stage-1 block is
    # act(x), its input after the stem is already non-negative (ReLU)
    stem = model.maxpool(model.bn1(model.conv1(sample_input("resnet50"))))
    torch.testing.assert_close(model.layer1[1](model.layer1[0](stem)),
                               model.layer1[0].act(model.layer1[0].downsample(stem)))


# ---- pre-activation models ------------------------------------------------------------

def blocks(model):
    return [b for name, stage in model.named_children() if name.startswith("layer")
            for b in stage]


@pytest.mark.parametrize("name", PREACT)
def test_preact_every_activation_sits_in_a_full_proxy_norm_layer(name):
    """Every activation module is a norm-act's own, and with group_pn every norm is a full
    Proxy Norm layer (none scale-only), so Proxy Norm covers every activation."""
    model = meta_model(name, norm="group_pn")
    modules = dict(model.named_modules())
    acts = [path for path, m in modules.items() if isinstance(m, nn.ReLU)]
    norms = [path for path, m in modules.items() if isinstance(m, nn.GroupNorm)]
    assert acts and sorted(acts) == sorted(f"{path}.act" for path in norms)
    assert all(hasattr(modules[path], "proxy_weight") for path in norms)


def test_v1_resnet_has_activations_outside_proxy_norm():
    """What the pre-activation test rules out: a v1 ResNet's ReLU after each add."""
    modules = dict(meta_model("cifar_resnet20", norm="group_pn").named_modules())
    outside = [path for path, m in modules.items() if isinstance(m, nn.ReLU)
               and not hasattr(modules[path.rpartition(".")[0]], "proxy_weight")]
    assert len(outside) == 9 and all(path.endswith(".act") for path in outside)


def test_preact_shortcut_projects_the_preactivated_input():
    model = randomise(get_model("cifar_preact_resnet20", norm="group_pn",
                                zero_init_residual=False))
    block = model.layer2[0]
    seen = {}
    block.bn1.register_forward_hook(lambda m, i, out: seen.update(preact=out))
    block.downsample.register_forward_hook(lambda m, i, out: seen.update(input=i[0]))
    block(torch.randn(2, 16, 8, 8))
    assert seen["input"] is seen["preact"]
    assert block.downsample.stride == (2, 2) and model.layer1[0].downsample is None


@pytest.mark.parametrize("name,norm", [("resnet50v2", "group_pn"), ("cifar_preact_resnet20",
                                                                    "layer_pn"),
                                       ("cifar_preact_resnet20", "batch")])
def test_preact_zero_init_makes_every_block_start_as_its_shortcut(name, norm):
    model = randomise(get_model(name, norm=norm).eval())
    for block in blocks(model):
        last = block.last_conv().weight
        assert torch.equal(last, torch.zeros_like(last))
    block = model.layer1[1]
    x = torch.randn(2, block.bn1.num_features if norm == "batch" else block.bn1.num_channels,
                    8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)
        first = model.layer2[0]
        x = torch.randn(2, first.conv1.in_channels, 8, 8)
        torch.testing.assert_close(first(x), first.downsample(first.bn1(x)))
    kept = get_model(name, norm=norm, zero_init_residual=False)
    assert all(b.last_conv().weight.abs().sum() > 0 for b in blocks(kept))


def test_residual_branch_norms_have_no_activation_and_pn_is_scale_only():
    model = meta_model("resnet50", norm="group_pn")
    block = model.layer2[0]
    assert hasattr(block.bn1, "proxy_weight") and hasattr(block.bn2, "proxy_weight")
    for last in (block.bn3, block.downsample[1]):
        assert not hasattr(last, "proxy_weight") and last.bias is None
        assert isinstance(last.act, nn.Identity)
    mb = meta_model("efficientnet_b0", norm="group_pn").blocks[1][0]
    assert all(hasattr(m.bn, "proxy_weight") for m in (mb.expand, mb.dw))
    assert mb.project.bn.bias is None and isinstance(mb.project.bn.act, nn.Identity)


# ---- EfficientNet details -------------------------------------------------------------

def test_make_divisible_matches_torchvision():
    from torchvision.models._utils import _make_divisible
    for value in [1, 7.5, 12, 35.2, 38.4, 134.4, 179.2, 268.8, 307.2, 1000, 1152.7]:
        assert make_divisible(value) == _make_divisible(value, 8)


def test_group_dim_sets_channels_per_group():
    g1 = meta_model("efficientnet_b0", group_dim=1).blocks[1][0].dw.conv
    assert g1.groups == g1.in_channels == 96
    g16 = meta_model("efficientnet_b0", group_dim=16, expand_ratio=4).blocks[1][0].dw.conv
    assert (g16.in_channels, g16.groups) == (64, 4)
    assert conv_groups(40, 16) == 2 and conv_groups(56, 16) == 2 and conv_groups(8, 16) == 1
    with pytest.raises(ValueError, match="group_dim must be a positive integer, got 0"):
        get_model("efficientnet_b0", group_dim=0)


@pytest.mark.parametrize("name", list(EFFICIENTNETS))
@pytest.mark.parametrize("expand_ratio", [4, 6])
def test_g16_divides_every_efficientnet_width(name, expand_ratio):
    model = meta_model(name, norm="batch", group_dim=16, expand_ratio=expand_ratio)
    for block in model.blocks.modules():
        if hasattr(block, "dw"):
            conv = block.dw.conv  # the reference's groups, with no fallback needed
            assert conv.groups == conv.in_channels // 16


def test_efficientnet_dropout_squeeze_and_stochastic_depth_schedule():
    assert [meta_model(n).dropout.p for n in EFFICIENTNETS] == [0.2, 0.2, 0.3, 0.3, 0.4, 0.4]
    model = meta_model("efficientnet_b0", drop_path_rate=0.2)
    blocks = [b for stage in model.blocks for b in stage]
    assert len(blocks) == 16
    assert blocks[2].se.fc1.out_channels == 24 // 4  # block input channels // 4
    assert blocks[0].se.fc1.out_channels == 32 // 4
    rates = [b.drop_path.p for b in blocks if b.use_residual]
    assert rates[-1] == pytest.approx(0.2 * 14 / 16) and rates == sorted(rates)


def test_drop_path_drops_whole_samples_in_training_only():
    layer = DropPath(0.5)
    x = torch.ones(400, 3, 2, 2)
    out = layer(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert 0.35 < (per_sample[:, 0] == 0).float().mean() < 0.65
    assert torch.equal(layer.eval()(x), x)


# ---- the model table's counter ----------------------------------------------------------

@pytest.mark.parametrize("name,options,resolution,published", [
    ("resnet50", {}, 224, 4.09),  # torchvision's "GFLOPS" for its weights, i.e. GMACs
    ("efficientnet_b0", {}, 224, 0.39),
])
def test_model_table_counts_published_multiply_accumulates(name, options, resolution, published):
    pytest.importorskip("torch.utils.flop_counter")  # torch >= 2.1; the table is not IPU code
    from benchmarks.models import measure
    params, macs = measure(name, "batch", options, resolution)
    assert macs / 1e9 == pytest.approx(published, abs=0.005)
    assert params == count(meta_model(name, norm="batch", **options))
