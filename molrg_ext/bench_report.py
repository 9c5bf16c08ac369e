"""Merge several runs of the benchmark table into one, rendered as Markdown.

The runs are the JSON files of ``python -m benchmarks --out run.json``.

On a shared machine one run is disturbed now and then, differently for each implementation, so
the merged time of an implementation in a case is its minimum over the runs (each run already
keeps the minimum of its repeats); every run's times stay in ``seconds_per_run``. Ratios and
GFLOP/s are recomputed from the merged times, and the peak is the best one measured in any run.

    python -m molrg_ext.bench_report --out merged.json --markdown table.md run1.json run2.json
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

__all__ = ["merge_runs", "markdown_table", "dae_bytes", "floor_table", "main"]

# The speed targets of issue #4: (kind, n) -> (required ratio, the peers it applies to).
TARGETS = {("dae", 48): (10.0, ("eager", "compile")), ("dae", 3072): (1.5, ("eager", "compile")),
           ("train", 48): (20.0, ("eager-loop",))}


def _key(row) -> tuple:
    return row["kind"], tuple(row["shape"]), row["mode"]


def merge_runs(runs: Sequence[dict]) -> dict:
    """One table from several runs: per case and implementation the minimum time over the runs."""
    if not runs:
        raise ValueError("merge_runs: no runs given")
    order, cases = [], {}
    for run in runs:
        for row in run["rows"]:
            k = _key(row)
            if k not in cases:
                order.append(k)
                cases[k] = {"rows": [], "template": row}
            cases[k]["rows"].append(row)
    rows = []
    for k in order:
        runs_k = cases[k]["rows"]
        t0 = cases[k]["template"]
        impls = sorted({i for r in runs_k for i in r["seconds"]}, key=lambda i: (i != "ours", i))
        best = {i: min(r["seconds"][i] for r in runs_k if i in r["seconds"]) for i in impls}
        ours = best.get("ours")
        flops = t0.get("flops")  # useful flops of the case (older runs: from time x GFLOP/s)
        if flops is None:
            flops = next((r["gflops_ours"] * 1e9 * r["seconds"]["ours"] for r in runs_k
                          if r.get("gflops_ours") and "ours" in r["seconds"]), None)
        rows.append({
            "kind": t0["kind"], "shape": list(t0["shape"]), "mode": t0["mode"],
            "seconds": best, "flops": flops,
            "gflops_ours": flops / ours / 1e9 if flops and ours else None,
            "speedup": {i: v / ours for i, v in best.items() if i != "ours" and ours},
            "seconds_per_run": [r["seconds"] for r in runs_k],
        })
    metas = [r.get("meta", {}) for r in runs]
    peaks = [m["peak_gflops_fp32"] for m in metas if m.get("peak_gflops_fp32")]
    meta = dict(metas[0])
    meta.update({
        "runs": len(runs),
        "peak_gflops_fp32": max(peaks) if peaks else None,
        "peak_gflops_per_run": peaks,
        "loadavg_runs": [m.get("loadavg") for m in metas],
        "time_runs": [m.get("time") for m in metas],
        "note": "per case and implementation: minimum over the runs of each run's minimum",
    })
    meta.pop("loadavg", None)
    meta.pop("time", None)
    return {"meta": meta, "rows": rows}


def _ms(v: Optional[float]) -> str:
    return f"{1e3 * v:.2f}" if v else "-"


def markdown_table(merged: dict) -> str:
    """The merged table as Markdown: times in ms, ratios (peer / ours), GFLOP/s, % of the
    measured sgemm rate (bench.peak_gflops: a 2048^3 torch.mm, below the FMA peak)."""
    rows = merged["rows"]
    peers = sorted({i for r in rows for i in r["seconds"] if i != "ours"},
                   key=lambda i: (i != "eager", i != "compile", i))
    peak = merged["meta"].get("peak_gflops_fp32")
    head = ["kind", "shape", "mode", "ours ms"]
    for p in peers:
        head += [f"{p} ms", f"x {p}"]
    head += ["GFLOP/s", f"% of sgemm {peak:.0f}" if peak else "% of sgemm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r["seconds"]
        cells = [r["kind"], str(tuple(r["shape"])), r["mode"], _ms(t.get("ours"))]
        for p in peers:
            cells += [_ms(t.get(p)), f"{r['speedup'][p]:.2f}" if p in r["speedup"] else "-"]
        g = r.get("gflops_ours")
        cells += [f"{g:.1f}" if g else "-", f"{100 * g / peak:.0f}" if g and peak else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dae_bytes(n, K, d, B, itemsize=4) -> int:
    """Least memory traffic of one denoiser fwd+bwd w.r.t. U by any implementation: the forward
    reads x and writes y, the backward reads g and x again (B x n values each; K and d do not
    enter). Our op also saves proj [B, K, d] and w [B, K] for the backward and writes the
    gradients of c, phi and the bias, about 100 bytes more per sample at (48, 2, 6); an
    implementation that recomputes the projections in the backward and skips those gradients
    would not."""
    return itemsize * B * 4 * n


def _row_lines(n, itemsize=4) -> int:
    """64-byte cache lines of a row of n values (at least; a row off a line boundary takes one
    more)."""
    return -(-n * itemsize // 64)


def train_lines(n, K, d, M, P, itemsize=4) -> int:
    """Least number of cache lines one fused training step fetches: the P * M drawn rows of X
    (n values each, whole 64-byte lines). When the training sets are larger than the caches (the
    benchmark's 64 x 4096 x 48 floats are 50 MB) these are scattered misses, one row at a time."""
    return P * M * _row_lines(n, itemsize)


def _line_ns(roofline: dict, n: int, itemsize=4) -> float:
    """The probe's cost of one scattered line of a training row of n values, per thread: its rate
    for rows of three adjacent lines of a benchmark-sized set (``row3_line_ns``) when a row is
    three lines and the probe measured it, else its rate for lone lines of 256 MiB."""
    if _row_lines(n, itemsize) == 3 and "row3_line_ns" in roofline:
        return roofline["row3_line_ns"]
    return roofline["random_line_ns"]


def _dae_bandwidth(roofline: dict, shape, bw: float, itemsize=4) -> float:
    """Bytes per second for a denoiser case: the streaming bandwidth ``bw``, or the probe's
    cache-resident triad (``cached_triad_gbs``) when the case's x, g and y (3 B n values) fit in
    the set it was measured on (``cached_set_mib``): a repeated benchmark call finds them in the
    last-level cache when that is large, and the floor must not assume slower memory than that."""
    n, B = shape[0], shape[3]
    if "cached_triad_gbs" in roofline and 3 * B * n * itemsize <= roofline["cached_set_mib"] << 20:
        return max(bw, roofline["cached_triad_gbs"] * 1e9)
    return bw


def _roofline_for(roofline: dict, threads) -> dict:
    if "fma_peak_gflops" in roofline:
        return roofline
    key = f"threads_{threads}"
    if key not in roofline:
        have = sorted(k for k in roofline if k.startswith("threads_"))
        raise ValueError(f"roofline: no entry {key!r} for the benchmark's thread count "
                         f"(have {have}); run benchmarks/roofline/run.sh {threads}")
    return roofline[key]


def floor_table(merged: dict, roofline: dict) -> str:
    """Per case: the time the machine cannot beat (max of flops at the measured FMA peak and the
    least traffic at the best measured bandwidth: of the cache-resident triad when the case's
    arrays fit in its set, see _dae_bandwidth), the time the issue's target asks for (the
    fastest listed peer divided by the target ratio), and whether the target is below the floor.
    Training rows: the compute floor of the denoiser math, and as memory floor the drawn rows'
    lines at the probe's rate of independent scattered loads (per line and thread: of rows of
    three lines, ``row3_line_ns``, or of lone lines, ``random_line_ns``), when the roofline has
    it. ``roofline`` is one output of benchmarks/roofline/run.sh,
    or several keyed ``threads_<T>`` (the entry of the benchmark's thread count is used)."""
    roofline = _roofline_for(roofline, merged.get("meta", {}).get("threads"))
    fma = roofline["fma_peak_gflops"] * 1e9
    bw = max(roofline["read_gbs"], roofline["triad_gbs"]) * 1e9
    lines = ["| kind | shape | mode | compute floor ms | memory floor ms | target | target ms |"
             " target needs % of peak | target below floor |", "|---|---|---|---|---|---|---|---|---|"]
    for r in merged["rows"]:
        n = r["shape"][0]
        ratio, peers = TARGETS.get((r["kind"], n), (None, ()))
        have = [r["seconds"][p] for p in peers if p in r["seconds"]]
        tc = r["flops"] / fma if r.get("flops") else None
        if r["kind"] == "dae":
            tm = dae_bytes(*r["shape"]) / _dae_bandwidth(roofline, r["shape"], bw)
        elif r["kind"] == "train" and "random_line_ns" in roofline:
            tm = (train_lines(*r["shape"]) * _line_ns(roofline, r["shape"][0]) * 1e-9
                  / roofline.get("threads", 1))
        else:
            tm = None
        floor = max(t for t in (tc, tm) if t is not None) if tc or tm else None
        want = min(have) / ratio if ratio and have else None
        verdict = "-" if want is None or floor is None else ("yes" if want < floor else "no")
        # the share of the machine's peak rate (flops or bandwidth, whichever binds) at which the
        # target's time would be reached with nothing else done: above 100 it is below the floor
        need = "-" if want is None or floor is None else f"{100 * floor / want:.0f}"
        lines.append("| " + " | ".join([
            r["kind"], str(tuple(r["shape"])), r["mode"], _ms(tc), _ms(tm),
            f">= {ratio:g}x {'/'.join(peers)}" if ratio else "-", _ms(want), need, verdict])
            + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m molrg_ext.bench_report",
                                description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="JSON files written by python -m benchmarks --out")
    p.add_argument("--out", required=True, help="merged JSON output")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    p.add_argument("--roofline", default=None,
                   help="JSON of benchmarks/roofline/run.sh: add the floor-vs-target table")
    a = p.parse_args(argv)
    runs = []
    for path in a.runs:
        with open(path) as f:
            runs.append(json.load(f))
    merged = merge_runs(runs)
    with open(a.out, "w") as f:
        json.dump(merged, f, indent=1)
    table = markdown_table(merged)
    if a.roofline:
        with open(a.roofline) as f:
            table += "\n" + floor_table(merged, json.load(f))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
