"""Turn GPU run results into the README table (markdown) and a speedup plot.

    python3 bench/report.py bench/results/<run>/                  # a gpu_run.sh folder (quick or full)
    python3 bench/report.py run.json more.jsonl --plot speedup.png --out report.md

Reads, complete or cut off (a truncated last line is skipped and counted):
  - `bench/gpu_run.sh quick` files: networks.jsonl (per network, batch, dtype, impl: median ms,
    launches, error, first-call seconds), smoke.jsonl (correctness per block and check),
    stages.jsonl (per-stage time, TFLOP/s, GB/s), env.txt (device and versions);
  - pytest-benchmark JSON from the bench/ suites (--benchmark-json) and its per-case JSON lines
    (bench.jsonl, --bench-jsonl).

Times are per forward: the suites time K forwards plus one synchronize per round on a GPU
(extra_info["forwards_per_round"]); the quick run's are do_bench medians. Speedups of the fused
model are over eager PyTorch and over torch.compile (max-autotune where measured, else the
default mode) from the same run. Only what the files hold is printed; a case that failed its
check against eager is marked (FAIL) and gets no speedup. For the training step a "forward" is a
whole step (forward, backward, optimizer).
"""

import argparse
import glob
import json
import os
import re
from collections import defaultdict

IMPL_ORDER = ["eager", "compile", "compile-default", "compile-max-autotune", "compile-reduce-overhead", "fused",
              "fused-cudagraph"]  # "compile": the training step (torch.compile's default mode)


class Results:
    """Everything read from the inputs."""

    def __init__(self):
        self.machine = {}
        # (case, batch, dtype) -> impl -> dict(ms, launches, ok, first_call_s, cudagraph_ms)
        self.cases = defaultdict(dict)
        self.smoke = []
        self.stages = []
        self.skipped = []  # records with status "skipped"
        self.errors = []  # records with status "error"
        self.bad_lines = 0  # unparsable lines (a file cut off mid-line)
        self.sources = []


def _read_jsonl(path, res):
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                res.bad_lines += 1
    return records


def _add_benchmark(res, info, median_s):
    """One pytest-benchmark case (its extra_info and median seconds per round)."""
    what = info.get("block") or info.get("network")
    if what is None or "impl" not in info:
        return
    ms = None if median_s is None else median_s * 1e3 / info.get("forwards_per_round", 1)
    res.cases[(what, info.get("batch"), info.get("dtype"))][info["impl"]] = dict(
        ms=ms, launches=info.get("launches"), ok=True, first_call_s=None, cudagraph_ms=info.get("do_bench_cudagraph_ms"))


def _add_quick(res, rec):
    status = rec.get("status")
    if status == "skipped":
        res.skipped.append(rec)
        return
    if status == "error":
        res.errors.append(rec)
    part = rec.get("part")
    if part == "smoke":
        res.smoke.append(rec)
    elif part == "stages" and status != "error":
        res.stages.append(rec)
    elif part == "networks" and status in ("ok", "FAIL"):
        res.cases[(rec["network"], rec["batch"], rec["dtype"])][rec["impl"]] = dict(
            ms=rec.get("ms"), launches=rec.get("launches"), ok=status == "ok", first_call_s=rec.get("first_call_s"),
            cudagraph_ms=rec.get("cudagraph_ms"), err=rec.get("err"))


def _read_env(path, res):
    with open(path, errors="replace") as f:
        text = f.read()
    m = re.search(r"^python (\S+) torch (\S+) cuda (\S+) cudnn (\S+) triton (\S+)", text, re.M)
    if m:
        res.machine.update(python=m[1], torch=m[2], cuda=m[3], cudnn=m[4], triton=m[5])
    m = re.search(r"^device (.+?) capability (\S+)", text, re.M)
    if m:
        res.machine.update(gpu=m[1], capability=m[2])
    m = re.search(r"Driver Version: (\S+)", text)
    if m:
        res.machine["driver"] = m[1]


