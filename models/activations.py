"""The activations a norm-act layer can apply, by name."""
import difflib

from torch import nn

ACTS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,  # exact (erf) GELU, as nn.GELU's default
    "identity": nn.Identity,
}


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
