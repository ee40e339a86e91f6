"""The `jit-unlearn` command: `run CONFIG` end to end, config errors, and `demo --fast`, as subprocesses.

The runs must show that unlearning happened: every method's row moves the forget accuracy toward the
retrain row, the model each method hands to the evaluation differs from the original, and each
method's configured parameters reach it (other parameters give another row).  A CLI whose methods
change nothing fails these tests."""

import copy
import functools
import importlib
import json
import subprocess
import sys

import pytest
import torch

import jit_unlearn.eval
from conftest import subprocess_env
from jit_unlearn import cli, models
from jit_unlearn.cli.config import METHODS
from jit_unlearn.cli.methods import StandIn

COLUMNS = ("method", "seconds", "forget acc", "retain acc", "test acc", "entropy MIA", "loss MIA")

pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    return subprocess_env(OMP_NUM_THREADS="1")  # tiny models; avoids OpenMP hand-off costs on a shared machine


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jit_unlearn.cli", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=300,
    )


# Settings under which every method forgets class 0 of digits (measured forget accuracy: original
# 0.99, JiT 0.67, SSD 0.20, LF-SSD 0.0, ASSD 0.24, DEL 0.0; retrain 0.0) ...
METHODS_A = [
    {"name": "jit", "sigma": 1.0, "lr": 3e-3, "num_samples": 3, "batch_size": 64},
    {"name": "ssd", "alpha": 2.0, "batch_size": 64},
    {"name": "lf_ssd", "alpha": 5.0, "batch_size": 64, "label": "LF-SSD a5"},
    {"name": "assd", "batch_size": 64},
    {"name": "del", "epochs": 1, "lr": 0.05},
]
# ... and the same methods with one parameter changed each (JiT 0.47, SSD 0.08, LF-SSD 0.0 with retain
# accuracy 0.67 instead of 0.96, ASSD 0.01, DEL 0.0 with retain accuracy 0.91 instead of 0.82).
METHODS_B = [
    {**METHODS_A[0], "sigma": 0.5},
    {**METHODS_A[1], "alpha": 1.0},
    {**METHODS_A[2], "alpha": 3.0, "label": "LF-SSD a3"},
    {**METHODS_A[3], "batch_size": 32},
    {**METHODS_A[4], "budget": 0.1},
]
METRICS = ("forget_acc", "retain_acc", "test_acc", "test_acc_remaining", "entropy_mia", "loss_mia")


def _tiny_config(**changes):
    cfg = {
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "kwargs": {"in_features": 64, "hidden": [32], "num_classes": 10}},
        "train": {"epochs": 8, "lr": 0.05, "batch_size": 32},
        "scenario": {"kind": "full_class", "class": 0},
        "methods": [dict(m) for m in METHODS_A],
        "seed": 0,
    }
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            cfg[section] = {**cfg[section], sub: value}
            if value is None:
                del cfg[section][sub]
        elif value is None:
            del cfg[section]
        else:
            cfg[section] = value
    return cfg


def _check_rows(results, names):
    rows = results["rows"]
    assert [r["method"] for r in rows] == list(names)
    for r in rows:
        for key in METRICS:
            assert 0.0 <= r[key] <= 1.0, (r["method"], key)
        assert r["eval_seconds"] > 0