def load(paths):
    """Results from files and gpu_run.sh folders (any mix; missing parts are fine)."""
    res = Results()
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.jsonl")) + glob.glob(os.path.join(path, "*.json"))
                            + glob.glob(os.path.join(path, "env.txt")))
        else:
            files.append(path)
    has_jsonl = {os.path.dirname(f) for f in files if f.endswith("bench.jsonl")}
    for path in files:
        res.sources.append(os.path.basename(path))
        if path.endswith("env.txt"):
            _read_env(path, res)
        elif path.endswith(".jsonl"):
            for rec in _read_jsonl(path, res):
                if "extra_info" in rec:  # bench.jsonl: one pytest-benchmark case
                    _add_benchmark(res, rec["extra_info"], (rec.get("stats") or {}).get("median"))
                else:
                    _add_quick(res, rec)
        else:
            try:
                with open(path) as f:
                    data = json.load(f)
            except ValueError:
                res.bad_lines += 1
                continue
            res.machine = {**data.get("machine_info", {}), **res.machine}
            if os.path.dirname(path) in has_jsonl:
                continue  # the same cases as bench.jsonl beside it
            for b in data.get("benchmarks", []):
                _add_benchmark(res, b["extra_info"], b["stats"]["median"])
    return res


def _speedup(other, fused):
    if not (other and fused and fused.get("ok") and other.get("ms") and fused.get("ms")):
        return ""
    return f"{other['ms'] / fused['ms']:.2f}x"


def table(res):
    """The README table: per case, every implementation's ms (launches) and the fused speedups."""
    cases = res.cases
    m = res.machine
    lines = [f"Device: {m.get('gpu') or 'CPU (interpreter: times are not meaningful)'}; "
             f"torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, "
             f"driver {m.get('driver', 'n/a')}", ""]
    if not cases:
        return "\n".join(lines + ["(no timed cases in the input)"])
    impls = [i for i in IMPL_ORDER if any(i in c for c in cases.values())]
    head = (["case", "batch", "dtype"] + [f"{i} ms (launches)" for i in impls]
            + ["fused vs eager", "fused vs torch.compile"]
            + (["fused-cudagraph vs eager"] if "fused-cudagraph" in impls else []))
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (what, batch, dtype), by_impl in sorted(cases.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0,
                                                                               str(kv[0][2]))):
        cells = [str(what), str(batch), str(dtype)]
        for i in impls:
            r = by_impl.get(i)
            if r is None or r.get("ms") is None:
                cells.append("")
                continue
            launches = r["launches"] if r.get("launches") is not None else "?"
            cells.append(f"{r['ms']:.3f} ({launches})" + ("" if r.get("ok", True) else " FAIL"))
        fused = by_impl.get("fused")
        compiled = next((by_impl[i] for i in ("compile-max-autotune", "compile-default", "compile") if i in by_impl),
                        None)
        cells += [_speedup(by_impl.get("eager"), fused), _speedup(compiled, fused)]
        if "fused-cudagraph" in impls:
            cells.append(_speedup(by_impl.get("eager"), by_impl.get("fused-cudagraph")))
        lines.append("| " + " | ".join(cells) + " |")
    first = [(k, i, r["first_call_s"]) for k, by in cases.items() for i, r in by.items() if r.get("first_call_s")]
    if first:
        lines += ["", "First call (compilation, autotuning, CUDA graph capture; not in the times above), seconds:",
                  "; ".join(f"{k[0]} b{k[1]} {k[2]} {i} {s:.1f}" for k, i, s in sorted(first, key=str))]
    return "\n".join(lines)


