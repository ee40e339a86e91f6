"""entropy_mia on MNIST with the small CNN: ours vs the published one-sample-at-a-time procedure and vs its floor.

Run: python -m pytest benchmarks/bench_eval.py --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=5
The floor is what any implementation must pay: one batched no-grad forward over retain, forget and test
(same batch size) plus the logistic-regression fit on the entropy features (precomputed outside the timing).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader, Subset

from jit_unlearn import data, models
from jit_unlearn.eval import Recipe, entropy_mia, full_class, train
from jit_unlearn.eval.metrics import _ENTROPY_MIA_C, EVAL_BATCH_SIZE


@pytest.fixture(scope="module")
def setup():
    splits = full_class(data.mnist(), 3, seed=0)  # 7,192 retain / 808 forget / 2,000 test
    torch.manual_seed(0)
    model = models.SmallCNN(width=32)
    train(model, splits.train, Recipe(epochs=1, lr=0.1, batch_size=64))
    model.eval()
    # 3,000 retain / 500 forget / 1,000 test keep the one-at-a-time rounds to a few minutes on 2 cores
    sets = (Subset(splits.retain, range(3000)), Subset(splits.forget, range(500)), Subset(splits.test, range(1000)))
    with torch.no_grad():
        h = []
        for ds in sets:
            p = torch.cat([F.softmax(model(x), -1) for x, _ in DataLoader(ds, batch_size=EVAL_BATCH_SIZE)])
            h.append(-torch.where(p > 0, p * p.log(), p.new([0.0])).sum(-1).numpy())
    features = np.concatenate([h[0], h[2]]).reshape(-1, 1)
    members = np.concatenate([np.ones(len(h[0])), np.zeros(len(h[2]))])
    return model, sets, features, members


def _published_one_at_a_time(model, retain, forget, test):
    def collect_prob(ds):
        prob = []
        with torch.no_grad():
            for x, _ in DataLoader(ds, batch_size=1, shuffle=False):
                prob.append(F.softmax(model(x), dim=-1).data)
        return torch.cat(prob)

    def entropy(p):
        return -torch.where(p > 0, p * p.log(), p.new([0.0])).sum(dim=-1)

    r, f, t = collect_prob(retain), collect_prob(forget), collect_prob(test)
    x_r = torch.cat([entropy(r), entropy(t)]).numpy().reshape(-1, 1)
    y_r = np.concatenate([np.ones(len(r)), np.zeros(len(t))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs", C=_ENTROPY_MIA_C).fit(x_r, y_r)
    return clf.predict(entropy(f).numpy().reshape(-1, 1)).mean()


def _floor(model, sets, features, members):
    with torch.no_grad():
        for ds in sets:
            for x, _ in DataLoader(ds, batch_size=EVAL_BATCH_SIZE):
                model(x)
    LogisticRegression(class_weight="balanced", solver="lbfgs", C=_ENTROPY_MIA_C).fit(features, members)


@pytest.mark.benchmark(group="entropy_mia MNIST SmallCNN")
def test_entropy_mia_ours(benchmark, setup):
    model, sets, _, _ = setup
    value = benchmark(entropy_mia, model, *sets)
    assert value == _published_one_at_a_time(model, *sets)


@pytest.mark.benchmark(group="entropy_mia MNIST SmallCNN")
def test_entropy_mia_floor(benchmark, setup):
    benchmark(_floor, *setup)


@pytest.mark.benchmark(group="entropy_mia MNIST SmallCNN")
def test_entropy_mia_published_one_at_a_time(benchmark, setup):
    model, sets, _, _ = setup
    benchmark.pedantic(_published_one_at_a_time, args=(model, *sets), rounds=3, iterations=1)
