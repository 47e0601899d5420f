"""EfficientNet B0-B5 (Tan & Le 2019) with group convolutions and any normalisation.

Widths, depths, channel rounding (to multiples of 8), squeeze widths, dropout and
stochastic depth follow torchvision's efficientnet, so efficientnet_b0 with norm="batch"
and group_dim=1 has torchvision's 5,288,548 parameters (module names differ). Two options
from Masters et al. 2021 ("Making EfficientNet More Efficient"), as in Graphcore's
reference:
- group_dim: channels per group of the spatial conv; 1 = depthwise ("G1"), 16 = "G16".
  groups = max(1, C // group_dim), as the reference computes it. Where that does not
  divide C it is lowered to the nearest divisor of C (a group then holds more than
  group_dim channels; the reference would fail). For B0-B5 with expand_ratio 4 or 6 and
  group_dim 16 it always divides; only B3's 40-channel first block has groups of 20.
- expand_ratio: the inverted bottleneck's expansion (6; the G16 recipe uses 4). The first
  stage keeps ratio 1 (no expand conv), as the reference.

Normalisation placement (the authors' Proxy Norm reference): a norm-act after the stem,
after the expand conv, after the depthwise/group conv and in the head; with
group_pn/layer_pn these are full Proxy Norm layers, so Proxy Norm covers every
activation of the feature maps. The projection conv before the residual add gets the norm
with no activation (scale-only for the Proxy Norm names). Squeeze-and-excitation has a
plain activation (no norm) between its two 1x1 convs, on pooled channel descriptors. Where
the reference folds the depthwise Proxy Norm's scale into the SE gate, we keep the Proxy
Norm layer whole before SE and let SE gate its normalised output: the same function
class, and one Proxy Norm implementation for every position. Every norm uses eps=1e-3
(DESIGN.md; torchvision's BatchNorm momentum, 0.01 for B5, is not copied: the norm
options are the same for every model).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import DropPath


def make_divisible(value, divisor=8):
    """Round to the nearest multiple of `divisor`, never going down by more than 10%
    (torchvision's and TensorFlow's rule, which fixes every EfficientNet width)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_groups(channels, group_dim):
    """Groups of a conv with `group_dim` channels per group (see the module docstring)."""
    if not isinstance(group_dim, int) or group_dim < 1:
        raise ValueError(f"group_dim must be a positive integer, got {group_dim!r}")
    groups = max(1, channels // group_dim)
    while channels % groups:
        groups -= 1
    return groups


class ConvNormAct(nn.Sequential):
    """conv (no bias: a norm follows) then the model's norm-act, as `.conv` and `.bn`."""

    def __init__(self, in_channels, out_channels, kernel_size, norm_layer, stride=1, groups=1,
                 apply_act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              (kernel_size - 1) // 2, groups=groups, bias=False)
        self.bn = norm_layer("bn", out_channels, apply_act=apply_act)


class SqueezeExcite(nn.Module):
    """Channel gate from the per-sample spatial mean: x * sigmoid(fc2(act(fc1(mean x))))."""

    def __init__(self, channels, squeeze_channels, act):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = act
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)  # faster than mean() on IPUs (Graphcore's note)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(scale))))


class MBConv(nn.Module):
    """Inverted bottleneck: [expand 1x1] -> kxk depthwise/group conv -> SE -> project 1x1."""

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride, group_dim,
                 norm_layer, drop_path_rate):
        super().__init__()
        mid = make_divisible(in_channels * expand_ratio)
        self.expand = None
        if mid != in_channels:
            self.expand = ConvNormAct(in_channels, mid, 1, norm_layer.child("expand"))
        self.dw = ConvNormAct(mid, mid, kernel_size, norm_layer.child("dw"), stride,
                              groups=conv_groups(mid, group_dim))
        self.se = SqueezeExcite(mid, max(1, in_channels // 4), norm_layer.act_layer())
        self.project = ConvNormAct(mid, out_channels, 1, norm_layer.child("project"),
                                   apply_act=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path_rate) if self.use_residual else nn.Identity()

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.se(self.dw(out)))
        if self.use_residual:
            out = self.drop_path(out) + x
        return out


# expand ratio (None: the model's expand_ratio), kernel, stride, in, out, blocks: B0's stages
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (None, 3, 2, 16, 24, 2),
    (None, 5, 2, 24, 40, 2),
    (None, 3, 2, 40, 80, 3),
    (None, 5, 1, 80, 112, 3),
    (None, 5, 2, 112, 192, 4),
    (None, 3, 1, 192, 320, 1),
)

# name: (width multiplier, depth multiplier, dropout, native resolution); torchvision's
ARCHS = {
    "efficientnet_b0": (1.0, 1.0, 0.2, 224),
    "efficientnet_b1": (1.0, 1.1, 0.2, 240),
    "efficientnet_b2": (1.1, 1.2, 0.3, 260),
    "efficientnet_b3": (1.2, 1.4, 0.3, 300),
    "efficientnet_b4": (1.4, 1.8, 0.4, 380),
    "efficientnet_b5": (1.6, 2.2, 0.4, 456),
}


class EfficientNet(nn.Module):
    def __init__(self, width_mult, depth_mult, norm_layer, num_classes=1000, in_channels=3,
                 group_dim=1, expand_ratio=6, drop_rate=0.2, drop_path_rate=0.2):
        super().__init__()
        stages = [(expand_ratio if ratio is None else ratio, kernel, stride,
                   make_divisible(cin * width_mult), make_divisible(cout * width_mult),
                   int(math.ceil(blocks * depth_mult)))
                  for ratio, kernel, stride, cin, cout, blocks in STAGES]
        self.stem = ConvNormAct(in_channels, stages[0][3], 3, norm_layer.child("stem"), stride=2)

        total_blocks = sum(stage[-1] for stage in stages)
        block_id = 0
        stage_modules = []
        for i, (ratio, kernel, stride, cin, cout, blocks) in enumerate(stages):
            stage = []
            for j in range(blocks):
                # stochastic depth grows linearly with depth (torchvision's schedule)
                rate = drop_path_rate * block_id / total_blocks
                stage.append(MBConv(cin if j == 0 else cout, cout, ratio, kernel,
                                    stride if j == 0 else 1, group_dim,
                                    norm_layer.child(f"blocks.{i}.{j}"), rate))
                block_id += 1
            stage_modules.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*stage_modules)

        head_channels = 4 * stages[-1][4]
        self.head = ConvNormAct(stages[-1][4], head_channels, 1, norm_layer.child("head"))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(head_channels, num_classes)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = self.avgpool(x).flatten(1)
        return self.classifier(self.dropout(x))


def efficientnet(arch, norm_layer, num_classes, in_channels, group_dim=1, expand_ratio=6,
                 drop_rate=None, drop_path_rate=0.2):
    """drop_rate=None: the model's dropout before the classifier (B0 0.2 ... B5 0.4)."""
    width_mult, depth_mult, dropout, _ = ARCHS[arch]
    return EfficientNet(width_mult, depth_mult, norm_layer, num_classes, in_channels,
                        group_dim, expand_ratio, dropout if drop_rate is None else drop_rate,
                        drop_path_rate)
