"""Small model zoo for the paper's settings (no torchvision): MLP (LeNet-300-100), LeNet-5, VGG-11,
ResNet-20/56, a MobileNetV2 and an EfficientNet-style network (MBConv blocks with squeeze-and-excitation) for
CIFAR-sized inputs, the digits CNN of ``submod demo``, and a 1-D CNN for
MNIST-1D signals.

Every builder records its name and arguments in ``model._submod_spec`` so that :func:`nn_adapters.save_pruned`
can rebuild the architecture on load without pickling code.

Examples
--------
>>> import torch
>>> from nn_adapters import zoo
>>> zoo.resnet20()(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mlp", "lenet5", "vgg11_cifar", "resnet20", "resnet56", "resnet_cifar", "mobilenetv2_cifar",
           "efficientnet_cifar", "digits_cnn", "mnist1d_cnn", "BUILDERS", "build"]


def _tag(model: nn.Module, name: str, **kwargs: object) -> nn.Module:
    model._submod_spec = {"name": name, "kwargs": kwargs}
    return model


def mlp(in_features: int = 784, hidden: Sequence[int] = (300, 100), out_features: int = 10) -> nn.Sequential:
    """Fully connected ReLU network (default LeNet-300-100)."""
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, out_features))
    return _tag(nn.Sequential(*layers), "mlp", in_features=in_features, hidden=list(hidden),
                out_features=out_features)


def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> nn.Sequential:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; ``input_size`` 28 pads the first convolution."""
    pad = 2 if input_size == 28 else 0
    side = ((input_size + 2 * pad - 4) // 2 - 4) // 2
    model = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))
    return _tag(model, "lenet5", in_channels=in_channels, num_classes=num_classes, input_size=input_size)


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs (CIFAR variant: one 512-wide hidden classifier layer)."""

    def __init__(self, cfg: Sequence[int | str], num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                w = max(1, int(round(int(v) * width)))
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        hidden = max(1, int(round(512 * width)))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg11_cifar(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-11 with BatchNorm for CIFAR (32x32); ``width`` scales every layer (e.g. 0.25 for quick tests)."""
    return _tag(VGG(_VGG11, num_classes, width), "vgg11_cifar", num_classes=num_classes, width=width)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with the parameter-free option-A shortcut of the CIFAR ResNets."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if planes < in_planes:
            raise ValueError(f"the option-A shortcut only adds channels: planes ({planes}) < in_planes ({in_planes})")
        self.downsample = stride != 1 or in_planes != planes
        self.stride = stride
        # zero channels before and after the input's (odd differences put the extra one after)
        self.pad = ((planes - in_planes) // 2, planes - in_planes - (planes - in_planes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample:
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, *self.pad))
        return F.relu(out + x)


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2): 16-32-64 channels, ``n`` basic blocks per stage."""

    def __init__(self, n: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        c = width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(c, planes, stride))
                c = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet_cifar(depth: int = 20, num_classes: int = 10, width: int = 16) -> ResNetCifar:
    """CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110 ...)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 56, ...); got {depth}.")
    return _tag(ResNetCifar((depth - 2) // 6, num_classes, width), "resnet_cifar", depth=depth,
                num_classes=num_classes, width=width)


def resnet20(num_classes: int = 10, width: int = 16) -> ResNetCifar:
    """ResNet-20 for CIFAR (0.27M parameters at width 16)."""
    return resnet_cifar(20, num_classes, width)


def resnet56(num_classes: int = 10, width: int = 16) -> ResNetCifar:
    """ResNet-56 for CIFAR (0.85M parameters at width 16)."""
    return resnet_cifar(56, num_classes, width)


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted-residual block (Sandler et al. 2018): expand 1x1, depthwise 3x3, linear project 1x1.

    ``expand -> BN -> ReLU6 -> depthwise (stride) -> BN -> ReLU6 -> project -> BN``, plus the input when the
    stride is 1 and the channels match. The ``in_planes * expand_ratio`` hidden channels are prunable (the pair
    ``expand -> project``, through both BatchNorms and the depthwise convolution); the project convolution's output
    is not when it feeds the residual sum.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int = 6) -> None:
        super().__init__()
        hidden = in_planes * expand_ratio
        self.expand = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.residual = stride == 1 and in_planes == out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out))
        return x + out if self.residual else out


