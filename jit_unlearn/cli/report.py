"""The results of an experiment as a plain-text table and a bar-chart figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["COLUMNS", "format_table", "write_plot"]

COLUMNS = [
    ("method", "method", "{}"),
    ("seconds", "seconds", "{:.1f}"),
    ("forget_acc", "forget acc", "{:.1%}"),
    ("retain_acc", "retain acc", "{:.1%}"),
    ("test_acc", "test acc", "{:.1%}"),
    ("test_acc_remaining", "test acc (other classes)", "{:.1%}"),
    ("entropy_mia", "entropy MIA", "{:.1%}"),
    ("loss_mia", "loss MIA", "{:.1%}"),
]


def format_table(rows: Sequence[Mapping]) -> str:
    """A plain-text table of result rows (accuracies and MIAs in percent, seconds of the method)."""
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            line.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_plot(rows: Sequence[Mapping], path: str, *, title: str = "") -> str | None:
    """Bar charts of forget / other-class test accuracy / entropy MIA per row, and method seconds.
    Returns None on success, or a note when matplotlib is not installed (nothing is written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    names = [r["method"] for r in rows]
    metrics = [
        ("forget_acc", "forget acc"),
        ("test_acc_remaining", "test acc, other classes"),
        ("entropy_mia", "entropy MIA"),
        ("loss_mia", "loss MIA"),
    ]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        values = [100 * (r.get(key) if r.get(key) is not None else float("nan")) for r in rows]
        ax.bar([i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))], values, width, label=label)
    baseline = next((r for r in rows if r.get("kind") == "baseline"), None)
    if baseline is not None:
        ax.axhline(100 * baseline["forget_acc"], color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(metrics), fontsize=8, frameon=False)
    ax.set_title(title or "unlearning results")
    timed = [r for r in rows if r.get("kind") != "original" and r.get("seconds") is not None]
    seconds = [r["seconds"] for r in timed]
    bars = ax_t.barh(
        [r["method"] for r in timed], seconds, color=["gray" if r.get("kind") == "baseline" else "C0" for r in timed]
    )
    ax_t.bar_label(bars, labels=[f"{s:.1f} s" for s in seconds], padding=3, fontsize=8)
    ax_t.set_xlim(0, 1.25 * max(seconds, default=1.0))
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds (retrain: training from scratch)")
    ax_t.set_title("time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
