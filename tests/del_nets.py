"""The small convolutional nets of the DEL tests: conv-BN-ReLU-pool, conv-BN-ReLU, global mean, a
10-way head, with non-trivial BatchNorm parameters and statistics."""

import torch
import torch.nn.functional as F
from torch import nn


class ConvNet(nn.Module):
    """conv1 (1 -> c1, 3x3), bn1, conv2 (c1 -> c2, 3x3, no bias), bn2, fc (c2 -> 10)."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def with_bn_statistics(net: ConvNet) -> ConvNet:
    """`net` with its BatchNorm weights, biases, running means and variances drawn from torch's global
    generator (in that order, bn1 then bn2)."""
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return net
