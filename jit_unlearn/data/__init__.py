"""Bundled and on-disk data sets, loaded offline: MNIST test set (bundled), scikit-learn digits,
a seeded synthetic CIFAR-shaped set, and torchvision-format CIFAR-10/100 folders."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from importlib import resources

import numpy as np
import torch
from torch.utils.data import TensorDataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _read_idx(path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, dtype=np.uint8, offset=8).reshape(count)
    raise ValueError(f"{path}: not an IDX image/label file (magic {magic})")


def mnist(normalize: bool = True) -> TensorDataset:
    """The bundled MNIST test split (10,000 images, CC BY-SA 3.0; see data/mnist/README.md).

    Returns a TensorDataset of (x [10000, 1, 28, 28] float32, y [10000] int64); x is scaled to [0, 1]
    and, when `normalize`, standardised with the usual MNIST mean and std."""
    root = resources.files(__name__).joinpath("mnist")
    with resources.as_file(root.joinpath("t10k-images-idx3-ubyte.gz")) as p:
        images = _read_idx(p)
    with resources.as_file(root.joinpath("t10k-labels-idx1-ubyte.gz")) as p:
        labels = _read_idx(p)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def digits(image: bool = False) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits (1,797 samples, 10 classes), pixel values scaled to [0, 1].

    x is [N, 64] float32, or [N, 1, 8, 8] when `image`; y is [N] int64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    if image:
        x = x.view(-1, 1, 8, 8)
    return TensorDataset(x, torch.from_numpy(bunch.target.astype(np.int64)))


def synthetic_cifar(num_samples: int = 1024, num_classes: int = 10, seed: int = 0) -> TensorDataset:
    """A seeded CIFAR-shaped set: x [N, 3, 32, 32] float32, y [N] int64.  Each class has its own
    random mean image plus noise, so a network can learn it; for shapes, speed and smoke tests."""
    if num_samples < 1 or num_classes < 1:
        raise ValueError("num_samples and num_classes must be >= 1")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, 3, 32, 32, generator=g)
    y = torch.randint(0, num_classes, (num_samples,), generator=g)
    x = means[y] + 0.5 * torch.randn(num_samples, 3, 32, 32, generator=g)
    return TensorDataset(x, y)


_CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}


def cifar(root: str, num_classes: int = 10, train: bool = True, label: str = "fine") -> TensorDataset:
    """CIFAR-10/100 from a torchvision-format folder on disk (``cifar-10-batches-py`` or
    ``cifar-100-python`` under `root`); nothing is downloaded.  Returns normalised x [N, 3, 32, 32]
    float32 and y [N] int64; for CIFAR-100 `label` picks "fine" or "coarse" labels, and the dataset
    yields (x, coarse, fine) when label == "both"."""
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes: expected 10 or 100, got {num_classes}")
    if num_classes == 10:
        folder = os.path.join(root, "cifar-10-batches-py")
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        folder = os.path.join(root, "cifar-100-python")
        files = ["train" if train else "test"]
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"root: no {os.path.basename(folder)} folder under {root!r} "
            "(expected the torchvision/original python-format archive, extracted)"
        )
    xs, fine, coarse = [], [], []
    for name in files:
        # The archives are pickles of numpy arrays made by the data set's authors.
        with open(os.path.join(folder, name), "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8))
        fine += entry.get("labels", entry.get("fine_labels", []))
        coarse += entry.get("coarse_labels", [])
    x = torch.from_numpy(np.concatenate(xs)).view(-1, 3, 32, 32).float() / 255.0
    mean = torch.tensor(_CIFAR_MEAN[num_classes]).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD[num_classes]).view(1, 3, 1, 1)
    x = (x - mean) / std
    y_fine = torch.tensor(fine, dtype=torch.int64)
    if num_classes == 100 and label in ("coarse", "both"):
        y_coarse = torch.tensor(coarse, dtype=torch.int64)
        return TensorDataset(x, y_coarse, y_fine) if label == "both" else TensorDataset(x, y_coarse)
    if label not in ("fine", "coarse", "both"):
        raise ValueError(f"label: expected 'fine', 'coarse' or 'both', got {label!r}")
    return TensorDataset(x, y_fine)


def load(name: str, **kwargs) -> TensorDataset:
    """Load a data set by name: "mnist", "digits", "synthetic_cifar", "cifar10", "cifar100"."""
    if name == "mnist":
        return mnist(**kwargs)
    if name == "digits":
        return digits(**kwargs)
    if name == "synthetic_cifar":
        return synthetic_cifar(**kwargs)
    if name in ("cifar10", "cifar100"):
        return cifar(num_classes=int(name[5:]), **kwargs)
    raise ValueError(f"dataset: unknown name {name!r}; expected mnist, digits, synthetic_cifar, cifar10 or cifar100")