def smoke_table(res):
    """Correctness: one row per block, one column per check (ok / FAIL err / error)."""
    checks, rows = [], defaultdict(dict)
    for r in res.smoke:
        if "block" not in r:
            continue
        check = r.get("check", "?") + (f" {r['config']}" if r.get("config") is not None else "")  # a config name
        if check not in checks:
            checks.append(check)
        cell = r["status"] if r["status"] != "FAIL" else f"FAIL {r.get('err', 0):.1e}"
        if r["status"] == "ok" and r.get("err") is not None:
            cell = f"ok {r['err']:.1e}"
        rows[r["block"]][check] = cell
    if not rows:
        return ""
    counts = defaultdict(int)
    for r in res.smoke:
        counts[r["status"]] += 1
    lines = ["Correctness smoke (max |fused - eager| / max |eager|; "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "):", "",
             "| block | " + " | ".join(checks) + " |", "|" + "---|" * (len(checks) + 1)]
    for block, by in rows.items():
        lines.append(f"| {block} | " + " | ".join(by.get(c, "") for c in checks) + " |")
    return "\n".join(lines)


def stages_table(res):
    if not res.stages:
        return ""
    r0 = res.stages[0]
    lines = [f"Per stage, fused GoogLeNet batch {r0.get('batch')} {r0.get('dtype')} (floor: FLOPs at the bf16 "
             "peak or bytes at the copy bandwidth, whichever is longer):", "",
             "| block | stage | problems | ms | TFLOP/s | GB/s | floor ms | of floor |", "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for r in res.stages:
        total += r["ms"]
        lines.append(f"| {r['block']} | {r['stage']} | {'; '.join(r.get('problems', []))} | {r['ms']:.3f} | "
                     f"{r['tflops']:.1f} | {r['gbs']:.0f} | {r['floor_ms']:.3f} | {r['of_floor']:.0%} |")
    lines.append(f"| sum | | | {total:.3f} | | | {sum(r['floor_ms'] for r in res.stages):.3f} | |")
    return "\n".join(lines)


def notes(res):
    lines = []
    if res.errors:
        lines.append(f"Errors ({len(res.errors)}):")
        lines += [f"- {r.get('part')} {r.get('case')}: {r.get('error', '')[:200]}" for r in res.errors]
    if res.skipped:
        lines.append(f"Skipped ({len(res.skipped)}): " + "; ".join(f"{r.get('part')} {r.get('case')} "
                                                                    f"({r.get('reason', '')[:80]})"
                                                                    for r in res.skipped))
    if res.bad_lines:
        lines.append(f"{res.bad_lines} unreadable line(s) skipped (a file cut off mid-write).")
    return "\n".join(lines)


def markdown(res):
    return "\n\n".join(p for p in (table(res), smoke_table(res), stages_table(res), notes(res)) if p) + "\n"


def plot(res, path):
    """Speedup of the fused model (and its CUDA graph) over eager, and over torch.compile,
    against batch size: one line per (case, dtype, comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for (what, batch, dtype), by in res.cases.items():
        eager = by.get("eager")
        compiled = next((by[i] for i in ("compile-max-autotune", "compile-default", "compile") if i in by), None)
        for label, num, den in (("fused / eager", eager, by.get("fused")),
                                ("fused+graph / eager", eager, by.get("fused-cudagraph")),
                                ("fused / compile", compiled, by.get("fused"))):
            s = _speedup(num, den)
            if s and batch:
                series[(what, dtype, label)].append((batch, float(s[:-1])))
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"fused / eager": "-", "fused+graph / eager": ":", "fused / compile": "--"}
    for (what, dtype, label), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], styles[label], marker="o",
                label=f"{what} {dtype}: {label}")
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("batch")
    ax.set_ylabel("speedup (x)")
    gpu = res.machine.get("gpu") or "no GPU"
    ax.set_title(f"fused-inception speedup, {gpu}" + ("" if series else " (no complete pair yet)"), fontsize=9)
    if series:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="gpu_run.sh result folders, *.jsonl, pytest-benchmark *.json")
    p.add_argument("--plot", help="write a speedup-vs-batch PNG here (needs matplotlib)")
    p.add_argument("--out", help="write the markdown here too")
    args = p.parse_args(argv)
    res = load(args.inputs)
    text = markdown(res)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.plot:
        try:
            plot(res, args.plot)
        except ImportError as e:
            print(f"(no plot: {e})")


if __name__ == "__main__":
    main()
