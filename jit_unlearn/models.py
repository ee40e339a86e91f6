"""Small classifiers for tests and demos: an MLP, two small CNNs, and a CIFAR-style ResNet-18 (3x3 stem)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Fully connected ReLU network: in_features -> hidden... -> num_classes.  Input [B, *] is flattened."""

    def __init__(
        self, in_features: int = 64, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10, dropout: float = 0.0
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool stages and a linear head, for [B, C, 28, 28] (MNIST) or [B, C, 8, 8] (digits)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.features(x), 1)))


class ConvNet(nn.Module):
    """LeNet-style CNN without BatchNorm or global pooling, for [B, in_channels, 28, 28] (MNIST):
    conv5x5 (width) -> ReLU -> maxpool2 -> conv5x5 (2 width) -> ReLU -> maxpool2 -> flatten
    (2 width x 4 x 4) -> Linear hidden -> ReLU -> Linear num_classes.  Unpadded convolutions:
    28 -> 24 -> 12 -> 8 -> 4."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128, image_size: int = 28
    ):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size: expected at least 16 (two 5x5 convolutions and 2x2 pools), got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool, stages of 64/128/256/512 channels
    (11.17 M parameters for 10 classes).  Input [B, in_channels, H, W]."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, layers, in_planes = width, [], width
        for i in range(4):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
            planes *= 2
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


def build(name: str, **kwargs) -> nn.Module:
    """Build a model by name: "mlp", "small_cnn", "convnet" or "resnet18"."""
    factories = {"mlp": MLP, "small_cnn": SmallCNN, "convnet": ConvNet, "resnet18": ResNet18}
    if name not in factories:
        raise ValueError(f"model: unknown name {name!r}; expected one of {sorted(factories)}")
    return factories[name](**kwargs)
