"""The comparison baselines and metrics in `jit-unlearn run` and the demo: rows, table columns,
results.json values against independent transcriptions, the plot; and the runnable `run --help` example."""

import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from jit_unlearn import cli, data, models
from jit_unlearn.eval import full_class

pytestmark = pytest.mark.usefixtures("one_thread")

MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}
# Default settings (tuned for digits, docs/BASELINES.md §4); random_label's epochs given, as its default.
BASELINE_ENTRIES = [{"name": "finetune"}, {"name": "neggrad_plus"}, {"name": "random_label", "epochs": 3}]
BASELINE_ENTRIES += [{"name": "bad_teacher"}, {"name": "scrub"}]


def _config(methods, **changes):
    cfg = {
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "kwargs": dict(MLP_KWARGS)},
        "train": {"epochs": 8, "lr": 0.05, "batch_size": 32, "label_smoothing": 0.1},
        "scenario": {"kind": "full_class", "class": 0},
        "methods": methods,
        "seed": 0,
    }
    cfg.update(changes)
    return cfg


def _run(tmp_path, cfg, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    return json.loads((out / "results.json").read_text()), table, out


def _js_rows(p, q):
    """JS(p ‖ q) per row, natural log, written out term by term (float64 probabilities)."""
    m = (p + q) / 2
    kl_pm = (p * (p.log() - m.log())).nan_to_num().sum(1)
    kl_qm = (q * (q.log() - m.log())).nan_to_num().sum(1)
    return (kl_pm + kl_qm) / 2


def _probs(model, x):
    with torch.no_grad():
        return F.softmax(model.eval()(x).double(), dim=1)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, one_thread):
    tmp_path = tmp_path_factory.mktemp("baselines")
    cfg = _config([{"name": "jit", "sigma": 1.0, "lr": 1e-3, "num_samples": 3}, *BASELINE_ENTRIES])
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["run", str(path), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    return json.loads((out / "results.json").read_text()), buf.getvalue(), out


def test_baselines_rows_and_columns(baseline_run):
    results, table, out = baseline_run
    rows = results["rows"]
    assert [r["method"] for r in rows] == [
        "original",
        "retrain",
        "JiT",
        "Finetune",
        "NegGrad+",
        "RandLabel",
        "BadTeacher",
        "SCRUB",
    ]
    assert [r["kind"] for r in rows] == ["original", "baseline", "method"] + ["comparison"] * 5
    assert [r["name"] for r in rows[2:]] == ["jit"] + [e["name"] for e in BASELINE_ENTRIES]
    assert rows[5]["params"] == {"epochs": 3} and rows[4]["params"] == {}
    header = table.splitlines()[0]
    for title in ("ZRF", "JS to retrain", "avg gap (points)"):
        assert title in header
    assert len(table.splitlines()) == 2 + len(rows)
    for r in rows:
        assert 1 - math.log(2) - 1e-12 <= r["zrf"] <= 1.0
        assert 0.0 <= r["js_to_retrain"] <= math.log(2)
        assert 0.0 <= r["activation_distance_to_retrain"] <= math.sqrt(2)
        assert r["layer_distance_to_retrain"] >= 0.0 and r["seconds"] > 0
    retrain = rows[1]
    assert retrain["avg_gap_to_retrain"] == 0.0 and retrain["js_to_retrain"] < 1e-12
    assert retrain["layer_distance_to_retrain"] == 0.0
    # the baselines forget on this data (forget accuracy of the original: > 90 %)
    assert rows[0]["forget_acc"] > 0.9
    for r in rows[4:]:
        assert r["forget_acc"] < 0.5 * rows[0]["forget_acc"], r["method"]
    assert (out / "results.png").stat().st_size > 0


def test_avg_gap_matches_the_rows(baseline_run):
    rows = baseline_run[0]["rows"]
    retrain = rows[1]
    for r in rows:
        gaps = [abs(r[k] - retrain[k]) for k in ("forget_acc", "retain_acc", "test_acc_remaining", "entropy_mia")]
        assert r["avg_gap_to_retrain"] == pytest.approx(sum(gaps) / 4, abs=1e-12), r["method"]


def test_comparisons_of_the_original_against_a_transcription(baseline_run):
    """The original row's ZRF (against the untrained model), JS divergence, activation distance and
    parameter distance to the retrained model, recomputed here from the saved original, models
    built and retrained as the experiment builds them, and the forget split."""
    from jit_unlearn.eval import Recipe, retrain

    results, _, out = baseline_run
    original = models.MLP(64, (32,), 10)
    original.load_state_dict(torch.load(out / "original.pt", weights_only=True))
    torch.manual_seed(0)
    untrained = models.MLP(64, (32,), 10)  # the experiment's untrained original (seed 0)
    splits = full_class(data.digits(), 0, None, test_fraction=0.2, seed=0)
    retrained = retrain(lambda: models.MLP(64, (32,), 10), splits.retain, Recipe.from_mapping(_config([])["train"]))
    x = torch.stack([splits.forget[i][0] for i in range(len(splits.forget))])
    p_orig, p_rand, p_retr = _probs(original, x), _probs(untrained, x), _probs(retrained, x)
    row = results["rows"][0]
    assert row["zrf"] == pytest.approx(1 - float(_js_rows(p_orig, p_rand).mean()), abs=1e-9)
    assert row["js_to_retrain"] == pytest.approx(float(_js_rows(p_orig, p_retr).mean()), abs=1e-9)
    l2 = torch.linalg.vector_norm(p_orig - p_retr, dim=1).mean()
    assert row["activation_distance_to_retrain"] == pytest.approx(float(l2), abs=1e-9)
    squares = sum(
        float(((a.detach().double() - b.detach().double()) ** 2).sum())
        for a, b in zip(original.parameters(), retrained.parameters())
    )
    assert row["layer_distance_to_retrain"] == pytest.approx(math.sqrt(squares), rel=1e-9)


def test_without_retrain_no_gap_columns(tmp_path, capsys):
    results, table, _ = _run(tmp_path, _config([{"name": "bad_teacher"}], retrain=False), capsys)
    header = table.splitlines()[0]
    assert "ZRF" in header and "JS to retrain" not in header and "avg gap" not in header
    row = results["rows"][1]
    assert row["kind"] == "comparison" and row["js_to_retrain"] is None and row["avg_gap_to_retrain"] is None


def test_format_table_comparison_columns():
    rows = [
        {"method": "a", "seconds": 1.0, "forget_acc": 0.5, "zrf": 0.91234, "js_to_retrain": 0.012345},
        {"method": "b", "seconds": None, "forget_acc": 0.25, "avg_gap_to_retrain": 0.0123},
    ]
    lines = cli.format_table(rows).splitlines()
    assert lines[0].endswith("ZRF  JS to retrain  avg gap (points)")
    assert lines[2].split()[-3:] == ["0.912", "0.0123", "-"]
    assert lines[3].split()[-3:] == ["-", "-", "1.2"]  # points: 100 x 0.0123, one decimal


def test_demo_lists_the_baselines_with_working_settings():
    exp = cli.demo_experiment()
    by_name = {m.name: m for m in exp.methods}
    assert [m.name for m in exp.methods][5:] == list(cli.BASELINES)
    # docs/BASELINES.md §4: the defaults of these two collapse or diverge on the demo's ConvNet
    assert by_name["neggrad_plus"].params == {"epochs": 1, "beta": 0.03}
    assert by_name["scrub"].params == {"lr": 0.005, "max_epochs": 1}
    assert not any(m.name in cli.BASELINES for m in cli.demo_experiment(fast=True).methods)


def _example_toml(text: str) -> dict:
    """The TOML of a `run --help` example: its indented lines."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads("\n".join(line[2:] for line in text.splitlines() if line.startswith("  ")))


def test_help_shows_both_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.index("example 1, runs offline on the bundled MNIST") < text.index("example 2, every key")
    assert 'name = "mnist"' in text and 'name = "cifar10"' in text


def test_help_example_runs_offline(tmp_path, capsys):
    cfg = _example_toml(cli.CONFIG_EXAMPLE_MNIST)
    exp = cli.parse_config(cfg, device="cpu")
    assert exp.dataset.name == "mnist" and exp.model.checkpoint is None
    assert [m.name for m in exp.methods] == ["jit", "ssd", "bad_teacher"]
    assert exp.scenario == {"kind": "full_class", "class": 3} and exp.out == "runs/mnist_digit3"
    # the same config with tiny settings runs end to end
    cfg["model"]["kwargs"].update(width=2, hidden=8)
    cfg["train"]["epochs"] = 1
    cfg["retrain"] = False
    cfg["methods"][0]["num_samples"] = 2
    results, table, out = _run(tmp_path, cfg, capsys)
    assert [r["method"] for r in results["rows"]] == ["original", "JiT", "SSD", "BadTeacher"]
    assert (out / "original.pt").is_file()
    cifar = _example_toml(cli.CONFIG_EXAMPLE.split("\n", 1)[1])
    cifar["model"].pop("checkpoint")
    assert cli.parse_config(cifar, device="cpu").dataset.name == "cifar10"
