"""Same forgetting in bfloat16 as in float32: every method run both ways on one trained model, with
the evaluation record of each run and, for the SSD family, the overlap of the selected sets.

Run: python benchmarks/forgetting_precision.py [digits] [mnist_demo] [--threads T]
Prints a markdown table per setting (docs/BENCHMARKS.md, "Same forgetting").  `digits` is the
setting of tests/test_precision_argument.py; `mnist_demo` is the `jit-unlearn demo` setting (bundled MNIST,
ConvNet width 16, digit 3, the demo's method settings), a few minutes on two cores.
"""

import argparse
import copy
import time

import torch

import jit_unlearn as ju
from jit_unlearn import data, models
from jit_unlearn.cli.commands import DEMO_METHODS, DEMO_MODEL, DEMO_RECIPE, DEMO_TEST_FRACTION
from jit_unlearn.eval import Recipe, evaluate, full_class, train

METRICS = ("forget_acc", "retain_acc", "test_acc", "entropy_mia", "loss_mia")

# The digits setting: MLP 64-256-256-10 trained as in tests/test_jit.py (Adam 1e-3, label smoothing
# 0.1), digit 3 forgotten; JiT as in docs/TUNING.md, the others set so that they forget (a method
# that forgets nothing compares nothing): LF-SSD alpha 4, ASSD at batch 8.
DIGITS_MODEL = {"name": "mlp", "kwargs": {"in_features": 64, "hidden": (256, 256), "num_classes": 10}}
DIGITS_RECIPE = {
    "epochs": 15,
    "lr": 1e-3,
    "batch_size": 64,
    "optimizer": "adam",
    "schedule": "constant",
    "label_smoothing": 0.1,
}
DIGITS_METHODS = [
    {"name": "jit", "sigma": 1.0, "lr": 1.7e-3, "num_samples": 25, "batch_size": 64},
    {"name": "ssd", "alpha": 10.0, "lam": 1.0, "batch_size": 64},
    {"name": "lf_ssd", "alpha": 4.0, "lam": 1.0, "batch_size": 64},
    {"name": "assd", "batch_size": 8},
    {"name": "del", "budget": 0.1, "lr": 0.05, "epochs": 3, "batch_size": 64},
]
FUNCTIONS = {"jit": ju.jit, "ssd": ju.ssd, "lf_ssd": ju.lf_ssd, "assd": ju.assd, "del": ju.del_unlearn}


DIGITS_CNN = {"name": "small_cnn", "kwargs": {"in_channels": 1, "width": 16, "num_classes": 10}}


def setting(name: str, seed: int = 0):
    """(model factory, splits, recipe, method specs) of a named setting."""
    if name == "digits":
        ds, spec, recipe, methods = data.digits(), DIGITS_MODEL, DIGITS_RECIPE, DIGITS_METHODS
    elif name == "digits_cnn":
        ds, spec, recipe, methods = data.digits(image=True), DIGITS_CNN, DIGITS_RECIPE, DIGITS_METHODS
    else:
        ds, spec, recipe = data.mnist(), DEMO_MODEL, DEMO_RECIPE
        methods = [m for m in DEMO_METHODS if m["name"] in FUNCTIONS]  # the demo's baselines take no precision
    splits = full_class(ds, 3, test_fraction=DEMO_TEST_FRACTION, seed=seed)

    def factory():
        return models.build(spec["name"], **spec["kwargs"])

    return factory, splits, Recipe.from_mapping(recipe, seed=seed), methods


def trained(factory, splits, recipe) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = factory()
    return train(model, splits.train, recipe).eval()


def run_method(spec: dict, model, splits, factory, precision: str, seed: int = 0):
    """Run one method spec on `model` in place; returns its report."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    fn = FUNCTIONS[spec["name"]]
    if spec["name"] == "jit":
        return fn(model, splits.forget, seed=seed, precision=precision, progress=False, **kwargs)
    if spec["name"] == "del":
        return fn(
            model, splits.forget, splits.retain, init=factory, seed=seed, precision=precision, progress=False, **kwargs
        )
    return fn(model, splits.forget, splits.train, precision=precision, progress=False, **kwargs)


def selected_sets(report) -> dict[str, torch.Tensor]:
    """The elements an SSD-family report dampened: I_f > alpha * I_D, per parameter."""
    f, d = report.forget_importances, report.full_importances
    return {n: f[n] > report.alpha * d[n] for n in f}


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float, int, int]:
    """(|A ∩ B| / max(|A|, |B|), |A ∩ B| / |A ∪ B|, |A|, |B|) of two selections: the overlap (the
    smaller share of one selection that the other also selects) and the Jaccard index; 1.0 when both
    are empty."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    size_a, size_b = sum(int(a[n].sum()) for n in a), sum(int(b[n].sum()) for n in b)
    if not union:
        return 1.0, 1.0, size_a, size_b
    return inter / max(size_a, size_b), inter / union, size_a, size_b


def compare(name: str, seed: int = 0, precisions=("float32", "bfloat16")) -> list[dict]:
    """Every method of setting `name`, once per precision, on copies of one trained model: rows of
    {method, precision, seconds, the METRICS, and for the SSD family the overlap with float32}."""
    factory, splits, recipe, methods = setting(name, seed)
    original = trained(factory, splits, recipe)
    rows = [{"method": "original", "precision": "-", "seconds": 0.0, **_metrics(original, splits, seed)}]
    for spec in methods:
        selections = {}
        for precision in precisions:
            model = copy.deepcopy(original)
            start = time.perf_counter()
            report = run_method(spec, model, splits, factory, precision, seed)
            row = {"method": spec["name"], "precision": precision, "seconds": time.perf_counter() - start}
            row.update(_metrics(model, splits, seed))
            if spec["name"] in ("ssd", "lf_ssd", "assd"):
                selections[precision] = selected_sets(report)
                share, jaccard, _, size = overlap(selections[precisions[0]], selections[precision])
                row.update(selected=size, overlap=share, jaccard=jaccard)
            rows.append(row)
    return rows


def _metrics(model, splits, seed) -> dict:
    record = evaluate(model, splits, seed=seed)
    return {k: record[k] for k in METRICS}


def table(rows: list[dict]) -> str:
    head = (
        "| method | precision | forget | retain | test | entropy MIA | loss MIA "
        "| selected (overlap / Jaccard) | seconds |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        sel = f"{r['selected']} ({100 * r['overlap']:.2f} / {100 * r['jaccard']:.2f} %)" if "overlap" in r else ""
        cells = [f"{100 * r[k]:.2f}" for k in METRICS]
        lines.append(f"| {r['method']} | {r['precision']} | " + " | ".join(cells) + f" | {sel} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def worst_gaps(rows: list[dict]) -> dict[str, float]:
    """Per method, the largest |bfloat16 - float32| over the METRICS, in points."""
    ref = {r["method"]: r for r in rows if r["precision"] == "float32"}
    return {
        r["method"]: max(100 * abs(r[k] - ref[r["method"]][k]) for k in METRICS)
        for r in rows
        if r["precision"] not in ("float32", "-")
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", default=["digits", "mnist_demo"], choices=["digits", "mnist_demo"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(ju.backend_info()["fast_bf16_features"])
    for name in args.settings:
        result = compare(name, args.seed)
        print(f"\n### {name} (seed {args.seed})\n")
        print(table(result))
        print("\nlargest gap per method (points):", {k: round(v, 2) for k, v in worst_gaps(result).items()})
