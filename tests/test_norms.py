"""proxynorm/norms.py against PyTorch's own ops and an independent float64 Proxy Norm."""
import io
import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn

from proxynorm.activations import ACTS
from proxynorm.norms import (BATCH_INDEPENDENT, NORMS, BatchNormAct, GroupNormAct,
                             GroupNormProxyAct, SyncBatchNormAct, get_norm_act, norm_kind)
from proxynorm.proxy import proxy_norm_act

ACT_FORMULAS = {  # written out, not taken from torch.nn
    "relu": lambda t: t.clamp(min=0),
    "silu": lambda t: t / (1 + torch.exp(-t)),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
    "relu6": lambda t: t.clamp(min=0, max=6),
    "hardswish": lambda t: t * (t + 3).clamp(min=0, max=6) / 6,
    "leaky_relu": lambda t: torch.where(t >= 0, t, 0.01 * t),
    "mish": lambda t: t * torch.tanh(torch.log1p(torch.exp(t))),
    "identity": lambda t: t,
}


def reference_proxy_norm(x, groups, gamma, beta, proxy_gamma, proxy_beta, phi, eps=1e-5,
                         proxy_eps=0.03, n=200):
    """DESIGN.md's five steps, in float64, with stdlib quantiles."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xs = x.reshape(x.shape[0], groups, -1)
    mu = xs.mean(-1, keepdim=True)
    sigma2 = ((xs - mu) ** 2).mean(-1, keepdim=True)
    y = ((xs - mu) / torch.sqrt(sigma2 + eps)).reshape(x.shape)
    z = phi(gamma.view(shape) * y + beta.view(shape))
    u = torch.tensor([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)],
                     dtype=torch.float64)
    proxy = phi(gamma[:, None] * (proxy_beta[:, None] + (1 + proxy_gamma[:, None]) * u)
                + beta[:, None])
    m = proxy.mean(1)
    v = ((proxy - m[:, None]) ** 2).mean(1)
    return (z - m.view(shape)) / torch.sqrt(v.view(shape) + proxy_eps)


def randomise(layer, seed=0):
    """Random (not initial) parameters, so no test passes by symmetry of the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 0.3 if name.startswith("proxy") else 0.5
            p.copy_((1.0 if name == "weight" else 0.0) + scale * torch.randn(p.shape, generator=g))
    return layer


# ---- group / layer / instance against PyTorch ---------------------------------------

@pytest.mark.parametrize("name,groups", [("group", 4), ("layer", 1), ("instance", 8)])
@pytest.mark.parametrize("shape", [(3, 8, 7), (3, 8, 5, 6), (2, 8, 3, 4, 5)])
def test_group_layer_instance_equal_pytorch(name, groups, shape):
    layer = randomise(get_norm_act(name, 8, act="identity", groups=4))
    assert layer.groups == groups
    x = torch.randn(shape) * 2 + 0.5
    expected = F.group_norm(x, groups, layer.weight, layer.bias, 1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    if name == "instance":
        torch.testing.assert_close(
            layer(x), F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=1e-5),
            rtol=0, atol=1e-6)


def test_activation_follows_the_affine():
    layer = randomise(get_norm_act("group", 8, act="silu", groups=2))
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(layer(x), F.silu(F.group_norm(x, 2, layer.weight, layer.bias)))


def test_batch_equals_pytorch_batch_norm_in_train_and_eval():
    layer = randomise(get_norm_act("batch", 6, act="relu"))
    ref = nn.BatchNorm2d(6)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(5, 6, 4, 4) + 1.0
    for _ in range(2):
        torch.testing.assert_close(layer(x), F.relu(ref(x)))
    torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), F.relu(ref(x)))


# ---- Proxy Norm against the independent formula -------------------------------------

@pytest.mark.parametrize("act", list(ACT_FORMULAS))
@pytest.mark.parametrize("name,groups,shape", [
    ("group_pn", 4, (3, 8, 5, 6)), ("layer_pn", 1, (3, 8, 5, 6)),
    ("group_pn", 2, (2, 8, 9)), ("group_pn", 8, (2, 8, 3, 4, 3))])
def test_proxy_norm_forward_and_gradients_match_formula(act, name, groups, shape):
    layer = randomise(get_norm_act(name, 8, act=act, groups=groups)).double()
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.3).requires_grad_()
    out = layer(x)
    params = [p.detach().clone().requires_grad_() for p in
              (layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias)]
    x_ref = x.detach().clone().requires_grad_()
    expected = reference_proxy_norm(x_ref, groups, *params, ACT_FORMULAS[act])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    for p, p_ref in zip((layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias), params):
        assert p.grad.abs().sum() > 0  # the gradient reaches every parameter
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("act", list(ACT_FORMULAS))
def test_proxy_norm_gradcheck(act):
    layer = randomise(get_norm_act("group_pn", 4, act=act, groups=2), seed=1).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in
              (layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias)]
    assert torch.autograd.gradcheck(
        lambda x, w, b, pw, pb: proxy_norm_act(x, 2, w, b, pw, pb, layer.act), (x, *params))


