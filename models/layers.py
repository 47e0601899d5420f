"""Building blocks the model families share: the norm-act factory and stochastic depth.

`NormAct` is how a model gets its normalisation layers: it calls `get_norm_act` with the
model's norm, activation, groups, eps and options, and puts the module path into any error,
so an impossible combination names the layer it happened in. Must run on torch 2.0.
"""
import torch
from torch import nn

from proxynorm.activations import get_act
from proxynorm.norms import get_norm_act


class NormAct:
    """The norm-act layers of one model, built by name with the model's settings.

    Blocks ask for a layer by its attribute name (`norm_layer("bn1", 64)`) and hand their
    children a prefixed factory (`norm_layer.child("layer2.0")`), so that a layer that
    cannot be built reports its full module path, e.g. "layer2.0.bn1: ...".
    """

    def __init__(self, norm, act, groups=None, eps=None, norm_kwargs=None, prefix=""):
        self.norm, self.act, self.groups, self.eps = norm, act, groups, eps
        self.norm_kwargs = dict(norm_kwargs or {})
        self.prefix = prefix

    def path(self, name):
        return f"{self.prefix}.{name}" if self.prefix else name

    def child(self, name):
        return NormAct(self.norm, self.act, self.groups, self.eps, self.norm_kwargs,
                       self.path(name))

    def __call__(self, name, channels, apply_act=True):
        try:
            return get_norm_act(self.norm, channels, act=self.act, groups=self.groups,
                                eps=self.eps, apply_act=apply_act, **self.norm_kwargs)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{self.path(name)}: {error}") from None

    def act_layer(self):
        """The plain activation (after a residual add, inside squeeze-and-excitation)."""
        return get_act(self.act)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops a whole residual branch per sample.

    Kept samples are scaled by 1 / (1 - p) so the expected output is unchanged; eval is
    the identity. Written here rather than torchvision.ops so models/ needs torch only.
    """

    def __init__(self, p=0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype,
                           device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


def zero_init_last(norm, conv):
    """Start a residual branch at zero: its last norm's scale or, with no norm there, its
    last conv (norm 'none'), so every block begins as the identity (Goyal et al. 2017)."""
    weight = getattr(norm, "weight", None)
    nn.init.zeros_(weight if isinstance(weight, torch.Tensor) else conv.weight)
