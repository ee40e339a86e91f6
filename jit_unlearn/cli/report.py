"""The results of an experiment as a plain-text table and a bar-chart figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["COLUMNS", "COMPARISON_COLUMNS", "format_table", "write_plot"]

# (row key, title, format): a format string, or a function of the value.
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
# Shown when some row has a value: ZRF against the incompetent model, the JS divergence to the
# retrained model on the forget set, and the average gap to the retrained row in percentage points.
COMPARISON_COLUMNS = [
    ("zrf", "ZRF", "{:.3f}"),
    ("js_to_retrain", "JS to retrain", "{:.4f}"),
    ("avg_gap_to_retrain", "avg gap (points)", lambda v: f"{100 * v:.1f}"),
]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_table(rows: Sequence[Mapping]) -> str:
    """A plain-text table of result rows: accuracies and MIAs in percent, the method's seconds, and
    the comparison columns (ZRF, JS to retrain, avg gap to retrain) when some row has them."""
    columns = COLUMNS + [c for c in COMPARISON_COLUMNS if any(not _missing(r.get(c[0])) for r in rows)]
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if _missing(value) else fmt(value) if callable(fmt) else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _colour(row: Mapping) -> str:
    return {"baseline": "gray", "comparison": "C1", "original": "C7"}.get(row.get("kind"), "C0")


def write_plot(rows: Sequence[Mapping], path: str, *, title: str = "") -> str | None:
    """Three panels: bars of forget accuracy, other-class test accuracy and the two MIAs per row;
    each row's average gap to the retrained model in points (when there is one); and each row's
    seconds.  Returns None on success, or a note when matplotlib is not installed (nothing is
    written)."""
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
    gapped = [r for r in rows if r.get("kind") != "baseline" and not _missing(r.get("avg_gap_to_retrain"))]
    panels = [3.2 + 0.15 * len(rows), 1.3] if not gapped else [3.2 + 0.15 * len(rows), 1.3, 1.3]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(sum(panels) * 2.3, 4.6), gridspec_kw={"width_ratios": panels}, squeeze=False
    )
    ax, ax_t = axes[0][0], axes[0][-1]
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        values = [100 * (r.get(key) if r.get(key) is not None else float("nan")) for r in rows]
        ax.bar([i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))], values, width, label=label)
    baseline = next((r for r in rows if r.get("kind") == "baseline"), None)
    if baseline is not None:
        ax.axhline(100 * baseline["forget_acc"], color="gray", lw=0.8, ls="--")
    ax.set_xticks(
        range(len(rows)), names, rotation=30 if len(rows) > 8 else 0, ha="right" if len(rows) > 8 else "center"
    )
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(metrics), fontsize=8, frameon=False)
    ax.set_title(title or "unlearning results")
    if gapped:
        ax_g = axes[0][1]
        gaps = [100 * r["avg_gap_to_retrain"] for r in gapped]
        bars = ax_g.barh([r["method"] for r in gapped], gaps, color=[_colour(r) for r in gapped])
        ax_g.bar_label(bars, labels=[f"{g:.1f}" for g in gaps], padding=3, fontsize=8)
        top = max(max(gaps), 1.0)
        if top / max(min(gaps), 1e-3) > 20:  # gaps of a tenth of a point beside tens of points
            ax_g.set_xscale("log")
            ax_g.set_xlim(max(min(gaps), 0.01) / 2, 3 * top)
        else:
            ax_g.set_xlim(0, 1.3 * top)
        ax_g.invert_yaxis()
        log = " (log scale)" if ax_g.get_xscale() == "log" else ""
        ax_g.set_xlabel(f"points{log}; the retrained model: 0")
        ax_g.set_title("avg gap to retrain")
    timed = [r for r in rows if r.get("kind") != "original" and r.get("seconds") is not None]
    seconds = [r["seconds"] for r in timed]
    bars = ax_t.barh([r["method"] for r in timed], seconds, color=[_colour(r) for r in timed])
    ax_t.bar_label(bars, labels=[f"{s:.1f} s" for s in seconds], padding=3, fontsize=8)
    ax_t.set_xlim(0, 1.3 * max(seconds, default=1.0))
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds (retrain: training from scratch)")
    ax_t.set_title("time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
