"""The activations a norm-act layer can apply, by name.

Proxy Norm computes its statistics by pushing its Gaussian proxy through the activation
module itself (proxynorm/proxy.py), so every entry works with every norm. The fused ops
(proxynorm.ops) implement FUSED_ACTS; a Proxy Norm layer with another activation runs the
eager PyTorch expression of the same maths. relu6 and hardswish are there for converted
MobileNets, leaky_relu (torch's default slope, 0.01) for timm's CSPNets and DarkNets, mish
for models that use it (proxynorm/convert.py).
"""
import difflib

from torch import nn

ACTS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,  # exact (erf) GELU, as nn.GELU's default
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "leaky_relu": nn.LeakyReLU,  # negative_slope 0.01, torch's default
    "mish": nn.Mish,
    "identity": nn.Identity,
}
FUSED_ACTS = ("relu", "silu", "gelu", "identity")


def unknown_name_error(kind, name, valid):
    """A ValueError naming the bad value, the closest valid one and all valid ones."""
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ValueError(f"unknown {kind} '{name}'{hint}; valid names: {', '.join(valid)}")


def check_act(name):
    if name not in ACTS:
        raise unknown_name_error("activation", name, list(ACTS))


def get_act(name):
    """A fresh activation module; never in-place, since Proxy Norm reuses its input."""
    check_act(name)
    return ACTS[name]()
