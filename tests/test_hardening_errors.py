"""Clear errors naming the argument or the file: models with integer parameters or on `meta`, an init
on `meta`, num_samples whose perturbed copies overflow int64, random / truncated / foreign
Importances and Mask files, Mask format versions, negative MIA seeds."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import jit_unlearn as ju
from jit_unlearn import ops
from jit_unlearn.importance import Importances
from jit_unlearn.methods.deletion import Mask

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Detected pickle protocol")]

_X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
_Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
_DATA = TensorDataset(_X, _Y)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _with_int_param():
    model = _mlp()
    model.count = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    return model


_METHODS = {
    "jit": lambda m: ju.jit(m, _X, sigma=0.5, lr=0.1, num_samples=2, progress=False),
    "jit_reference": lambda m: ju.jit(m, _X, sigma=0.5, lr=0.1, num_samples=2, mode="reference", progress=False),
    "ssd": lambda m: ju.ssd(m, _DATA, _DATA, progress=False),
    "lf_ssd": lambda m: ju.lf_ssd(m, _X, _X, progress=False),
    "assd": lambda m: ju.assd(m, _DATA, _DATA, progress=False),
    "importances": lambda m: ju.importances(m, _DATA, progress=False),
    "localize": lambda m: ju.localize(m, _DATA, progress=False),
    "del": lambda m: ju.del_unlearn(m, _DATA, _DATA, init=_mlp(1).state_dict(), epochs=1, progress=False),
    "masked_finetune": lambda m: ju.masked_finetune(m, Mask({}), _DATA, lr=0.1, epochs=1, progress=False),
    "accuracy": lambda m: ju.eval.accuracy(m, _DATA),
    "entropy_mia": lambda m: ju.eval.entropy_mia(m, _DATA, _DATA, _DATA),
}


@pytest.mark.parametrize("method", list(_METHODS))
def test_integer_parameters_are_named(method):
    model = _with_int_param()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"model: parameter 'count' has dtype torch.int64.*buffer"):
        _METHODS[method](model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("method", list(_METHODS))
def test_a_model_on_meta_is_refused(method):
    model = _mlp().to("meta")
    with pytest.raises(ValueError, match=r"model: parameter '0.weight' is on the meta device"):
        _METHODS[method](model)


def test_an_init_on_meta_is_refused():
    model = _mlp()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    init = _mlp(1).to("meta").state_dict()
    with pytest.raises(ValueError, match=r"init\['0.weight'\]: is on the meta device"):
        ju.del_unlearn(model, _DATA, _DATA, init=init, epochs=1, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("n", [2**62, 2**63 - 1])
def test_num_samples_whose_copies_overflow_int64(n):
    with pytest.raises(ValueError, match=r"num_samples: .* perturbed copies .* more than int64 can index"):
        ju.jit(_mlp(), _X, sigma=0.5, lr=0.1, num_samples=n, progress=False)
    with pytest.raises(ValueError, match=r"num_samples: .* more than int64 can index"):
        ops.perturb(_X, n, 0.5)


def _files(tmp_path, kind: str) -> dict[str, str]:
    """A good file of `kind` ("importances" or "mask") and broken ones, by name."""
    model = _mlp()
    good = str(tmp_path / f"good.{kind}.pt")
    if kind == "importances":
        ju.importances(model, _DATA, progress=False).save(good)
    else:
        Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}).save(good)
    blob = open(good, "rb").read()
    files = {"good": good}
    for name, data in {
        "truncated": blob[: len(blob) // 2],
        "random": os.urandom(2048),
        "empty": b"",
        "pickle": pickle.dumps({"format": "something else"}),
    }.items():
        path = str(tmp_path / f"{name}.{kind}.pt")
        with open(path, "wb") as fh:
            fh.write(data)
        files[name] = path

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    files["malicious"] = str(tmp_path / f"evil.{kind}.pt")
    with open(files["malicious"], "wb") as fh:
        pickle.dump(Evil(), fh)
    return files


@pytest.mark.parametrize("broken", ["truncated", "random", "empty", "pickle", "malicious"])
@pytest.mark.parametrize("kind", ["importances", "mask"])
def test_broken_files_name_the_path(tmp_path, kind, broken):
    path = _files(tmp_path, kind)[broken]
    load = Importances.load if kind == "importances" else Mask.load
    with pytest.raises(ValueError, match=rf"path: '{path}' (is not a|is not a readable)"):
        load(path)


@pytest.mark.parametrize("broken", ["truncated", "random", "empty"])
def test_broken_safetensors_files_name_the_path(tmp_path, broken):
    good = str(tmp_path / "imp.safetensors")
    ju.importances(_mlp(), _DATA, progress=False).save(good)
    blob = open(good, "rb").read()
    data = {"truncated": blob[:-7], "random": os.urandom(512), "empty": b""}[broken]
    path = str(tmp_path / f"{broken}.safetensors")
    with open(path, "wb") as fh:
        fh.write(data)
    with pytest.raises(ValueError, match=rf"path: '{path}' is not a readable safetensors importances file"):
        Importances.load(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_missing_file_is_file_not_found(tmp_path, suffix):
    with pytest.raises(FileNotFoundError):
        Importances.load(str(tmp_path / f"none{suffix}"))
    with pytest.raises(FileNotFoundError):
        Mask.load(str(tmp_path / "none.pt"))


def test_mask_file_version_is_checked(tmp_path):
    path = str(tmp_path / "mask.pt")
    Mask({"0.bias": torch.ones(8, dtype=torch.bool)}).save(path)
    blob = torch.load(path, weights_only=True)
    assert blob["version"] == 1 and Mask.load(path).count() == 8
    blob["version"] = 2
    torch.save(blob, path)
    with pytest.raises(ValueError, match=rf"path: '{path}' has mask format version 2, expected 1"):
        Mask.load(path)
    blob["version"], blob["masks"] = 1, {"0.bias": torch.ones(8)}  # float, not bool
    torch.save(blob, path)
    with pytest.raises(ValueError, match=rf"path: '{path}' holds malformed masks"):
        Mask.load(path)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_mia_seeds_are_checked(seed):
    error = TypeError if isinstance(seed, (float, bool)) else ValueError
    with pytest.raises(error, match="seed"):
        ju.eval.loss_mia(_mlp(), _DATA, _DATA, seed=seed)
    with pytest.raises(error, match="seed"):
        ju.eval.evaluate(_mlp(), {"forget": _DATA, "retain": _DATA, "test": _DATA}, seed=seed)
