"""Small, deterministic CNNs for the pruning tests (importable by any test).

``resnet()`` (basic and bottleneck blocks, strided downsample shortcuts), ``mobilenet_v2()``
(inverted residuals: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, ReLU6, residual adds)
and ``vgg()`` (conv-BN-ReLU stacks, max pooling, flatten of a 2x2 map into a two-layer
classifier) take 3x16x16 images by default; ``concat_net()`` concatenates branches (and the
input itself). BatchNorm parameters and running statistics are drawn at random (seeded), so
that pruned channels carry non-zero constants and eval-mode outputs are not trivially equal.
``untraceable_net()`` branches on data, ``split_net()`` slices channels (neither can be pruned
by channel groups).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

INPUT_SHAPE = (3, 16, 16)


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random (seeded) affine parameters and running statistics for every BatchNorm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


# ----------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    """``stages``: (block, planes, blocks, first stride) per ``layerN``. The default: stem -> a
    basic block -> a strided basic block with a downsample -> a strided bottleneck with a
    downsample and one with an identity shortcut -> pool -> fc. ``imagenet_stem``: the 7x7/2 conv
    and 3x3/2 max pool of torchvision's ResNets (the module names are torchvision's too)."""

    SMALL = ((BasicBlock, 16, 1, 1), (BasicBlock, 32, 1, 2), (Bottleneck, 16, 2, 2))

    def __init__(self, stages=SMALL, num_classes=10, stem_width=16, imagenet_stem=False):
        super().__init__()
        w = stem_width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False) if imagenet_stem else nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        cin = w
        self.stages = []
        for i, (block, planes, n, stride) in enumerate(stages):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.stages.append(f"layer{i + 1}")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# ----------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion t, output channels c, repeats n, first stride s)
    SETTING = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2))
    IMAGENET = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes=10, setting=SETTING, stem=16, last=64):
        super().__init__()
        cin = stem
        feats = [_conv_bn(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in setting:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ----------------------------------------------------------------------------- VGG
class VGG(nn.Module):
    """Conv-BN-ReLU stacks with max pooling; the 2x2 map is flattened into a two-layer classifier
    (each conv channel feeds 4 inputs of the first linear layer)."""

    CFG = (16, 16, "M", 32, 32, "M", 48, "M")
    VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, num_classes=10, hidden=(64,), cfg=CFG, batch_norm=True, pool=None, spatial=2):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if batch_norm else [])
                layers.append(nn.ReLU(inplace=True))
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool) if pool else nn.Identity()
        head, width = [], cin * (pool[0] * pool[1] if pool else spatial * spatial)
        for h in hidden:
            head += [nn.Linear(width, h), nn.ReLU(True), nn.Dropout()]
            width = h
        self.classifier = nn.Sequential(*head, nn.Linear(width, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        x = x.view(x.size(0), -1)
        return self.classifier(x)


# ----------------------------------------------------------------------------- others
class ConcatNet(nn.Module):
    """Two branches concatenated (channel offsets), concatenated again with the pooled input
    (whose channels cannot be pruned), then a conv and the classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 12)
        self.a = _conv_bn(12, 8, 1)
        self.b = nn.Sequential(_conv_bn(12, 12, 3, groups=12), _conv_bn(12, 10, 1))
        self.mix = _conv_bn(8 + 10 + 3, 16, 3, 2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        s = self.stem(x)
        y = torch.cat([self.a(s), self.b(s)], dim=1)
        y = torch.cat([y, x], 1)
        y = self.mix(y)
        return self.fc(y.mean((2, 3)))


class UntraceableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _conv_bn(3, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return self.fc(y.mean((2, 3)))


class SplitNet(nn.Module):
    """Splits a conv's channels in two (channel slicing is not a supported dependency)."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.left = _conv_bn(8, 8)
        self.right = _conv_bn(16, 16)
        self.head = _conv_bn(16, 8)
        self.fc = nn.Linear(8 + 8, 4)

    def forward(self, x):
        s = self.stem(x)
        a, b = torch.chunk(s, 2, dim=1)
        y = self.head(self.right(s))
        return self.fc(torch.cat([self.left(a).mean((2, 3)), y.mean((2, 3))], 1))


def _build(cls, seed, *args, **kwargs):
    torch.manual_seed(seed)
    m = cls(*args, **kwargs)
    if not any(p.is_meta for p in m.parameters()):
        randomize_batchnorm(m, seed)
    return m.eval()


def resnet(seed=0, **kw):
    return _build(ResNet, seed, **kw)


def mobilenet_v2(seed=0, **kw):
    return _build(MobileNetV2, seed, **kw)


def vgg(seed=0, **kw):
    return _build(VGG, seed, **kw)


def concat_net(seed=0):
    return _build(ConcatNet, seed)


def untraceable_net(seed=0):
    return _build(UntraceableNet, seed)


def split_net(seed=0):
    return _build(SplitNet, seed)


MODELS = {"resnet": resnet, "mobilenet_v2": mobilenet_v2, "vgg": vgg}


# Full-size ImageNet architectures, layer for layer those of torchvision (same module names and
# parameter counts; BatchNorm statistics drawn at random as above), for 3x224x224 inputs.
def resnet18(seed=0, num_classes=1000):
    stages = tuple((BasicBlock, p, 2, 1 if i == 0 else 2) for i, p in enumerate((64, 128, 256, 512)))
    return _build(ResNet, seed, stages=stages, num_classes=num_classes, stem_width=64, imagenet_stem=True)


def resnet50(seed=0, num_classes=1000):
    stages = tuple((Bottleneck, p, n, 1 if i == 0 else 2) for i, (p, n) in enumerate(((64, 3), (128, 4), (256, 6),
                                                                                       (512, 3))))
    return _build(ResNet, seed, stages=stages, num_classes=num_classes, stem_width=64, imagenet_stem=True)


def mobilenet_v2_imagenet(seed=0, num_classes=1000):
    return _build(MobileNetV2, seed, num_classes=num_classes, setting=MobileNetV2.IMAGENET, stem=32, last=1280)


def vgg16(seed=0, num_classes=1000):
    return _build(VGG, seed, num_classes=num_classes, hidden=(4096, 4096), cfg=VGG.VGG16, batch_norm=False,
                  pool=(7, 7))


IMAGENET_MODELS = {"ResNet-18": resnet18, "MobileNetV2": mobilenet_v2_imagenet, "VGG-16": vgg16}


def images(n=4, seed=1, shape=INPUT_SHAPE):
    """A deterministic batch of ``n`` images."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