def _assert_forgot(rows, retrain_forget_acc, margin=0.2):
    """Every method row moved the forget accuracy from the original's toward the retrained model's by
    at least `margin`."""
    original = next(r for r in rows if r["method"] == "original")["forget_acc"]
    assert original - retrain_forget_acc > 2 * margin  # there is something to forget
    for r in rows:
        if r.get("kind") == "method":
            gap_before, gap_after = abs(original - retrain_forget_acc), abs(r["forget_acc"] - retrain_forget_acc)
            assert gap_after <= gap_before - margin, (r["method"], r["forget_acc"], original, retrain_forget_acc)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`run` of _tiny_config() as a subprocess: (process, output folder, results)."""
    folder = tmp_path_factory.mktemp("tiny_run")
    path = folder / "cfg.json"
    path.write_text(json.dumps(_tiny_config()))
    out = folder / "out"
    proc = _cli("run", str(path), "--out", str(out), "--quiet", "--device", "cpu")
    results = json.loads((out / "results.json").read_text()) if proc.returncode == 0 else None
    return proc, out, results


def test_run_json_config_subprocess(tiny_run):
    proc, out, results = tiny_run
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no bars, no step messages
    header = proc.stdout.splitlines()[0]
    assert all(c in header for c in COLUMNS)
    _check_rows(results, ["original", "retrain", "JiT", "SSD", "LF-SSD a5", "ASSD", "DEL"])
    assert results["scenario"]["forget"] + results["scenario"]["retain"] + results["scenario"]["test"] == 1797
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["original"]["forget_acc"] > 0.9 and rows["retrain"]["forget_acc"] == 0.0
    _assert_forgot(results["rows"], rows["retrain"]["forget_acc"])
    for spec, r in zip(METHODS_A, results["rows"][2:]):  # the configured parameters are recorded
        assert r["params"] == {k: v for k, v in spec.items() if k not in ("name", "label")}
    assert all(rows[m]["seconds"] > 0 for m in rows)
    assert (out / "results.png").stat().st_size > 0 and (out / "original.pt").is_file()
    # the trained original is a weights_only checkpoint of the configured model
    state = torch.load(out / "original.pt", weights_only=True)
    models.MLP(64, (32,), 10).load_state_dict(state)


def test_run_toml_with_checkpoint_random_scenario(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save(models.MLP(64, (32,), 10).state_dict(), ckpt)
    path = tmp_path / "cfg.toml"
    path.write_text(f"""
seed = 3
retrain = false
[dataset]
name = "digits"
[model]
name = "mlp"
kwargs = {{ in_features = 64, hidden = [32], num_classes = 10 }}
checkpoint = "{ckpt.as_posix()}"
[scenario]
kind = "random"
fraction = 0.1
[[methods]]
name = "ssd"
alpha = 10.0
""")
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "original" in capsys.readouterr().out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    _check_rows(results, ["original", "SSD"])
    assert results["rows"][0]["seconds"] is None  # loaded, not trained
    assert results["seed"] == 3 and results["scenario"]["forget"] == round(0.1 * 1438)
    assert results["rows"][0]["test_acc_remaining"] == results["rows"][0]["test_acc"]


def test_precision_flag_reaches_every_method_without_its_own(tmp_path, monkeypatch):
    import jit_unlearn.methods.ssd as ssd_module

    seen = {}

    def recording(fn):
        @functools.wraps(fn)  # the CLI reads the signature
        def wrapper(*args, **kwargs):
            seen[fn.__name__] = kwargs.get("precision")
            return fn(*args, **kwargs)

        return wrapper

    for name in ("ssd", "lf_ssd"):
        monkeypatch.setattr(ssd_module, name, recording(getattr(ssd_module, name)))
    cfg = _tiny_config(
        methods=[
            {"name": "ssd", "alpha": 5.0, "batch_size": 64},
            {"name": "lf_ssd", "alpha": 5.0, "batch_size": 64, "precision": "float32"},
        ],
        retrain=False,
    )
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet", "--precision", "bfloat16"]) == 0
    assert seen == {"ssd": "bfloat16", "lf_ssd": "float32"}
    assert json.loads((tmp_path / "o" / "results.json").read_text())["precision"] == "bfloat16"


def test_run_sub_class(tmp_path):
    cfg = _tiny_config(
        scenario={"kind": "sub_class", "fine_class": 7, "coarse_of": [f % 2 for f in range(10)]},
        methods=[{"name": "lf_ssd", "alpha": 5.0}],
        retrain=False,
    )
    cfg["model"]["kwargs"]["num_classes"] = 2
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    _check_rows(results, ["original", "LF-SSD"])
    assert results["scenario"]["forgotten_classes"] == [7]


def test_methods_change_the_model_and_take_their_parameters(tiny_run, tmp_path, monkeypatch):
    """The original of tiny_run, loaded from its checkpoint, unlearned in process with one parameter of
    every method changed: each method gets exactly its configured parameters, the model it hands to
    the evaluation differs from the original, it forgets, and its row differs from tiny_run's."""
    proc, out, first = tiny_run
    assert proc.returncode == 0, proc.stderr
    evaluated, calls = [], {}
    real_evaluate = jit_unlearn.eval.evaluate

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(jit_unlearn.eval, "evaluate", recording_evaluate)
    for name, (module, attr, _) in METHODS.items():
        real = getattr(importlib.import_module(module), attr)

        @functools.wraps(real)
        def spy(*args, _real=real, _name=name, **kwargs):
            if not isinstance(args[1], StandIn):  # not the dry validation before training
                calls.setdefault(_name, []).append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(importlib.import_module(module), attr, spy)
    cfg = _tiny_config(methods=copy.deepcopy(METHODS_B), retrain=False)
    cfg["model"]["checkpoint"] = str(out / "original.pt")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    rows, before = results["rows"], first["rows"]
    assert [r["method"] for r in rows] == ["original", "JiT", "SSD", "LF-SSD a3", "ASSD", "DEL"]
    assert [rows[0][k] for k in METRICS] == [before[0][k] for k in METRICS]  # the same original
    assert len(evaluated) == 6
    for spec, row, state, old in zip(METHODS_B, rows[1:], evaluated[1:], before[2:]):
        given = {k: v for k, v in spec.items() if k not in ("name", "label")}
        assert len(calls[spec["name"]]) == 1 and calls[spec["name"]][0].items() >= given.items(), spec
        assert any(not torch.equal(state[k], evaluated[0][k]) for k in state), spec["name"]
        assert [row[k] for k in METRICS] != [old[k] for k in METRICS], spec["name"]
    _assert_forgot(rows, before[1]["forget_acc"])


