"""The README's "In your code" snippet runs as printed, from a trained model saved where the demo
saves it, and forgets: digit 3 after JiT and digit 5 after SSD."""

import os
import re

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import ROOT
from jit_unlearn.data import mnist
from jit_unlearn.eval import Recipe, accuracy, train
from jit_unlearn.models import ConvNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _snippet() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    section = readme[readme.index("## In your code") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_forgets(tmp_path, monkeypatch, capsys):
    code = _snippet()
    assert 'torch.load("demo-out/original.pt", weights_only=True)' in code
    x, y = mnist().tensors
    torch.manual_seed(0)
    model = ConvNet(width=16)
    train(model, TensorDataset(x[:8000], y[:8000]), Recipe(epochs=2, lr=0.05, batch_size=32, label_smoothing=0.1))
    assert accuracy(model, TensorDataset(x[y == 3], y[y == 3])) > 0.9
    (tmp_path / "demo-out").mkdir()
    torch.save(model.state_dict(), tmp_path / "demo-out" / "original.pt")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out

    def figures(prefix):
        found = re.search(prefix + r": digit \d ([\d.]+)%, other digits ([\d.]+)%", out)
        assert found, out
        return float(found.group(1)), float(found.group(2))

    before, after_jit, after_ssd = figures("before"), figures("after JiT"), figures("after SSD")
    assert before[0] > 90 and after_jit[0] < 10 and after_ssd[0] < 10, out
    assert after_jit[1] > 90 and after_ssd[1] > 90, out
