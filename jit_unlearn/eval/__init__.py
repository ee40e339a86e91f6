"""Evaluation of unlearning: accuracy, entropy and loss membership-inference attacks, comparisons with
another model (ZRF, JS divergence, activation and layer distance, average gap), scenarios, retrain baseline."""

from .._train import Recipe, train
from .compare import activation_distance, avg_gap, js_divergence, layer_distance, zrf
from .metrics import accuracy, entropy_mia, evaluate, loss_mia
from .scenarios import (
    Relabeled,
    Splits,
    dataset_labels,
    full_class,
    random_subset,
    retrain,
    sub_class,
    train_test_split,
)

__all__ = [
    "accuracy",
    "entropy_mia",
    "loss_mia",
    "evaluate",
    "zrf",
    "js_divergence",
    "activation_distance",
    "layer_distance",
    "avg_gap",
    "Splits",
    "Relabeled",
    "dataset_labels",
    "train_test_split",
    "full_class",
    "sub_class",
    "random_subset",
    "retrain",
    "Recipe",
    "train",
]