#: ``(output channels, blocks, stride of the first block)`` per stage of the small CIFAR MobileNetV2.
_MOBILENETV2_CIFAR = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 2, 2), (96, 2, 1))


class _StemBlocksHead(nn.Module):
    """The layout MobileNetV2 and EfficientNet share: a 3x3 stem conv -> BN -> act, the blocks, a 1x1 head conv ->
    BN -> act, global average pooling and a Linear classifier. ``make_block(in, out, stride, spec)`` builds one
    block of a stage; every channel count is scaled by ``width_mult`` (at least 1)."""

    act = staticmethod(F.relu6)

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int, width_mult: float, stem: int,
                 head: int, make_block: Callable[[int, int, int, Sequence[int]], nn.Module]) -> None:
        super().__init__()

        def scaled(c: int) -> int:
            return max(1, int(round(c * width_mult)))

        c = scaled(stem)
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        blocks = []
        for spec in stages:
            out_planes, n, stride = self._stage_sizes(spec)
            for b in range(n):
                blocks.append(make_block(c, scaled(out_planes), stride if b == 0 else 1, spec))
                c = scaled(out_planes)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c, scaled(head), 1, bias=False)
        self.head_bn = nn.BatchNorm2d(scaled(head))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(scaled(head), num_classes)

    @staticmethod
    def _stage_sizes(spec: Sequence[int]) -> tuple[int, int, int]:
        """``(output channels, blocks, stride of the first block)`` of a stage."""
        return spec[0], spec[1], spec[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.act(self.bn(self.stem(x))))
        out = self.act(self.head_bn(self.head(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class MobileNetV2Cifar(_StemBlocksHead):
    """A MobileNetV2 for 32x32 inputs: a 3x3 stem, inverted-residual stages, a 1x1 head, global pooling, Linear."""

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int = 10, width_mult: float = 1.0,
                 stem: int = 32, head: int = 320, expand_ratio: int = 6) -> None:
        super().__init__(stages, num_classes, width_mult, stem, head,
                         lambda cin, cout, stride, _spec: InvertedResidual(cin, cout, stride, expand_ratio))


def mobilenetv2_cifar(num_classes: int = 10, width_mult: float = 1.0,
                      stages: Sequence[Sequence[int]] = _MOBILENETV2_CIFAR, stem: int = 32, head: int = 320,
                      expand_ratio: int = 6) -> MobileNetV2Cifar:
    """A small MobileNetV2 for CIFAR-sized inputs (32x32), with inverted-residual blocks of expand ratio 6.

    ``stages`` lists ``(output channels, blocks, stride of the first block)``; ``width_mult`` scales every channel
    count (e.g. 0.25 for quick tests). The hidden channels of every block are prunable through its depthwise
    convolution; so are the stem's and the last project's outputs when no residual sum reads them.

    Examples
    --------
    >>> import torch
    >>> from nn_adapters import zoo
    >>> zoo.mobilenetv2_cifar(width_mult=0.25)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    stages = [[int(v) for v in stage] for stage in stages]
    if not width_mult > 0 or expand_ratio < 1 or min(stem, head) < 1:
        raise ValueError(f"width_mult must be > 0 and expand_ratio, stem and head >= 1; got width_mult={width_mult}, "
                         f"expand_ratio={expand_ratio}, stem={stem}, head={head}.")
    if not stages or any(len(stage) != 3 or min(stage) < 1 for stage in stages):
        raise ValueError("stages must be a non-empty list of (output channels, blocks, stride) with every entry >= 1; "
                         f"got {stages}.")
    return _tag(MobileNetV2Cifar(stages, num_classes, width_mult, stem, head, expand_ratio), "mobilenetv2_cifar",
                num_classes=num_classes, width_mult=width_mult, stages=stages, stem=stem, head=head,
                expand_ratio=expand_ratio)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): ``x * sigmoid(fc2(silu(fc1(mean(x)))))`` with ``fc1``/``fc2`` 1x1
    convolutions on the pooled ``(N, C, 1, 1)`` map, or (``linear=True``) ``Linear`` layers on the pooled
    ``(N, C)``."""

    def __init__(self, channels: int, reduced: int, linear: bool = False) -> None:
        super().__init__()
        self.linear = linear
        layer = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.fc1, self.fc2 = layer(channels, reduced), layer(reduced, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=not self.linear)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        return x * (s[:, :, None, None] if self.linear else s)


class MBConv(nn.Module):
    """EfficientNet's mobile inverted bottleneck (Tan & Le 2019): ``expand 1x1 -> BN -> SiLU -> depthwise k x k
    (stride) -> BN -> SiLU -> squeeze-and-excitation -> project 1x1 -> BN``, plus the input when the stride is 1 and
    the channels match. With ``expand_ratio == 1`` there is no expand convolution (the block's input is filtered
    directly). The hidden channels are prunable as the pair ``expand -> project`` (through both BatchNorms, the
    depthwise convolution and the gate, whose ``fc1`` columns and ``fc2`` rows follow them)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int, kernel: int = 3,
                 se_ratio: float = 0.25, se_linear: bool = False) -> None:
        super().__init__()
        hidden = in_planes * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self.expand = nn.Conv2d(in_planes, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden,
                                   bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(1, int(in_planes * se_ratio)), se_linear)
        self.project = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.residual = stride == 1 and in_planes == out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.bn1(self.expand(x))) if self.has_expand else x
        out = self.se(F.silu(self.bn2(self.depthwise(out))))
        out = self.bn3(self.project(out))
        return x + out if self.residual else out


#: ``(expand ratio, output channels, blocks, stride of the first block, depthwise kernel)`` per stage of the small
#: CIFAR EfficientNet (EfficientNet-B0's first five stages, fewer blocks).
_EFFICIENTNET_CIFAR = ((1, 16, 1, 1, 3), (6, 24, 2, 1, 3), (6, 40, 2, 2, 5), (6, 80, 2, 2, 3), (6, 112, 1, 1, 5))


class EfficientNetCifar(_StemBlocksHead):
    """An EfficientNet for small inputs: a 3x3 stem, MBConv stages with squeeze-and-excitation, a 1x1 head, global
    pooling, Linear; SiLU throughout."""

    act = staticmethod(F.silu)

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int = 10, width_mult: float = 1.0,
                 stem: int = 32, head: int = 320, se_ratio: float = 0.25, se_linear: bool = False) -> None:
        super().__init__(stages, num_classes, width_mult, stem, head,
                         lambda cin, cout, stride, spec: MBConv(cin, cout, stride, spec[0], spec[4], se_ratio,
                                                                se_linear))

    @staticmethod
    def _stage_sizes(spec: Sequence[int]) -> tuple[int, int, int]:
        """``(expand ratio, output channels, blocks, stride, kernel)`` -> output channels, blocks, stride."""
        return spec[1], spec[2], spec[3]


def efficientnet_cifar(num_classes: int = 10, width_mult: float = 1.0,
                       stages: Sequence[Sequence[int]] = _EFFICIENTNET_CIFAR, stem: int = 32, head: int = 320,
                       se_ratio: float = 0.25, se_linear: bool = False) -> EfficientNetCifar:
    """A small EfficientNet for CIFAR-sized inputs (32x32): MBConv blocks with squeeze-and-excitation.

    ``stages`` lists ``(expand ratio, output channels, blocks, stride of the first block, odd depthwise kernel)``;
    ``width_mult`` scales every channel count (e.g. 0.25 for quick tests); each gate reduces to
    ``max(1, int(block input channels * se_ratio))`` channels, with 1x1 convolutions or (``se_linear=True``)
    ``Linear`` layers. The hidden channels of every block with an expand convolution are prunable through its
    depthwise convolution and gate (a block with expand ratio 1 gates the previous layer's output: the stem's
    channels are then pruned through it when no residual sum reads them).

    Examples
    --------
    >>> import torch
    >>> from nn_adapters import zoo
    >>> zoo.efficientnet_cifar(width_mult=0.25)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    stages = [[int(v) for v in stage] for stage in stages]
    if not width_mult > 0 or min(stem, head) < 1 or not 0 < se_ratio <= 1:
        raise ValueError(f"width_mult must be > 0, stem and head >= 1 and se_ratio in (0, 1]; got "
                         f"width_mult={width_mult}, stem={stem}, head={head}, se_ratio={se_ratio}.")
    if not stages or any(len(stage) != 5 or min(stage) < 1 or stage[4] % 2 == 0 for stage in stages):
        raise ValueError("stages must be a non-empty list of (expand ratio, output channels, blocks, stride, kernel) "
                         f"with every entry >= 1 and an odd kernel; got {stages}.")
    return _tag(EfficientNetCifar(stages, num_classes, width_mult, stem, head, se_ratio, se_linear),
                "efficientnet_cifar", num_classes=num_classes, width_mult=width_mult, stages=stages, stem=stem,
                head=head, se_ratio=se_ratio, se_linear=se_linear)


def digits_cnn(channels: Sequence[int] = (16, 32), hidden: int = 64, num_classes: int = 10) -> nn.Sequential:
    """The LeNet-style CNN of ``submod demo`` for scikit-learn's 8x8 digits.

    conv3x3(1->c1) BN ReLU, conv3x3(c1->c2) BN ReLU, maxpool 2, flatten (c2 x 4 x 4), Linear(->hidden), ReLU,
    Linear(->10). Its three prunable pairs cover conv->conv (through BatchNorm), conv->linear (through pooling and
    flatten) and linear->linear.
    """
    c1, c2 = channels
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return _tag(model, "digits_cnn", channels=list(channels), hidden=hidden, num_classes=num_classes)


def mnist1d_cnn(channels: Sequence[int] = (32, 64, 64), num_classes: int = 10, length: int = 40) -> nn.Sequential:
    """A 1-D CNN for MNIST-1D (Greydanus 2020: signals of ``length`` 40, one channel, 10 classes).

    conv5(1->c1) BN ReLU, conv3(c1->c2) BN ReLU, maxpool 2, conv3(c2->c3) BN ReLU, maxpool 2, flatten
    (c3 x length/4), Linear(->classes); every convolution is zero-padded to keep the length. Its three prunable pairs
    are Conv1d->Conv1d (through BatchNorm1d), Conv1d->Conv1d (through pooling) and Conv1d->Flatten->Linear.

    Examples
    --------
    >>> import torch
    >>> from nn_adapters import zoo
    >>> zoo.mnist1d_cnn()(torch.zeros(2, 1, 40)).shape
    torch.Size([2, 10])
    """
    if length % 4:
        raise ValueError(f"length must be a multiple of 4 (two poolings by 2); got {length}.")
    c1, c2, c3 = channels
    model = nn.Sequential(
        nn.Conv1d(1, c1, 5, padding=2), nn.BatchNorm1d(c1), nn.ReLU(),
        nn.Conv1d(c1, c2, 3, padding=1), nn.BatchNorm1d(c2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(c2, c3, 3, padding=1), nn.BatchNorm1d(c3), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(),
        nn.Linear(c3 * (length // 4), num_classes))
    return _tag(model, "mnist1d_cnn", channels=list(channels), num_classes=num_classes, length=length)


BUILDERS = {"mlp": mlp, "lenet5": lenet5, "vgg11_cifar": vgg11_cifar, "resnet_cifar": resnet_cifar,
            "mobilenetv2_cifar": mobilenetv2_cifar, "efficientnet_cifar": efficientnet_cifar, "digits_cnn": digits_cnn,
            "mnist1d_cnn": mnist1d_cnn}


def build(name: str, **kwargs: object) -> nn.Module:
    """Build a zoo model by name (used when loading a saved pruned model)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(BUILDERS)}.")
    return BUILDERS[name](**kwargs)
