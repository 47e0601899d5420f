"""Models and their normalisation layers: `get_model(name, norm=...)`, `list_models()` and
`convert_norms(model, norm=...)` for any other CNN.

Every family takes every normalisation in `proxynorm.norms.NORMS` by name; models build their
norm layers through `get_norm_act` only (via `models.layers.NormAct`) and never import a
norm class. Families:
  resnet18/34/50/101/152, resnext50_32x4d     torchvision's ResNet v1.5 / ResNeXt (resnet.py)
  cifar_resnet20/56, digits_resnet             small ResNets for 32x32 inputs (resnet.py)
  resnet50v2, resnet101v2, resnext50v2_32x4d   pre-activation ResNets v2 (preact_resnet.py)
  cifar_preact_resnet20/56/110, digits_preact_resnet  small pre-activation ResNets
                                               (preact_resnet.py)
  efficientnet_b0..b5                          EfficientNet with group_dim, expand_ratio
                                               (efficientnet.py)
  torchvision:NAME                             any torchvision classification model,
                                               its BatchNorms converted by convert_norms
                                               (torchvision_models.py, convert.py)
  timm:NAME                                    any timm model with BatchNorms (timm's
                                               BatchNormAct2d included), the same way
                                               (timm_models.py; needs timm installed)

Which activations Proxy Norm covers: in the pre-activation ResNets and EfficientNet every
one (each follows its own norm); in the v1 ResNets all but the ReLU after each residual add,
which has no norm before it. Proxy Norm configs therefore use the pre-activation models.

Family defaults, used when `act` / `groups` are None: ResNets relu and 32 GroupNorm groups
(DEFAULT_GROUPS); the small ResNets (v1 and pre-activation) relu and 8 groups, since they
have 16-channel layers (8 divides 16, 32 and 64; 2 channels per group at the narrowest, as
ResNet-50's 64/32);
EfficientNet silu, 4 groups (Graphcore's G16 GroupNorm recipe; every EfficientNet width
is a multiple of 8) and eps 1e-3 for every norm.
"""
import inspect
from collections import namedtuple
from functools import partial
from typing import Optional

from models import efficientnet, preact_resnet, resnet, timm_models, torchvision_models
from proxynorm.activations import check_act, unknown_name_error
from proxynorm.convert import ConversionError, ConversionReport, convert_norms
from models.layers import NormAct
from proxynorm.norms import DEFAULT_GROUPS, NORMS

Family = namedtuple("Family", "builder act groups eps")

_MODELS = {
    **{name: Family(partial(resnet.resnet, name), "relu", DEFAULT_GROUPS, None)
       for name in resnet.IMAGENET_ARCHS},
    **{name: Family(partial(resnet.small_resnet, name), "relu", 8, None)
       for name in resnet.SMALL_ARCHS},
    **{name: Family(partial(preact_resnet.preact_resnet, name), "relu", DEFAULT_GROUPS, None)
       for name in preact_resnet.IMAGENET_ARCHS},
    **{name: Family(partial(preact_resnet.small_preact_resnet, name), "relu", 8, None)
       for name in preact_resnet.SMALL_ARCHS},
    **{name: Family(partial(efficientnet.efficientnet, name), "silu", 4, 1e-3)
       for name in efficientnet.ARCHS},
}

# what get_model passes itself; the rest of a builder's parameters are the model's options
_COMMON = ("norm_layer", "num_classes", "in_channels")

# other libraries' models, converted by convert_norms: "PREFIX" + their own name
SOURCES = (torchvision_models, timm_models)


def list_models():
    """Our families; get_model also takes "torchvision:NAME" and "timm:NAME"
    (check_model_name)."""
    return list(_MODELS)


def model_source(name):
    """The module of SOURCES whose prefix `name` has (torchvision_models for
    "torchvision:resnet18"), or None for our own families."""
    return next((source for source in SOURCES if str(name).startswith(source.PREFIX)), None)


def check_model_name(name):
    """ValueError (naming close names) unless get_model knows `name`."""
    source = model_source(name)
    if source is not None:
        source.check_name(name[len(source.PREFIX):])
    else:
        _get_family(name)


