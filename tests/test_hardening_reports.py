"""Saying when nothing happened: SSD-family runs that select nothing (or change nothing) and JiT runs that
leave the model unchanged warn and report `changed=False`; reports print as one readable line with
rounded figures; an invalid JIT_UNLEARN_BACKEND is warned about once."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import jit_unlearn as ju
from conftest import ROOT, subprocess_env
from jit_unlearn import DELReport, FinetuneReport, JiTReport, SSDReport
from jit_unlearn.methods.deletion import Mask

pytestmark = pytest.mark.usefixtures("one_thread")

_X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
_Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
_DATA = TensorDataset(_X, _Y)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["ssd", "lf_ssd"])
def test_ssd_selecting_nothing_warns_and_reports_it(method):
    model = _mlp()
    before = _params(model)
    data = _DATA if method == "ssd" else _X
    with pytest.warns(RuntimeWarning, match=rf"{method}: no parameter element has I_f > alpha \* I_D .*unchanged"):
        report = getattr(ju, method)(model, data, data, alpha=1e30, progress=False)
    assert report.total_selected == 0 and not report.changed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "selected no parameter element; the model is UNCHANGED" in str(report)


def test_ssd_selecting_without_changing_warns():
    # lam far above alpha: the selected elements' factor min(lam * I_D / I_f, 1) is 1
    model = _mlp()
    forget, full = TensorDataset(_X[:2], _Y[:2]), _DATA
    with pytest.warns(RuntimeWarning, match=r"selected elements keep their values"):
        report = ju.ssd(model, forget, full, alpha=1.0, lam=1e30, progress=False)
    assert report.total_selected > 0 and not report.changed


def test_ssd_that_dampens_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = ju.ssd(_mlp(), TensorDataset(_X[:2], _Y[:2]), _DATA, alpha=1.0, progress=False)
    assert report.changed and report.total_selected > 0


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_jit_leaving_the_model_unchanged_warns(mode):
    model = _mlp()
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="jit: the model is unchanged"):
        report = ju.jit(model, _X, sigma=0.5, lr=0.0, num_samples=2, mode=mode, progress=False)
    assert not report.changed and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert str(report).endswith("the model is UNCHANGED")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ju.jit(model, _X, sigma=0.5, lr=0.1, num_samples=2, mode=mode, progress=False).changed


def test_jit_update_below_precision_counts_as_unchanged():
    # an update smaller than half an ulp of every weight leaves the float16 model bitwise as it was
    model = _mlp().half()
    with pytest.warns(RuntimeWarning, match="unchanged"):
        report = ju.jit(model, _X.half(), sigma=0.5, lr=1e-12, num_samples=2, progress=False)
    assert not report.changed


def test_report_strings_are_rounded_and_short():
    jit = JiTReport(steps=1, samples=1200, seconds=1.234567, mean_loss=12.3456789, backend="cpu", mode="default")
    assert str(jit) == "jit (default mode, cpu ops): 1 step over 1,200 forget samples, mean loss 12.35, 1.23 s"
    ssd = SSDReport(
        method="ssd",
        alpha=10.0,
        lam=1.0,
        exponent=1.0,
        selected={"a.weight": 1500, "a.bias": 0, "b.weight": 12, "c.weight": 3, "d.weight": 1},
        total_selected=1516,
        total_elements=1_000_000,
        seconds=2.345678,
        importance_seconds=2.2,
        dampen_seconds=0.145678,
        forget_importances=None,
        full_importances=None,
    )
    assert str(ssd) == (
        "ssd (alpha 10, lam 1): dampened 1,516 of 1,000,000 elements (0.152%) in 4 of 5 tensors "
        "(most: a.weight 1,500, b.weight 12, c.weight 3); 2.35 s (importances 2.2 s, dampening 0.146 s)"
    )
    mask = Mask({"a": torch.tensor([True, False, False, False]), "b": torch.zeros(6, dtype=torch.bool)})
    dl = DELReport(
        mask=mask,
        fraction=0.1,
        layer_fractions=mask.layer_fractions(),
        masked=1,
        total=10,
        head="fc",
        epochs=30,
        steps=1200,
        final_loss=0.0123456,
        seconds_localize=0.5,
        seconds_reset=0.01,
        seconds_finetune=11.87654,
    )
    assert str(dl) == (
        "del: reset and fine-tuned 1 of 10 entries (10%) in 1 of 2 tensors, head 'fc' trained fully; 30 epochs, "
        "1,200 steps, final loss 0.01235; 12.4 s (localize 0.5 s, reset 0.01 s, fine-tune 11.9 s)"
    )
    ft = FinetuneReport("relabel", 1, 0, 1, None, 0.004321)
    assert str(ft) == "masked fine-tuning (relabel): 1 trainable entry, 1 epoch, 0 steps, no step taken; 0.00432 s"


def test_invalid_backend_setting_is_warned_about_once():
    code = "import torch, jit_unlearn as j; j.backend_info(); j.backend_info(); j.ops.perturb(torch.ones(2, 2), 1, 0.1)"
    env = subprocess_env(JIT_UNLEARN_BACKEND="bogus")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("JIT_UNLEARN_BACKEND='bogus' is not one of") == 1