def test_proxy_norm_has_no_buffers_and_train_equals_eval():
    layer = randomise(get_norm_act("group_pn", 8, groups=4))
    assert list(layer.buffers()) == []
    assert {n for n, _ in layer.named_parameters()} == {
        "weight", "bias", "proxy_weight", "proxy_bias"}
    assert (layer.groups, layer.eps, layer.proxy_eps, layer.num_proxy_samples) == (4, 1e-5, 0.03, 200)
    x = torch.randn(4, 8, 5, 5)
    train_out = layer.train()(x)
    assert torch.equal(train_out, layer.eval()(x))


def test_proxy_norm_initial_parameters():
    layer = GroupNormProxyAct(8, groups=4)
    randomise(layer).reset_parameters()
    assert torch.equal(layer.weight, torch.ones(8)) and torch.equal(layer.bias, torch.zeros(8))
    assert torch.equal(layer.proxy_weight, torch.zeros(8))
    assert torch.equal(layer.proxy_bias, torch.zeros(8))


@pytest.mark.parametrize("name,groups", [("group_pn", 4), ("layer_pn", 1)])
def test_pre_residual_proxy_names_are_scale_only_norms(name, groups):
    # models pass the same options at every position; the proxy ones do not apply here
    layer = get_norm_act(name, 8, groups=4, apply_act=False, proxy_eps=0.1, num_proxy_samples=50)
    assert type(layer) is GroupNormAct and layer.groups == groups
    assert {n for n, _ in layer.named_parameters()} == {"weight"}
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(layer(x), F.group_norm(x, groups, layer.weight, None))


def test_apply_act_false_drops_only_the_activation():
    for name in ("batch", "group", "layer", "instance"):
        layer = get_norm_act(name, 8, groups=4, apply_act=False)
        assert isinstance(layer.act, nn.Identity) and layer.bias is not None
    assert isinstance(get_norm_act("none", 8, apply_act=False), nn.Identity)
    assert isinstance(get_norm_act("none", 8, act="gelu"), nn.GELU)


# ---- batch independence -----------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(BATCH_INDEPENDENT), act=st.sampled_from(list(ACT_FORMULAS)),
       batch=st.integers(2, 5), spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_batch_independent_norms_ignore_batch_mates(name, act, batch, spatial, seed, data):
    assume(name != "instance" or math.prod(spatial) > 1)  # one value per group is undefined
    index = data.draw(st.integers(0, batch - 1))
    layer = randomise(get_norm_act(name, 4, act=act, groups=2), seed % 1000)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, 4] + spatial, generator=g) * 3
    for mode in (layer.train, layer.eval):
        mode()
        alone = layer(x[index:index + 1])
        together = layer(x)[index:index + 1]
        torch.testing.assert_close(alone, together, rtol=0, atol=1e-6)


def test_batch_norm_depends_on_batch_mates():
    layer = get_norm_act("batch", 4).train()
    x = torch.randn(6, 4, 3, 3)
    alone = layer(x[:2])
    together = layer(x)[:2]
    assert (alone - together).abs().max() > 1e-2


# ---- replica chunks and synchronised statistics in one process ---------------------

def assert_equals_separate_batch_norms(layer, groups):
    """`layer` on one batch equals `groups` independent nn.BatchNorm2d calls, one per
    consecutive chunk, from the same state: outputs and input gradients. Returns those
    BatchNorms for further checks."""
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = (torch.randn(8, 6, 4, 4) * 2 + 1).requires_grad_()
    grad_out = torch.randn_like(x)
    out = layer(x)
    out.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_()
    norms = [nn.BatchNorm2d(6) for _ in range(groups)]
    for bn in norms:
        bn.load_state_dict(state)
    ref_out = torch.cat([F.relu(bn(xc)) for bn, xc in zip(norms, x_ref.chunk(groups))])
    ref_out.backward(grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    return norms


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_stats_chunks_equal_separate_batch_norms(chunks):
    layer = randomise(BatchNormAct(6, stats_chunks=chunks))
    norms = assert_equals_separate_batch_norms(layer, chunks)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(layer, name).grad,
                                   sum(getattr(bn, name).grad for bn in norms), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer, name),
                                   sum(getattr(bn, name) for bn in norms) / chunks)
    assert layer.num_batches_tracked.item() == 1


@pytest.mark.parametrize("group_size,groups", [(2, 2), (0, 1), (4, 1), (1, 4)])
def test_sync_batch_groups_replica_chunks(group_size, groups):
    layer = randomise(SyncBatchNormAct(6, stats_chunks=4, bn_group_size=group_size))
    assert_equals_separate_batch_norms(layer, groups)


