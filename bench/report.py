"""Turn pytest-benchmark JSON from the bench/ suites into a markdown table (and a speedup plot).

    python bench/report.py bench/results/<run>.json [--plot speedup.png]

Times are per forward: the suites time K forwards plus one synchronize per round on a GPU
(extra_info["forwards_per_round"]) and one forward per round on CPU. The median is reported, with
launches per forward and the speedup of the fused model over eager PyTorch and over
torch.compile (max-autotune for inference, the default mode for the training step) measured in
the same run. Only what the JSON holds is printed. For the training step a "forward" is a whole
step (forward, backward, optimizer).
"""

import argparse
import json
from collections import defaultdict

IMPL_ORDER = ["eager", "compile", "compile-default", "compile-max-autotune", "compile-reduce-overhead", "fused",
              "fused-cudagraph"]  # "compile": the training step (torch.compile's default mode)


def load(paths):
    """(machine_info, {case: {impl: (ms per forward, launches)}}) from one or more JSON files."""
    machine, cases = {}, defaultdict(dict)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = data.get("machine_info", machine)
        for b in data["benchmarks"]:
            info = b["extra_info"]
            what = info.get("block") or info.get("network")
            case = (what, info["batch"], info["dtype"])
            ms = b["stats"]["median"] * 1e3 / info.get("forwards_per_round", 1)
            cases[case][info["impl"]] = (ms, info.get("launches"))
    return machine, dict(cases)


def table(machine, cases):
    impls = [i for i in IMPL_ORDER if any(i in c for c in cases.values())]
    lines = [f"Device: {machine.get('gpu') or 'CPU (interpreter: times are not meaningful)'}; "
             f"torch {machine.get('torch')}, triton {machine.get('triton')}, CUDA {machine.get('cuda')}, "
             f"driver {machine.get('driver', 'n/a')}", ""]
    head = ["case", "batch", "dtype"] + [f"{i} ms (launches)" for i in impls] + ["fused vs eager",
                                                                                  "fused vs torch.compile"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (what, batch, dtype), by_impl in sorted(cases.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        cells = [what, str(batch), dtype]
        for i in impls:
            ms, launches = by_impl.get(i, (None, None))
            cells.append("" if ms is None else f"{ms:.3f} ({launches if launches is not None else '?'})")
        fused = by_impl.get("fused", (None,))[0]
        compiled = next((by_impl[i] for i in ("compile-max-autotune", "compile") if i in by_impl), (None,))
        for other in (by_impl.get("eager", (None,))[0], compiled[0]):
            cells.append(f"{other / fused:.2f}x" if fused and other else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(cases, path):
    """Speedup of fused over eager against batch size, one line per (case, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for (what, batch, dtype), by_impl in cases.items():
        if "fused" in by_impl and "eager" in by_impl:
            series[(what, dtype)].append((batch, by_impl["eager"][0] / by_impl["fused"][0]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for (what, dtype), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{what} {dtype}")
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("batch")
    ax.set_ylabel("speedup over eager (x)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json output)")
    p.add_argument("--plot", help="write a speedup-vs-batch PNG here (needs matplotlib)")
    args = p.parse_args(argv)
    machine, cases = load(args.json)
    print(table(machine, cases))
    if args.plot:
        plot(cases, args.plot)


if __name__ == "__main__":
    main()