def model_options(name):
    """The family options `get_model(name, **kw)` accepts, with their defaults (none for
    torchvision and timm models)."""
    if model_source(name) is not None:
        return {}
    params = inspect.signature(_get_family(name).builder).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def _get_family(name):
    if name not in _MODELS:
        raise unknown_name_error("model", name, list_models())
    return _MODELS[name]


def get_model(name: str, norm: str = "group_pn", num_classes: int = 1000,
              groups: Optional[int] = None, act: Optional[str] = None, in_channels: int = 3,
              norm_kwargs: Optional[dict] = None, report: bool = False, **kw):
    """Build model `name` with every normalisation layer of kind `norm`.

        model = get_model("resnet50v2", norm="group_pn", num_classes=1000)
        model = get_model("torchvision:mobilenet_v3_large", norm="layer_pn")
        model, conversion = get_model("timm:efficientnet_b0", norm="group_pn", report=True)

    groups: GroupNorm groups for group/group_pn (None = the family default); act: the
    activation (None = the family default); norm_kwargs: options for every get_norm_act
    call (e.g. {"fused": False}, {"stats_chunks": 4}; "eps" overrides the family eps);
    kw: the family's options (see model_options(name)), e.g. zero_init_residual, group_dim,
    expand_ratio, drop_rate, drop_path_rate. A layer that cannot be built (e.g. channels
    not divisible by groups) raises a ValueError that names its module path.

    "torchvision:NAME" and "timm:NAME" build that library's model NAME (random weights) and
    convert its BatchNorms with convert_norms (strict: a part that cannot be converted is a
    ValueError naming it): groups=None picks a divisor of each layer's channels, eps is
    each BatchNorm's own unless norm_kwargs has "eps", act and family options are refused,
    and a model without BatchNorm is refused (`norm` would not apply to it).
    report=True returns (model, ConversionReport), the report None for our families.
    """
    source = model_source(name)
    if source is not None:
        model, conversion = _converted(source, name[len(source.PREFIX):], norm, num_classes,
                                       groups, act, in_channels, norm_kwargs, kw)
        return (model, conversion) if report else model
    family = _get_family(name)
    if norm not in NORMS:
        raise unknown_name_error("norm", norm, NORMS)
    act = family.act if act is None else act
    check_act(act)
    options = model_options(name)
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise TypeError(f"model '{name}' has no option {', '.join(unknown)}; its options: "
                        f"{', '.join(options) or 'none'}")
    norm_kwargs = dict(norm_kwargs or {})
    eps = norm_kwargs.pop("eps", family.eps)
    norm_layer = NormAct(norm, act, family.groups if groups is None else groups, eps,
                         norm_kwargs)
    model = family.builder(norm_layer, num_classes=num_classes, in_channels=in_channels, **kw)
    return (model, None) if report else model


def _converted(source, name, norm, num_classes, groups, act, in_channels, norm_kwargs, kw):
    """(model, ConversionReport): `source`'s model `name` converted to `norm`."""
    label = f"{source.PREFIX}{name}"
    source.check_name(name)
    if norm not in NORMS:
        raise unknown_name_error("norm", norm, NORMS)
    if kw:
        raise TypeError(f"model '{label}' has no option {', '.join(sorted(kw))}; "
                        f"{source.LABEL} models take none (they keep {source.LABEL}'s defaults)")
    if act is not None:
        raise ValueError(f"model '{label}' keeps {source.LABEL}'s activations: act must be unset "
                         f"(null), got '{act}'")
    norm_kwargs = dict(norm_kwargs or {})
    eps = norm_kwargs.pop("eps", None)
    model = source.create(name, num_classes, in_channels)
    model, conversion = convert_norms(model, norm, groups=groups, eps=eps,
                                      norm_kwargs=norm_kwargs, report=True)
    if not conversion.norm_act and not conversion.norm_only:
        raise ValueError(f"model '{label}' has no BatchNorm, so norm '{norm}' would not apply "
                         f"to it (convert_norms converts BatchNorms; it keeps its own norms)")
    return model, conversion