def test_eval_uses_running_statistics_whatever_the_chunks():
    layer = randomise(SyncBatchNormAct(6, stats_chunks=4, bn_group_size=2))
    layer(torch.randn(8, 6, 3, 3) + 2)
    layer.eval()
    x = torch.randn(3, 6, 3, 3)  # not divisible by the chunks: eval does not care
    expected = F.relu(F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                                   layer.bias, False, 0.0, layer.eps))
    torch.testing.assert_close(layer(x), expected)


# ---- precision, state, errors ------------------------------------------------------

@pytest.mark.parametrize("name", ["group_pn", "layer_pn"])
def test_bfloat16_input_close_to_float32(name):
    layer = randomise(get_norm_act(name, 16, act="silu", groups=4))
    x = torch.randn(4, 16, 8, 8) * 2 + 0.5
    reference = layer(x)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: one rounding of the input and of the output
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=3e-2)
    out_bf16_params = layer.to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(out_bf16_params.float(), reference, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("name", NORMS)
def test_state_dict_round_trip(name):
    layer = randomise(get_norm_act(name, 8, groups=4))
    x = torch.randn(4, 8, 3, 3)
    layer(x)  # moves BatchNorm running statistics off their init
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = get_norm_act(name, 8, groups=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    layer.eval(), restored.eval()
    assert torch.equal(layer(x), restored(x))


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown norm 'gruop_pn' \(did you mean 'group_pn'\?\);"
                                         r" valid names: batch, sync_batch, group, layer, "
                                         r"instance, group_pn, layer_pn, none"):
        get_norm_act("gruop_pn", 8)


def test_every_activation_is_checked_against_a_written_out_formula():
    assert list(ACT_FORMULAS) == list(ACTS)  # a new entry needs its formula here


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation 'swish' \(did you mean "
                                         r"'hardswish'\?\); valid names: relu, silu, gelu, "
                                         r"relu6, hardswish, leaky_relu, mish, identity"):
        get_norm_act("group", 8, act="swish", groups=2)
    with pytest.raises(ValueError, match="unknown activation"):
        get_norm_act("batch", 8, act="tanh", apply_act=False)


@pytest.mark.parametrize("name", ["group", "group_pn"])
def test_channels_not_divisible_by_groups(name):
    with pytest.raises(ValueError, match="30 channels are not divisible by 4 groups"):
        get_norm_act(name, 30, groups=4)
    with pytest.raises(ValueError, match="groups must be a positive integer, got 0"):
        get_norm_act(name, 30, groups=0)


@pytest.mark.parametrize("name", NORMS[:-1])
def test_wrong_input_rank_and_channels(name):
    layer = get_norm_act(name, 8, groups=4)
    with pytest.raises(ValueError, match=r"expects a 3-D, 4-D or 5-D input \(N, C, \*spatial\), "
                                         r"got a 2-D input of shape \(4, 8\)"):
        layer(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"expects 8 channels in dim 1, got an input of shape \(4, 6, 3, 3\)"):
        layer(torch.randn(4, 6, 3, 3))


def test_batch_that_does_not_split_into_chunks():
    layer = BatchNormAct(4, stats_chunks=4)
    with pytest.raises(ValueError, match="a batch of 6 samples cannot be split into stats_chunks=4"):
        layer(torch.randn(6, 4, 3, 3))
    layer = SyncBatchNormAct(4, stats_chunks=4, bn_group_size=3)
    with pytest.raises(ValueError, match="bn_group_size=3 does not divide stats_chunks=4"):
        layer(torch.randn(8, 4, 3, 3))


def test_one_value_per_chunk_is_rejected_like_pytorch():
    layer = BatchNormAct(4, stats_chunks=2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(2, 4, 1, 1))


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
def test_batchnorm_layers_are_batchnorm2d_for_poptorch(norm):
    """PopTorch lets only nn.BatchNorm1d/2d/3d instances reassign buffers in the forward
    (BUFFERS_CAN_CHANGE, poptorch python/_impl.py): the running statistics' update."""
    layer = get_norm_act(norm, 8)
    assert isinstance(layer, torch.nn.BatchNorm2d)
    before = layer.running_mean.clone()
    layer.train()(torch.randn(4, 8, 3, 3) + 1.0)
    assert not torch.equal(layer.running_mean, before)


@pytest.mark.parametrize("name", NORMS)
def test_each_norm_is_what_its_kind_declares(name):
    """The registry's traits, which every other module asks, against the layer built."""
    kind = norm_kind(name)
    layer = get_norm_act(name, 12, groups=4)
    assert kind.batch_statistics == isinstance(layer, BatchNormAct)
    assert kind.synchronised == isinstance(layer, SyncBatchNormAct)
    assert kind.proxy == isinstance(layer, GroupNormProxyAct)
    expected_groups = {"any": 4, 1: 1, "channels": 12, None: None}[kind.groups]
    assert getattr(layer, "groups", None) == expected_groups
    assert (name in BATCH_INDEPENDENT) == (not kind.batch_statistics)
    with pytest.raises(ValueError, match="unknown norm 'group-pn' .did you mean 'group_pn'"):
        norm_kind("group-pn")