_BAD = [
    (
        dict(**{"scenario.kind": "everything"}),
        "config key 'scenario.kind': expected one of ['full_class', 'sub_class', 'random'], got 'everything'",
    ),
    (dict(dataset=None), "config key 'dataset': missing"),
    (dict(**{"dataset.name": "imagenet"}), "config key 'dataset.name': expected one of"),
    (dict(**{"dataset.test_fraction": 2}), "config key 'dataset.test_fraction'"),
    (dict(**{"dataset.kwargs": {"colour": True}}), "config key 'dataset.kwargs'"),
    (dict(**{"model.name": "vgg"}), "config key 'model.name'"),
    (dict(**{"model.kwargs": {"in_features": 10}}), "config key 'model'"),
    (dict(**{"model.kwargs": {"in_features": 64, "num_classes": 4}}), "config key 'model.kwargs'"),
    (dict(**{"model.checkpoint": "/no/such/file.pt"}), "config key 'model.checkpoint': no such file"),
    (dict(**{"train.lr": -1}), "config key 'train.lr'"),
    (dict(**{"train.epoch": 3}), "config key 'train.epoch': unknown recipe key"),
    (dict(**{"scenario.class": None}), "config key 'scenario.class': missing"),
    (dict(**{"scenario.class": 42}), "config key 'scenario.class'"),
    (dict(**{"scenario.fraction": 0.1}), "config key 'scenario.fraction': unknown key"),
    (dict(methods=[]), "config key 'methods'"),
    (dict(methods=[{"name": "magic"}]), "config key 'methods[0].name'"),
    (dict(methods=[{"name": "jit", "sigmaa": 1.0, "lr": 0.1}]), "config key 'methods[0].sigmaa': not a parameter"),
    (dict(methods=[{"name": "ssd"}, {"name": "ssd"}]), "config key 'methods[1].label': duplicate"),
    (dict(methods=[{"name": "jit", "sigma": -1.0, "lr": 0.1}]), "config key 'methods[0]': JiT: sigma"),
    (dict(seed="zero"), "config key 'seed'"),
    (dict(colour="blue"), "config key 'colour': unknown key"),
    (dict(dataset={"name": "cifar10", "root": "/nowhere"}), "config key 'dataset.root'"),
]


@pytest.mark.parametrize("changes,message", _BAD, ids=[m.split("'")[1] for _, m in _BAD])
def test_bad_config_one_line(tmp_path, capsys, changes, message):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_tiny_config(**changes)))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message), err
    assert "\n" not in err


