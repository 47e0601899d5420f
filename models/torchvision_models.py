"""torchvision's classification CNNs with any normalisation: `get_model("torchvision:NAME")`.

The model is torchvision's own (`torchvision.models.get_model(NAME, weights=None)`, never
pretrained weights: nothing is downloaded) rewritten by `convert_norms`. It keeps
torchvision's activations, widths and options: our family options (group_dim,
expand_ratio, drop_rate, drop_path_rate, ...) and `act` are refused, not ignored.
torchvision is imported only here, on first use (IPU hosts may lack it).
"""
import difflib
import logging

import torch
from torch import fx, nn

from proxynorm.convert import convert_norms

PREFIX = "torchvision:"


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise ValueError(f"{PREFIX}NAME models need torchvision, which is not installed "
                         f"(pip install torchvision, the version that goes with this torch)"
                         ) from None
    return torchvision


def names():
    """torchvision's classification models (no detection, segmentation or video ones)."""
    torchvision = _torchvision()
    return torchvision.models.list_models(module=torchvision.models)


def check_name(name):
    """ValueError for a NAME that is not a torchvision classification model: one line
    with the close names (all 80-odd would not read as one)."""
    valid = names()
    if name not in valid:
        close = difflib.get_close_matches(str(name), valid, n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "no close name"
        raise ValueError(f"unknown torchvision model '{name}' ({hint}; all: "
                         f"torchvision.models.list_models(module=torchvision.models))")


def build(name, norm, num_classes, groups=None, act=None, in_channels=3, norm_kwargs=None,
          **kw):
    """torchvision model `name` with its BatchNorms converted to `norm` (strict: a part
    that cannot be converted is a ValueError naming it). groups=None: per layer, the
    largest divisor of its channels up to 32 (convert_norms); eps: each BatchNorm's own
    unless norm_kwargs has "eps". in_channels other than 3 rebuilds the convolutions
    that read the image (timm's rule for their weights: summed for 1 channel, else
    repeated and scaled by 3 / in_channels)."""
    check_name(name)
    if kw:
        raise TypeError(f"model '{PREFIX}{name}' has no option {', '.join(sorted(kw))}; "
                        f"torchvision models take none (they keep torchvision's defaults)")
    if act is not None:
        raise ValueError(f"model '{PREFIX}{name}' keeps torchvision's activations: act must "
                         f"be unset (null), got '{act}'")
    norm_kwargs = dict(norm_kwargs or {})
    eps = norm_kwargs.pop("eps", None)
    model = _torchvision().models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        adapt_input_channels(model, in_channels, f"{PREFIX}{name}")
    model, report = convert_norms(model, norm, groups=groups, eps=eps, norm_kwargs=norm_kwargs,
                                  report=True)
    logging.getLogger(__name__).info("%s%s: %s", PREFIX, name, report)
    return model


def adapt_input_channels(model, in_channels, label):
    """Rebuild, in place, the Conv2d modules of `model` that read the image for
    in_channels (found in a torch.fx trace of the model)."""
    inputs = [node for node in fx.symbolic_trace(model).graph.nodes if node.op == "placeholder"]
    users = list(inputs[0].users) if len(inputs) == 1 else []
    convs = [model.get_submodule(node.target) for node in users if node.op == "call_module"]
    if not users or len(convs) != len(users) or not all(
            type(conv) is nn.Conv2d and conv.in_channels == 3 and conv.groups == 1
            for conv in convs):
        raise ValueError(f"{label} reads its image other than through 3-channel convolutions "
                         f"only: in_channels must be 3, got {in_channels}")
    for node in users:
        old = model.get_submodule(node.target)
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride,
                        old.padding, old.dilation, bias=old.bias is not None,
                        padding_mode=old.padding_mode, device=old.weight.device,
                        dtype=old.weight.dtype)
        with torch.no_grad():
            weight = old.weight
            if in_channels == 1:
                new.weight.copy_(weight.sum(dim=1, keepdim=True))
            else:
                repeats = -(-in_channels // 3)
                new.weight.copy_(weight.repeat(1, repeats, 1, 1)[:, :in_channels]
                                 * (3 / in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        parent, _, attr = node.target.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
