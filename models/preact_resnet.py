"""Pre-activation ResNets v2 (He et al. 2016, "Identity Mappings in Deep Residual Networks").

A block normalises and activates its input first (`bn1`), runs its convs with a norm-act
before each later conv, and adds the shortcut with nothing after the add, so the identity
path stays clean. Every norm is followed by its activation, so with group_pn/layer_pn
**every activation of the network is a full Proxy Norm layer** (in a v1 ResNet the ReLU
after each add has no norm before it and Proxy Norm never sees it; see models/resnet.py).
A shortcut that changes shape is a 1x1 conv on the pre-activated input (bn1's output), as
in the paper and timm/BiT. A final norm-act (`bn_final`) precedes pooling.
`zero_init_residual=True` zeroes each block's last conv (no norm follows it), so every
block starts as the identity.

ImageNet models (stem: 7x7 conv at stride 2 and a max-pool, no norm; bottleneck blocks
bn1 -> conv1 -> bn2 -> conv2 -> bn3 -> conv3 with the stride on the 3x3 conv, as in v1.5):
  resnet50v2, resnet101v2, resnext50v2_32x4d (cardinality 32, 4 channels per group)
Small models for 32x32 inputs (stem: one 3x3 conv at stride 1, no norm; basic blocks
bn1 -> conv1 -> bn2 -> conv2; stages of 16/32/64 channels):
  cifar_preact_resnet20, cifar_preact_resnet56,  strides 1/2/2, 6n+2 layers (n = 3, 9, 18
  cifar_preact_resnet110                         blocks per stage)
  digits_preact_resnet                           one block per stage, strides 2/2/2, as
                                                 digits_resnet (for the 8x8 digits)
"""
from torch import nn

from models.layers import zero_init_last
from models.resnet import conv1x1, conv3x3


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, norm_layer, stride=1, cardinality=1, base_width=64):
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock only supports cardinality=1 and base_width=64")
        self.bn1 = norm_layer("bn1", inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = norm_layer("bn2", planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = conv1x1(inplanes, planes, stride)

    def forward(self, x):
        preact = self.bn1(x)
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv2(self.bn2(self.conv1(preact)))
        return out + shortcut

    def last_conv(self):
        return self.conv2


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, norm_layer, stride=1, cardinality=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * cardinality
        out_planes = planes * self.expansion
        self.bn1 = norm_layer("bn1", inplanes)
        self.conv1 = conv1x1(inplanes, width)
        self.bn2 = norm_layer("bn2", width)
        self.conv2 = conv3x3(width, width, stride, cardinality)
        self.bn3 = norm_layer("bn3", width)
        self.conv3 = conv1x1(width, out_planes)
        self.downsample = None
        if stride != 1 or inplanes != out_planes:
            self.downsample = conv1x1(inplanes, out_planes, stride)

    def forward(self, x):
        preact = self.bn1(x)
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv1(preact)
        out = self.conv2(self.bn2(out))
        out = self.conv3(self.bn3(out))
        return out + shortcut

    def last_conv(self):
        return self.conv3


class PreActResNet(nn.Module):
    """A stem (no norm), one stage (`layer1`, `layer2`, ...) per entry of `layers`, the final
    norm-act `bn_final`, pooling, fc. `stem` is "imagenet" or "small" as in resnet.ResNet."""

    def __init__(self, block, layers, norm_layer, num_classes=1000, in_channels=3,
                 widths=(64, 128, 256, 512), strides=(1, 2, 2, 2), stem="imagenet",
                 zero_init_residual=True, cardinality=1, width_per_group=64):
        super().__init__()
        inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, inplanes, kernel_size=7, stride=2, padding=3,
                                   bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "small":
            self.conv1 = conv3x3(in_channels, inplanes)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem '{stem}'; valid: imagenet, small")
        self.num_stages = len(layers)
        for i, (planes, blocks, stride) in enumerate(zip(widths, layers, strides)):
            name = f"layer{i + 1}"
            stage = []
            for j in range(blocks):
                stage.append(block(inplanes, planes, norm_layer.child(f"{name}.{j}"),
                                   stride if j == 0 else 1, cardinality, width_per_group))
                inplanes = planes * block.expansion
            self.add_module(name, nn.Sequential(*stage))
        self.bn_final = norm_layer("bn_final", inplanes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (PreActBasicBlock, PreActBottleneck)):
                    zero_init_last(None, m.last_conv())

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(self.bn_final(x))
        return self.fc(x.flatten(1))


# name: (blocks per stage, cardinality, width per group); bottleneck blocks
IMAGENET_ARCHS = {
    "resnet50v2": ((3, 4, 6, 3), 1, 64),
    "resnet101v2": ((3, 4, 23, 3), 1, 64),
    "resnext50v2_32x4d": ((3, 4, 6, 3), 32, 4),
}

# name: (basic blocks per stage, stage strides, default zero_init_residual); stages of 16,
# 32 and 64 channels. digits_preact_resnet is digits_resnet's layout (models/resnet.py says
# why it strides every stage and keeps its branches at their random init).
SMALL_ARCHS = {
    "cifar_preact_resnet20": ((3, 3, 3), (1, 2, 2), True),
    "cifar_preact_resnet56": ((9, 9, 9), (1, 2, 2), True),
    "cifar_preact_resnet110": ((18, 18, 18), (1, 2, 2), True),
    "digits_preact_resnet": ((1, 1, 1), (2, 2, 2), False),
}


def preact_resnet(arch, norm_layer, num_classes, in_channels, zero_init_residual=True):
    layers, cardinality, width_per_group = IMAGENET_ARCHS[arch]
    return PreActResNet(PreActBottleneck, layers, norm_layer, num_classes, in_channels,
                        zero_init_residual=zero_init_residual, cardinality=cardinality,
                        width_per_group=width_per_group)


def small_preact_resnet(arch, norm_layer, num_classes, in_channels, zero_init_residual=None):
    """zero_init_residual=None: the model's default (False for digits_preact_resnet)."""
    layers, strides, zero_init_default = SMALL_ARCHS[arch]
    if zero_init_residual is None:
        zero_init_residual = zero_init_default
    return PreActResNet(PreActBasicBlock, layers, norm_layer, num_classes, in_channels,
                        widths=(16, 32, 64), strides=strides, stem="small",
                        zero_init_residual=zero_init_residual)
