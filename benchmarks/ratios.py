"""Print the ratios within each benchmark group of a pytest-benchmark JSON file.

    python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/ratios.py bench.json

For each group, every entry's min and median time are divided by those of the group's fastest entry.
Paired benchmarks (a baseline timed inside the same rounds, see bench_jit.py,
bench_integrations.py and bench_precision.py) also print the ratios they recorded in extra_info
("floor" is that baseline; extra_info["baseline"] names it when it is not a floor), and throughput
benchmarks their samples per second.
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as fh:
        data = json.load(fh)
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"] or "(no group)"].append(bench)
    for group, benches in groups.items():
        benches.sort(key=lambda b: b["stats"]["min"])
        best_min, best_med = benches[0]["stats"]["min"], benches[0]["stats"]["median"]
        print(f"\n## {group}")
        print(f"{'benchmark':58s} {'min ms':>10s} {'median ms':>10s} {'x min':>7s} {'x median':>8s}")
        for b in benches:
            s = b["stats"]
            print(
                f"{b['name'][:58]:58s} {s['min'] * 1e3:10.3f} {s['median'] * 1e3:10.3f} "
                f"{s['min'] / best_min:7.2f} {s['median'] / best_med:8.2f}"
            )
            extra = b.get("extra_info") or {}
            if "median_paired_ratio" in extra:  # a paired group: the baseline ran inside the rounds
                label = f"  paired with {extra.get('baseline', 'its floor')}, rounds alternating:"
                print(
                    f"{label:58s} floor min {extra['floor_min'] * 1e3:.3f} ms, "
                    f"median {extra['floor_median'] * 1e3:.3f} ms; ratio of mins {extra['ratio_of_mins']:.3f}, "
                    f"of medians {extra['ratio_of_medians']:.3f}, median per-round ratio "
                    f"{extra['median_paired_ratio']:.3f}"
                )
            if "median_paired_speedup" in extra:  # a baseline timed inside the rounds (bench_precision.py)
                label = f"  paired with the {extra['baseline']}:"
                print(
                    f"{label:58s} baseline min {extra['baseline_min'] * 1e3:.3f} ms, "
                    f"median {extra['baseline_median'] * 1e3:.3f} ms; speedup of mins "
                    f"{extra['speedup_of_mins']:.3f}, of medians {extra['speedup_of_medians']:.3f}, "
                    f"median per-round speedup {extra['median_paired_speedup']:.3f}"
                )
            if "samples_per_s_best" in extra:
                label = "  throughput:"
                print(
                    f"{label:58s} {extra['samples_per_s_best']:.1f} samples/s (best round), "
                    f"{extra['samples_per_s_median']:.1f} (median)"
                )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
