"""The `jit-unlearn` command's user errors: every method's parameter values are checked before
anything is trained, and each user error exits 2 with one line on stderr, no traceback, no word cut."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import subprocess_env
from jit_unlearn import cli, models
from jit_unlearn.cli import errors, experiment, methods

pytestmark = pytest.mark.usefixtures("one_thread")

MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}


def _config(method_entries, **changes):
    cfg = {
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "kwargs": dict(MLP_KWARGS)},
        "train": {"epochs": 2, "lr": 0.05, "batch_size": 32},
        "scenario": {"kind": "full_class", "class": 0},
        "methods": method_entries,
        "retrain": False,
    }
    cfg.update(changes)
    return cfg


def _run(tmp_path, cfg, *extra):
    """`jit-unlearn run` on `cfg`; results go to tmp_path/out unless the config or `extra` name a folder."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = [] if "out" in cfg or "--out" in extra else ["--out", str(tmp_path / "out")]
    return cli.main(["run", str(path), "--quiet", *out, *extra])


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err[len("error: ") :]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the experiment starts training the original model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the original model was trained before the config error was reported")

    monkeypatch.setattr(experiment, "train", refuse)


# (method entry, the argument its error must name); labels as in the table.
_BAD_VALUES = [
    ({"name": "jit", "sigma": 0.0, "lr": 0.1}, "sigma"),
    ({"name": "jit", "sigma": 1.0, "lr": -1.0}, "lr"),
    ({"name": "jit", "sigma": 1.0, "lr": 0.1, "num_samples": 0}, "num_samples"),
    ({"name": "jit", "sigma": 1.0, "lr": 0.1, "mode": "fast"}, "mode"),
    ({"name": "jit", "sigma": 1.0, "lr": 0.1, "reduction": "avg"}, "reduction"),
    ({"name": "jit", "sigma": 1.0, "lr": 0.1, "batch_size": 0}, "batch_size"),
    ({"name": "jit", "sigma": "1", "lr": 0.1}, "sigma"),
    ({"name": "ssd", "alpha": 0.0}, "alpha"),
    ({"name": "ssd", "lam": -1.0}, "lam"),
    ({"name": "ssd", "per_sample": "yes"}, "per_sample"),
    ({"name": "ssd", "full_importances": "imp.pt"}, "full_importances"),
    ({"name": "lf_ssd", "alpha": -2.0}, "alpha"),
    ({"name": "assd", "batch_size": -1}, "batch_size"),
    ({"name": "del", "budget": 1.5}, "budget"),
    ({"name": "del", "criterion": "magic"}, "criterion"),
    ({"name": "del", "lr": 0.0}, "lr"),
    ({"name": "del", "epochs": -1}, "epochs"),
    ({"name": "del", "momentum": 1.0}, "momentum"),
    ({"name": "del", "top_fraction": 0.0}, "top_fraction"),
    ({"name": "del", "head": "no_such_layer"}, "head"),
    ({"name": "del", "mode": "published"}, "mode"),
    ({"name": "finetune", "lr": -1.0}, "lr"),
    ({"name": "finetune", "seed": -1}, "seed"),
    ({"name": "neggrad_plus", "beta": -0.5}, "beta"),
    ({"name": "random_label", "epochs": 1.5}, "epochs"),
    ({"name": "bad_teacher", "temperature": 0.0}, "temperature"),
    ({"name": "bad_teacher", "retain_fraction": 0.0}, "retain_fraction"),
    ({"name": "bad_teacher", "lr": -1.0}, "lr"),
    ({"name": "bad_teacher", "weight_decay": -1.0}, "weight_decay"),
    ({"name": "scrub", "max_epochs": -1}, "max_epochs"),
    ({"name": "scrub", "forget_batch_size": 0}, "forget_batch_size"),
    ({"name": "scrub", "gamma": -1.0}, "gamma"),
]