def test_bad_files_and_flags(tmp_path, capsys):
    bad_json = tmp_path / "cfg.json"
    bad_json.write_text("{ not json")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"weights": torch.zeros(2), "extra": _Opaque()}, unsafe)
    cfg = tmp_path / "ok.json"
    cfg.write_text(json.dumps(_tiny_config(**{"model.checkpoint": str(unsafe)})))
    cases = [
        (["run", str(tmp_path / "missing.toml")], "error: CONFIG: no such file"),
        (["run", str(bad_json)], "error: " + str(bad_json) + ": not valid JSON"),
        (["run", str(cfg)], "error: config key 'model.checkpoint': cannot load"),
        (["run", str(cfg), "--device", "tpu"], "error: device: not a torch device"),
        (["demo", "--forget-class", "12"], "error: --forget-class"),
        (["run", str(cfg), "--precision", "float16"], "error: --precision: 'float16' runs on CUDA only"),
    ]
    if not torch.cuda.is_available():
        cases.append((["run", str(cfg), "--device", "cuda"], "error: device: 'cuda' asked for, but CUDA is not"))
    for argv, message in cases:
        assert cli.main([*argv, "--quiet", "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err


class _Opaque:
    pass


def test_bad_config_subprocess_has_no_traceback(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(
        '[dataset]\nname = "mnist"\n[model]\nname = "mlp"\n[scenario]\nkind = "half_class"\n[[methods]]\nname = "jit"\n'
    )
    proc = _cli("run", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: config key 'scenario.kind': expected one of ['full_class', 'sub_class', 'random'], got 'half_class'"
    )
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_demo_fast_subprocess(tmp_path):
    proc = _cli("demo", "--fast", "--out", str(tmp_path / "demo"), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert "[1/8] training the original" in proc.stderr  # step messages and progress on stderr
    lines = proc.stdout.strip().splitlines()
    assert all(c in lines[0] for c in COLUMNS) and len(lines) == 2 + 7
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    _check_rows(results, ["original", "retrain", "JiT", "SSD", "LF-SSD", "ASSD", "DEL"])
    # measured with seed 1: original 0.92, retrain 0.0, JiT 0.68, SSD/LF-SSD/ASSD 0.0, DEL 0.17
    _assert_forgot(results["rows"], results["rows"][1]["forget_acc"])
    assert results["seed"] == 1 and results["scenario"]["forgotten_classes"] == [3]
    assert results["precision"] == "auto"  # the demo runs precision="auto" and says what it chose
    chosen = "bfloat16" if results["environment"]["backend"]["fast_bf16"]["cpu"] else "float32"
    assert f"precision: {chosen} (auto: " in proc.stderr
    assert (tmp_path / "demo" / "results.png").stat().st_size > 0


def test_help_example_config_is_valid():
    import tomllib

    text = "\n".join(line for line in cli.CONFIG_EXAMPLE.splitlines()[1:] if not line.strip().startswith("checkpoint"))
    exp = cli.parse_config(tomllib.loads(text), device="cpu")
    assert [m.name for m in exp.methods] == ["jit", "ssd"] and exp.recipe.epochs == 30
    assert exp.scenario == {"kind": "full_class", "class": 0} and exp.out == "runs/cifar10_class0"


def test_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    rows = [
        {
            "method": "m",
            "seconds": 1.0,
            "forget_acc": 0.5,
            "test_acc_remaining": 0.9,
            "entropy_mia": 0.1,
            "loss_mia": 0.5,
            "kind": "method",
        }
    ]
    note = cli.write_plot(rows, str(tmp_path / "p.png"))
    assert "matplotlib is not installed" in note and not (tmp_path / "p.png").exists()


def test_table_format():
    rows = [
        {
            "method": "m",
            "seconds": 1.25,
            "forget_acc": 0.5,
            "retain_acc": 1.0,
            "test_acc": 0.25,
            "test_acc_remaining": float("nan"),
            "entropy_mia": None,
            "loss_mia": 0.125,
        }
    ]
    lines = cli.format_table(rows).splitlines()
    assert lines[2].split() == ["m", "1.2", "50.0%", "100.0%", "25.0%", "-", "-", "12.5%"]
