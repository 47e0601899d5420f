"""Our norms in a model's own `norm_layer` slot: build a torchvision or timm model with them.

    resnet = torchvision.models.resnet50(norm_layer=proxynorm.norm_layer("group"))
    effnet = timm.create_model("efficientnet_b0",
                               norm_layer=proxynorm.norm_act_layer("group_pn", act="silu"))

Models fill two kinds of slot, and each factory fits one:

  norm_layer(norm)           the norm alone, called as norm_layer(num_channels): torchvision's
                             `norm_layer` and timm's ResNet's. The model applies its own
                             activation after it, so the Proxy Norm names do not fit (Proxy
                             Norm must hold the activation it normalises): they are refused,
                             and convert_norms builds them from the BatchNorm model instead.
  norm_act_layer(norm, act)  a norm-act layer, called as timm's norm-act slot calls it:
                             (num_features, apply_act=..., act_kwargs=..., inplace=...,
                             drop_layer=..., device=..., dtype=...): timm's EfficientNet,
                             MobileNetV3, RegNet and every model built on ConvNormAct. Every
                             name fits, Proxy Norm included. timm hands its model's activation
                             only to its own norm-act classes, never to a callable like this
                             one, so `act` says it, for every layer: a model with mixed
                             activations (MobileNetV3: relu and hardswish) keeps them only
                             through convert_norms.

Both return a functools.partial of keywords (what timm's get_norm_act_layer accepts and
re-binds; it drops positional ones), picklable, whose layers come from get_norm_act.
groups=None picks, per layer, convert_norms' default: the largest divisor of the channels
up to 32 that leaves 2 channels per group.
"""
import functools
from typing import Callable, Optional, Union

from proxynorm.activations import check_act
from proxynorm.convert import layer_groups
from proxynorm.norms import DEFAULT_EPS, get_norm_act, norm_kind

Groups = Union[int, Callable[[int], int], None]

# what timm's norm-act slot passes; a norm-only layer has no use for them
_NORM_ACT_KWARGS = ("apply_act", "act_layer", "act_kwargs", "inplace", "drop_layer")


def norm_layer(norm: str, groups: Groups = None, eps: Optional[float] = None,
               **norm_kwargs) -> functools.partial:
    """A `norm_layer` for torchvision's models and timm's ResNets: num_channels -> our
    `norm` without activation (get_norm_act(..., apply_act=False)).

        model = torchvision.models.resnet18(norm_layer=proxynorm.norm_layer("group"))

    groups: an int, a callable channels -> groups, or None (a divisor of each layer's
    channels, up to 32). eps: None takes the model's (when it passes one), else 1e-5.
    norm_kwargs: further get_norm_act options (e.g. stats_chunks for `batch`).
    """
    if norm_kind(norm).proxy:  # an unknown name is one error here too
        raise ValueError(
            f"norm_layer('{norm}'): the model applies its own activation after a norm_layer, "
            f"and Proxy Norm must hold it; build the model with BatchNorm and convert it with "
            f"proxynorm.convert_norms(model, '{norm}'), or use norm_act_layer in a norm-act slot")
    # the bound keywords are not ones a model passes, which would override them (eps is)
    return functools.partial(_norm, norm=norm, groups=groups, layer_eps=eps,
                             norm_kwargs=norm_kwargs)


def norm_act_layer(norm: str, act: str, groups: Groups = None, eps: Optional[float] = None,
                   **norm_kwargs) -> functools.partial:
    """A norm-act layer for timm's norm-act slot (`timm.create_model(..., norm_layer=...)`
    for EfficientNet, MobileNetV3, RegNet, ...): our `norm` with activation `act`, every name
    of NORMS included (`group_pn`, `layer_pn`).

        model = timm.create_model("efficientnet_b0",
                                  norm_layer=proxynorm.norm_act_layer("group_pn", act="silu"))

    act: a name from proxynorm.ACTS, for every layer that timm asks to apply one
    (apply_act=False gives the no-activation variant: the scale-only norm for the Proxy Norm
    names). timm's drop_layer becomes the layer's `drop` (see get_norm_act); `inplace` is
    ignored (our activations never work in place); act_kwargs must be empty. groups, eps,
    norm_kwargs: as norm_layer.
    """
    norm_kind(norm)  # an unknown name is one error, now
    check_act(act)
    return functools.partial(_norm_act, norm=norm, act=act, groups=groups, layer_eps=eps,
                             norm_kwargs=norm_kwargs)


def _norm(num_channels, *, norm, groups, layer_eps, norm_kwargs, **kwargs):
    misplaced = sorted(set(kwargs) & set(_NORM_ACT_KWARGS))
    if misplaced:
        raise TypeError(
            f"norm_layer('{norm}') makes norms without activation, but the model calls it as "
            f"a norm-act layer (with {', '.join(misplaced)}): use "
            f"proxynorm.norm_act_layer('{norm}', act=...) there")
    return _build(num_channels, norm, "identity", False, groups, layer_eps, norm_kwargs, None,
                  **kwargs)


def _norm_act(num_channels, *, norm, act, groups, layer_eps, norm_kwargs, apply_act=True,
              act_kwargs=None, inplace=None, drop_layer=None, **kwargs):
    if act_kwargs:
        raise TypeError(f"norm_act_layer('{norm}', act='{act}') takes no act_kwargs, got "
                        f"{act_kwargs}")
    drop = drop_layer() if drop_layer is not None else None
    return _build(num_channels, norm, act, apply_act, groups, layer_eps, norm_kwargs, drop,
                  **kwargs)


def _build(num_channels, norm, act, apply_act, groups, layer_eps, norm_kwargs, drop,
           eps=None, momentum=None, device=None, dtype=None, **unknown):
    """get_norm_act's layer; eps, momentum, device, dtype: what the model passes (the
    factory's own eps wins; momentum concerns the BatchNorms only)."""
    if unknown:
        raise TypeError(f"the {norm} layer factory takes no argument "
                        f"{', '.join(sorted(unknown))}")
    kwargs = dict(norm_kwargs)
    kind = norm_kind(norm)
    if kind.groups == "any":
        kwargs["groups"] = layer_groups(groups, num_channels)
    if kind.batch_statistics and momentum is not None:
        kwargs.setdefault("momentum", momentum)
    eps = layer_eps if layer_eps is not None else eps if eps is not None else DEFAULT_EPS
    layer = get_norm_act(norm, num_channels, act=act, eps=eps, apply_act=apply_act,
                         drop=drop, **kwargs)
    return layer.to(device=device, dtype=dtype) if device or dtype else layer
