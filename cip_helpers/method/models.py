"""Model zoo. Every model takes raw images in [0, 1] and normalises inside (as a real API would).

* ``cnn``: a small 2-conv CNN, the quick-profile victim and surrogate (MNIST: ~97 % in ~30 s on 2 cores).
* ``cnn_wide``/``mlp``: different architectures for the innocent models of ownership verification.
* ``cnn_plain``: ``cnn`` without BatchNorm or input normalisation (a second surrogate for DP).
* ``resnet18`` (paper: MNIST/FMNIST) and ``wrn28_10`` (paper: CIFAR-10/100, FOOD-101) for ``full``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x - mean) / std with fixed per-channel constants, so models accept raw [0, 1] images."""

    def __init__(self, channels: int, mean: float = 0.5, std: float = 0.25) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), mean))
        self.register_buffer("std", torch.full((1, channels, 1, 1), std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def small_cnn(in_channels: int, n_classes: int, image_size: int, width: int = 32) -> nn.Sequential:
    """conv-BN-pool-ReLU x2, then a 128-unit hidden layer.

    Two CPU speed-ups that do not change the function: max-pooling before the ReLU (the two
    commute) applies the ReLU to a quarter of the values, and channels-last weights select
    oneDNN's fast convolutions. Together they train ~1.8x faster on 2 cores (measured for the
    width-16 surrogate; a channels-last model loads ordinary state dicts)."""
    feat = image_size // 4
    model = nn.Sequential(
        Normalize(in_channels),
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * feat * feat, 128), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(128, n_classes),
    )
    return model.to(memory_format=torch.channels_last)


def plain_cnn(in_channels: int, n_classes: int, image_size: int, width: int = 16) -> nn.Sequential:
    """``small_cnn`` without BatchNorm and without input normalisation (conv-pool-ReLU x2, a
    128-unit hidden layer): the second surrogate architecture of notebook 07's DP ablation.
    Which architecture learns from DP's flattened soft labels is part of DP's story, so the
    course reports DP against both."""
    feat = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * feat * feat, 128), nn.ReLU(), nn.Linear(128, n_classes),
    )


def mlp(in_channels: int, n_classes: int, image_size: int) -> nn.Sequential:
    """A two-hidden-layer perceptron (an architecture unlike the victim's, for innocent models)."""
    return nn.Sequential(
        Normalize(in_channels), nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, n_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0, pre_act: bool = False):
        super().__init__()
        self.pre_act = pre_act
        self.bn1 = nn.BatchNorm2d(cin if pre_act else cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.short = (nn.Identity() if stride == 1 and cin == cout
                      else nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_act:  # wide-resnet ordering: BN-ReLU-conv
            o = torch.relu(self.bn1(x))
            y = self.conv1(o)
            y = self.conv2(self.drop(torch.relu(self.bn2(y))))
            return y + self.short(o if not isinstance(self.short, nn.Identity) else x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.short(x))


def resnet18(in_channels: int, n_classes: int, image_size: int = 32) -> nn.Sequential:
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), as used by the paper for MNIST/FMNIST."""
    layers: list[nn.Module] = [Normalize(in_channels), nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes)]
    return nn.Sequential(*layers)


def wide_resnet(in_channels: int, n_classes: int, depth: int = 28, widen: int = 10,
                dropout: float = 0.0) -> nn.Sequential:
    """WRN-depth-widen (Zagoruyko & Komodakis 2016); the paper's CIFAR/FOOD victim is WRN-28-10."""
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    layers: list[nn.Module] = [Normalize(in_channels), nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
    cin = 16
    for cout, stride in zip(widths[1:], (1, 2, 2)):
        for i in range(n):
            layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1, dropout, pre_act=True))
            cin = cout
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(cin, n_classes)]
    return nn.Sequential(*layers)


ARCHS = ("cnn", "cnn_wide", "cnn_plain", "mlp", "resnet18", "wrn28_10")


def build_model(arch: str, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
    """Build one of :data:`ARCHS` for (in_channels, image_size, image_size) inputs."""
    if arch == "cnn":
        return small_cnn(in_channels, n_classes, image_size)
    if arch == "cnn_wide":
        return small_cnn(in_channels, n_classes, image_size, width=48)
    if arch == "cnn_plain":
        return plain_cnn(in_channels, n_classes, image_size)
    if arch == "mlp":
        return mlp(in_channels, n_classes, image_size)
    if arch == "resnet18":
        return resnet18(in_channels, n_classes, image_size)
    if arch == "wrn28_10":
        return wide_resnet(in_channels, n_classes, 28, 10)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")


PREDICT_BATCH = 256
"""Images per forward pass at inference: the fastest chunk measured on 2 CPU cores (1.9 s vs 4.3 s
for one 10,000-image pass of the quick victim). The chunk size changes the float rounding of the
batched kernels, not the function: between chunks of 1 and 256 the quick victims' probabilities
on the 1,000 ID test digits move by up to 1.0e-6 (7.5e-7 on another machine), and no top-1 label
changed."""


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = PREDICT_BATCH) -> Tensor:
    """Logits of ``model`` (eval mode) for every image of ``x``, batched."""
    if model.training:  # eval() walks every submodule: a fixed cost on the API's per-call path
        model.eval()
    if len(x) == 0:
        return torch.empty(0, model(torch.zeros(1, *x.shape[1:])).shape[1])
    if len(x) <= batch_size:  # one chunk: no concatenation (a copy) on the API's per-call path
        return model(x)
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
