"""torchvision's classification CNNs with any normalisation: `get_model("torchvision:NAME")`.

The model is torchvision's own (`torchvision.models.get_model(NAME, weights=None)`, never
pretrained weights: nothing is downloaded), which models.get_model rewrites with
`convert_norms`. It keeps torchvision's activations, widths and options: our family
options (group_dim, expand_ratio, drop_rate, drop_path_rate, ...) and `act` are refused,
not ignored. torchvision is imported only here, on first use (IPU hosts may lack it).
models/timm_models.py is the same for timm.
"""
import difflib

import torch
from torch import fx, nn

PREFIX = "torchvision:"
LABEL = "torchvision"


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


def create(name, num_classes, in_channels=3):
    """torchvision's model `name` (random weights), its BatchNorms as torchvision builds
    them. in_channels other than 3 rebuilds the convolutions that read the image (timm's
    rule for their weights: summed for 1 channel, else repeated and scaled by
    3 / in_channels)."""
    model = _torchvision().models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        adapt_input_channels(model, in_channels, f"{PREFIX}{name}")
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
