"""Networks of the training command, built for any input shape and class count.

``--width`` multiplies every layer's width (at least one channel per layer). Networks
whose pooling would shrink small inputs (digits are 8x8) below one pixel skip the
pooling layers that no longer fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _w(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def conv_bn(c_in: int, c_out: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def mlp(in_shape: tuple[int, int, int], num_classes: int, width: float) -> nn.Module:
    """Two hidden layers of 256 units."""
    c, h, w = in_shape
    hidden = _w(256, width)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))


def cnn(in_shape: tuple[int, int, int], num_classes: int, width: float) -> nn.Module:
    """Three 3x3 conv-BN-ReLU layers (32, 64, 128 channels), one 2x2 max pool, global
    average pooling."""
    c1, c2, c3 = _w(32, width), _w(64, width), _w(128, width)
    return nn.Sequential(conv_bn(in_shape[0], c1), conv_bn(c1, c2), nn.MaxPool2d(2),
                         conv_bn(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c3, num_classes))


class _BasicBlock(nn.Module):
    """ResNet basic block; the shortcut of a downsampling block subsamples and pads
    channels with zeros (option A of He et al. 2016), as in the CIFAR ResNets."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, c_out, stride), conv_bn(c_out, c_out, relu=False))
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(self.body(x) + shortcut)


def resnet20(in_shape: tuple[int, int, int], num_classes: int, width: float) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages of 3 basic blocks, 16/32/64 channels."""
    widths = [_w(c, width) for c in (16, 32, 64)]
    layers: list[nn.Module] = [conv_bn(in_shape[0], widths[0])]
    c_in = widths[0]
    for stage, c in enumerate(widths):
        for block in range(3):
            layers.append(_BasicBlock(c_in, c, 2 if stage > 0 and block == 0 else 1))
            c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _pool_if_fits(size: int) -> tuple[list[nn.Module], int]:
    return ([nn.MaxPool2d(2)], size // 2) if size >= 2 else ([], size)


def resnet9(in_shape: tuple[int, int, int], num_classes: int, width: float) -> nn.Module:
    """The DAWNBench ResNet-9 (Page 2018): prep 64, then 128 / 256 / 512 channels with
    max pooling, residual blocks after the first and last, global max pooling and a
    linear layer scaled by 1/8."""
    c0, c1, c2, c3 = (_w(c, width) for c in (64, 128, 256, 512))
    size = min(in_shape[1:])
    layers: list[nn.Module] = [conv_bn(in_shape[0], c0)]
    for c_in, c_out, residual in ((c0, c1, True), (c1, c2, False), (c2, c3, True)):
        pool, size = _pool_if_fits(size)
        layers += [conv_bn(c_in, c_out), *pool]
        if residual:
            layers.append(_Residual(c_out))
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c3, num_classes, bias=False), _Scale(0.125)]
    return nn.Sequential(*layers)


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11(in_shape: tuple[int, int, int], num_classes: int, width: float) -> nn.Module:
    """VGG-11 with batch normalisation (configuration A of Simonyan & Zisserman 2015)
    and one linear classifier, as usual on CIFAR."""
    layers: list[nn.Module] = []
    c_in, size = in_shape[0], min(in_shape[1:])
    for v in _VGG11:
        if v == "M":
            pool, size = _pool_if_fits(size)
            layers += pool
        else:
            layers.append(conv_bn(c_in, _w(v, width)))
            c_in = _w(v, width)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[tuple[int, int, int], int, float], nn.Module]
    summary: str


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(cnn, "3-layer CNN (for digits)"),
    "mlp": ModelSpec(mlp, "2 hidden layers of 256 units (for digits)"),
    "resnet20": ModelSpec(resnet20, "ResNet-20 for CIFAR, 0.27M parameters"),
    "resnet9": ModelSpec(resnet9, "DAWNBench ResNet-9, 6.6M parameters"),
    "vgg11": ModelSpec(vgg11, "VGG-11 with batch norm (narrow it with --width)"),
}


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int, width: float) -> nn.Module:
    return MODELS[name].build(in_shape, num_classes, width)
