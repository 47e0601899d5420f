"""Pre-activation ResNet v2 (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Each bottleneck computes bn1 -> conv1 -> bn2 -> conv2 -> bn3 -> conv3 and adds the
shortcut with no activation after the add, so the identity path stays clean. Every norm
is followed by its activation, so with group_pn/layer_pn each one is a full Proxy Norm
layer. A shortcut that changes shape is a 1x1 conv on the pre-activated input (bn1's
output), as in the paper and timm/BiT. The stem is a 7x7 conv and a max-pool with no norm
(the first block's bn1 normalises it), and a final norm-act (`bn_final`) precedes pooling.
The stride sits on the 3x3 conv, as in ResNet v1.5. `zero_init_residual=True` zeroes each
block's conv3 (no norm follows it), so every block starts as the identity.
"""
from torch import nn

from models.layers import zero_init_last
from models.resnet import conv1x1, conv3x3


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, norm_layer, stride=1):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = norm_layer("bn1", inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = norm_layer("bn2", planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = norm_layer("bn3", planes)
        self.conv3 = conv1x1(planes, out_planes)
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


class PreActResNet(nn.Module):
    def __init__(self, layers, norm_layer, num_classes=1000, in_channels=3,
                 zero_init_residual=True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            name = f"layer{i + 1}"
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(PreActBottleneck(inplanes, planes,
                                              norm_layer.child(f"{name}.{j}"), stride))
                inplanes = planes * PreActBottleneck.expansion
            self.add_module(name, nn.Sequential(*stage))
        self.bn_final = norm_layer("bn_final", inplanes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, PreActBottleneck):
                    zero_init_last(None, m.conv3)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(self.bn_final(x))
        return self.fc(x.flatten(1))


def resnet50v2(norm_layer, num_classes, in_channels, zero_init_residual=True):
    return PreActResNet((3, 4, 6, 3), norm_layer, num_classes, in_channels, zero_init_residual)