@pytest.mark.parametrize("entry,arg", _BAD_VALUES, ids=[f"{e['name']}-{a}" for e, a in _BAD_VALUES])
def test_bad_parameter_values_are_reported_before_training(tmp_path, capsys, no_training, entry, arg):
    good = {"name": "ssd", "alpha": 5.0, "label": "SSD a5"}  # a valid entry first: each entry is checked
    out = tmp_path / "out"
    assert _run(tmp_path, _config([good, entry]), "--out", str(out)) == 2
    label = methods.METHODS[entry["name"]][2]
    assert _one_line_error(capsys).startswith(f"config key 'methods[1]': {label}: {arg}")
    assert not out.exists()  # nothing was written either


def test_dry_validation_leaves_model_and_rng_alone():
    from jit_unlearn import data
    from jit_unlearn.eval import full_class

    splits = full_class(data.digits(), 0, None, test_fraction=0.2, seed=0)
    entries = [{"name": name} for name in methods.METHODS if name != "jit"] + [{"name": "jit", "sigma": 1.0, "lr": 1.0}]
    specs = methods.parse_methods({"methods": entries})
    torch.manual_seed(0)
    model = models.MLP(64, (32,), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    methods.validate_methods(specs, model, splits, lambda: models.MLP(64, (32,), 10), seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("entry", [{"name": "del", "init": "x"}, {"name": "bad_teacher", "incompetent": "x"}])
def test_arguments_the_experiment_sets(tmp_path, capsys, no_training, entry):
    assert _run(tmp_path, _config([entry])) == 2
    key = [k for k in entry if k != "name"][0]
    assert _one_line_error(capsys) == (
        f"config key 'methods[0].{key}': is set by the experiment itself; a config cannot set it"
    )


def test_missing_required_parameter(tmp_path, capsys, no_training):
    assert _run(tmp_path, _config([{"name": "jit", "lr": 0.1}])) == 2
    err = _one_line_error(capsys)
    assert err.startswith("config key 'methods[0]': JiT: ") and "'sigma'" in err, err


def test_lr_that_overflows_float32(tmp_path, capsys, no_training):
    assert _run(tmp_path, _config([{"name": "jit", "sigma": 1.0, "lr": 1e39}])) == 2
    err = _one_line_error(capsys)
    assert err.startswith("config key 'methods[0].lr': 1e+39 overflows the model's float32"), err
    assert _run(tmp_path, _config([{"name": "ssd"}], train={"epochs": 1, "lr": 1e39})) == 2
    assert _one_line_error(capsys).startswith("config key 'train.lr': 1e+39 overflows the model's float32")


def test_lr_that_drives_a_method_to_inf(tmp_path, capsys):
    # Finite in float32, but the steps overflow: the method restores the model and raises.
    assert _run(tmp_path, _config([{"name": "jit", "sigma": 1.0, "lr": 1e30, "num_samples": 3}])) == 2
    assert _one_line_error(capsys).startswith("config key 'methods[0]': JiT: ")


def test_diverging_del(tmp_path, capsys):
    assert _run(tmp_path, _config([{"name": "del", "lr": 1e30, "epochs": 1}])) == 2
    err = _one_line_error(capsys)
    assert err.startswith("config key 'methods[0]': DEL: ") and "diverged" in err, err


def test_diverging_training_of_the_original(tmp_path, capsys):
    assert _run(tmp_path, _config([{"name": "ssd"}], train={"epochs": 2, "lr": 1e30})) == 2
    err = _one_line_error(capsys)
    assert err.startswith("config key 'train': ") and "lower the learning rate" in err, err


@pytest.mark.parametrize("where", ["config", "flag"])
def test_meta_device(tmp_path, capsys, no_training, where):
    cfg = _config([{"name": "ssd"}], **({"device": "meta"} if where == "config" else {}))
    assert _run(tmp_path, cfg, *(["--device", "meta"] if where == "flag" else [])) == 2
    assert _one_line_error(capsys).startswith("device: 'meta' holds no data")


def test_out_is_a_file(tmp_path, capsys, no_training):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    assert _run(tmp_path, _config([{"name": "ssd"}], out=str(a_file))) == 2
    assert _one_line_error(capsys) == (
        f"config key 'out': {a_file} is a file, not a folder; name a folder for results.json and results.png"
    )
    assert _run(tmp_path, _config([{"name": "ssd"}]), "--out", str(a_file)) == 2
    assert _one_line_error(capsys).startswith(f"--out: {a_file} is a file")
    assert _run(tmp_path, _config([{"name": "ssd"}]), "--out", str(a_file / "sub")) == 2
    assert _one_line_error(capsys).startswith(f"output folder {a_file / 'sub'}: cannot write there")
    assert a_file.read_text() == "keep me"


def _checkpoint_config(path):
    return _config([{"name": "ssd"}], model={"name": "mlp", "kwargs": dict(MLP_KWARGS), "checkpoint": str(path)})


def test_checkpoint_with_nan(tmp_path, capsys):
    state = models.MLP(64, (32,), 10).state_dict()
    state["3.bias"][4] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    assert _run(tmp_path, _checkpoint_config(tmp_path / "nan.pt")) == 2
    assert _one_line_error(capsys) == f"config key 'model.checkpoint': {tmp_path / 'nan.pt'} holds NaN or inf in 3.bias"


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    torch.save(models.MLP(64, (16,), 10).state_dict(), tmp_path / "narrow.pt")
    assert _run(tmp_path, _checkpoint_config(tmp_path / "narrow.pt")) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"config key 'model.checkpoint': {tmp_path / 'narrow.pt'} does not fit model MLP: ")
    assert "1.weight is [16, 64] in the checkpoint, [32, 64] in the model" in err, err
    assert err.endswith("(is [model] name/kwargs the architecture it was saved from?)"), err
    # many foreign entries: named in part, counted, the line stays short
    torch.save({f"block{i}.weight": torch.zeros(3) for i in range(50)}, tmp_path / "other.pt")
    assert _run(tmp_path, _checkpoint_config(tmp_path / "other.pt")) == 2
    err = _one_line_error(capsys)
    assert "4 model entries missing from the checkpoint: 1.weight, 1.bias, 3.weight and 1 more" in err, err
    assert (
        "50 checkpoint entries the model does not have: block0.weight, block1.weight, block2.weight and 47 more" in err
    )
    assert len(err) < errors.MESSAGE_LIMIT + 10


def test_one_line_never_cuts_a_word():
    text = "alpha beta\ngamma   " + " ".join(f"word{i}" for i in range(200))
    short = errors.one_line(text, limit=60)
    assert short.endswith(" ...") and "\n" not in short and len(short) <= 64
    kept = short[: -len(" ...")].split(" ")
    assert kept[:3] == ["alpha", "beta", "gamma"] and all(w == f"word{i}" for i, w in enumerate(kept[3:]))
    assert errors.one_line("x" * 100, limit=10) == "x" * 100
    assert errors.one_line("x" * 100 + " y", limit=10) == "x" * 100 + " ..."
    assert errors.one_line("a  b\n c") == "a b c"


def test_main_prints_multi_line_user_errors_on_one_line(capsys, monkeypatch):
    def fail(args):
        raise errors.UserError("first line\nsecond   line")

    monkeypatch.setitem(cli.COMMANDS, "demo", dataclasses.replace(cli.COMMANDS["demo"], run=fail))
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == "error: first line second line\n"


def test_subprocess_bad_value_no_traceback(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(
        '[dataset]\nname = "digits"\n[model]\nname = "mlp"\nkwargs = { in_features = 64, num_classes = 10 }\n'
        '[scenario]\nkind = "full_class"\nclass = 1\n[[methods]]\nname = "scrub"\ntemperature = -4.0\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "jit_unlearn.cli", "run", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: config key 'methods[0]': SCRUB: temperature: must be > 0.0, got -4.0\n"
    assert not (tmp_path / "o").exists()
