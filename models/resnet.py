"""ResNet v1.5, ResNeXt and the small ResNets (CIFAR, digits), with any normalisation.

The ImageNet models have torchvision's structure and module names (conv1, bn1, layer1..4,
blocks with conv1/bn1/conv2/bn2[/conv3/bn3] and downsample.0/.1, fc), so with norm="batch"
torchvision's state_dicts load strictly. v1.5: a Bottleneck strides in its 3x3 conv.

The norm-act layers hold their activation, so a block computes `bn1(conv1(x))` where
torchvision computes `relu(bn1(conv1(x)))`. The last norm of a residual branch and the
downsample norm have no activation (apply_act=False: for the Proxy Norm names that is the
scale-only group/layer norm); the activation after the add is a plain one.
`zero_init_residual=True` (our default; torchvision's is False) starts every branch at zero.

Proxy Norm covers every activation of these models but the ReLU after each residual add:
no norm precedes it, so the residual stream stays non-negative and uncentred per channel,
which Proxy Norm exists to prevent. Use them for BatchNorm and torchvision compatibility;
Proxy Norm configs use the pre-activation models (preact_resnet.py), where every
activation follows its own norm.

Small models (stem: one 3x3 conv at stride 1, no max-pool; three stages of basic blocks,
16/32/64 channels):
- cifar_resnet20/56 (He et al. 2016, 3n+2 layers). Shortcuts that change shape use a 1x1
  conv + norm projection (the paper's option B) rather than option A's zero padding: it is
  torchvision's downsample, the same code as the ImageNet models.
- digits_resnet: one block per stage (78k parameters), for the 8x8 digits upsampled to
  32x32. Every stage strides by 2 (32 -> 16 -> 8 -> 4): the image holds only 8x8 pixels
  of information, and with stage strides 1/2/2 the receptive field (25 px) missed most of
  the digit and training crawled. Its zero_init_residual defaults to False: with a single
  block per stage a zeroed branch leaves a 3-projection network at the start, and in our
  CPU runs it took ~8 epochs instead of 3 to pass 97%. Global average pooling makes it
  resolution-agnostic.
Their default GroupNorm groups is 8 (32 does not divide 16 channels); see models/__init__.py.
"""
from torch import nn

from models.layers import zero_init_last


def conv3x3(in_planes, out_planes, stride=1, groups=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, norm_layer, stride=1, downsample=None,
                 cardinality=1, base_width=64):
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports cardinality=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer("bn1", planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer("bn2", planes, apply_act=False)
        self.downsample = downsample
        self.act = norm_layer.act_layer()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.act(out + identity)

    def zero_init_residual(self):
        zero_init_last(self.bn2, self.conv2)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, norm_layer, stride=1, downsample=None,
                 cardinality=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * cardinality
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer("bn1", width)
        self.conv2 = conv3x3(width, width, stride, cardinality)
        self.bn2 = norm_layer("bn2", width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer("bn3", planes * self.expansion, apply_act=False)
        self.downsample = downsample
        self.act = norm_layer.act_layer()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(out))
        return self.act(out + identity)

    def zero_init_residual(self):
        zero_init_last(self.bn3, self.conv3)


class ResNet(nn.Module):
    """A stem, one stage (`layer1`, `layer2`, ...) per entry of `layers`, pooling, fc.

    stem="imagenet": 7x7 conv at stride 2 and a 3x3 max-pool (torchvision's);
    stem="small": one 3x3 conv at stride 1 (CIFAR-style, for 32x32 inputs).
    `cardinality` and `width_per_group` make a ResNeXt (torchvision calls the former
    `groups`; here `groups` means GroupNorm groups).
    """

    def __init__(self, block, layers, norm_layer, num_classes=1000, in_channels=3,
                 widths=(64, 128, 256, 512), strides=(1, 2, 2, 2), stem="imagenet",
                 zero_init_residual=True, cardinality=1, width_per_group=64):
        super().__init__()
        self.cardinality, self.base_width = cardinality, width_per_group
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2,
                                   padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "small":
            self.conv1 = conv3x3(in_channels, self.inplanes)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem '{stem}'; valid: imagenet, small")
        self.bn1 = norm_layer("bn1", self.inplanes)
        self.num_stages = len(layers)
        for i, (planes, blocks, stride) in enumerate(zip(widths, layers, strides)):
            name = f"layer{i + 1}"
            stage = self._make_layer(block, planes, blocks, stride, norm_layer.child(name))
            self.add_module(name, stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # norm layers initialise themselves (scale 1, shift 0, proxy parameters 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_residual()

    def _make_layer(self, block, planes, blocks, stride, norm_layer):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer.child("0.downsample")("1", planes * block.expansion, apply_act=False),
            )
        layers = []
        for i in range(blocks):
            layers.append(block(self.inplanes, planes, norm_layer.child(str(i)),
                                stride if i == 0 else 1, downsample if i == 0 else None,
                                self.cardinality, self.base_width))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        return self.fc(x.flatten(1))


# name: (block, blocks per stage, cardinality, width per group); torchvision's table
IMAGENET_ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
}

# name: (basic blocks per stage, stage strides, default zero_init_residual); stages of
# 16, 32 and 64 channels
SMALL_ARCHS = {
    "cifar_resnet20": ((3, 3, 3), (1, 2, 2), True),
    "cifar_resnet56": ((9, 9, 9), (1, 2, 2), True),
    "digits_resnet": ((1, 1, 1), (2, 2, 2), False),
}


def resnet(arch, norm_layer, num_classes, in_channels, zero_init_residual=True):
    block, layers, cardinality, width_per_group = IMAGENET_ARCHS[arch]
    return ResNet(block, layers, norm_layer, num_classes, in_channels,
                  zero_init_residual=zero_init_residual, cardinality=cardinality,
                  width_per_group=width_per_group)


def small_resnet(arch, norm_layer, num_classes, in_channels, zero_init_residual=None):
    """zero_init_residual=None: the model's default (False for digits_resnet)."""
    layers, strides, zero_init_default = SMALL_ARCHS[arch]
    if zero_init_residual is None:
        zero_init_residual = zero_init_default
    return ResNet(BasicBlock, layers, norm_layer, num_classes, in_channels, widths=(16, 32, 64),
                  strides=strides, stem="small", zero_init_residual=zero_init_residual)
