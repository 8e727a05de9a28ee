"""Backend 'auto' per op from a GPU benchmark run (scripts/gpu_check.sh runs it).

Reads a ``vos_kernels.benchmark`` results.json run with ``--backends cuda,triton`` on a
CUDA device and, per benchmark op, compares the CUDA C++ kernel ("fused") with the
Triton one ("alternatives"/triton) over the cases where both ran: the geometric mean of
the time ratios decides. Writes the device's entry as JSON (``--out``) and, with
``--merge FILE``, adds it to an ``auto_cuda.json`` (vos_kernels/data/auto_cuda.json is the
one the package reads). Prints a table of the evidence.

    python scripts/auto_table.py benchmarks/results/<device>-gpu-check/bench/results.json \
        --out auto_cuda.json [--merge vos_kernels/data/auto_cuda.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys

# benchmark op -> the library ops whose 'auto' choice it decides
OPS = {
    "global": ["labelled_nearest_sqdist", "fb_global_matching"],
    "local": ["fb_multi_local_matching"],
    "topk": ["topk_memory_read"],
    "em": ["gmm_em"],
    "pcan-instance": ["prototype_attention", "prototype_values"],
}


def choose(results: dict) -> tuple[dict[str, str], list[dict]]:
    """({library op: backend}, evidence rows) from one results.json."""
    ratios: dict[str, list[float]] = {}
    for case in results["cases"]:
        fused, alt = case.get("fused", {}), case.get("alternatives", {}).get("triton", {})
        if fused.get("backend") != "cuda" or "time" not in fused or "time" not in alt:
            continue
        ratios.setdefault(case["op"], []).append(alt["time"]["median_ms"] / fused["time"]["median_ms"])
    table, rows = {}, []
    for op, rs in sorted(ratios.items()):
        gmean = math.exp(sum(math.log(r) for r in rs) / len(rs))
        winner = "cuda" if gmean >= 1.0 else "triton"
        rows.append(dict(op=op, cases=len(rs), triton_over_cuda=gmean, winner=winner))
        for lib_op in OPS.get(op, []):
            table[lib_op] = winner
    return table, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="results.json of a CUDA benchmark run with --backends cuda,triton")
    p.add_argument("--out", help="write {device: {op: backend}} here")
    p.add_argument("--merge", help="add the entry to this auto_cuda.json")
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    env = results["environment"]
    if env.get("device") != "cuda":
        print(f"{args.results}: not a CUDA run (device {env.get('device')})", file=sys.stderr)
        return 2
    table, rows = choose(results)
    if not rows:
        print(f"{args.results}: no case ran both the 'cuda' and the 'triton' backend", file=sys.stderr)
        return 2
    device = env["device_name"]
    print(f"device {device}, commit {env.get('git_commit', '?')[:12]}")
    print("| benchmark op | cases | time triton / cuda (geometric mean) | auto |")
    print("| --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['op']} | {r['cases']} | {r['triton_over_cuda']:.3g} | {r['winner']} |")
    entry = {device: table}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(devices=entry, evidence=rows, source=args.results,
                           commit=env.get("git_commit"), date=env.get("date")), f, indent=2)
    if args.merge:
        with open(args.merge) as f:
            doc = json.load(f)
        doc.setdefault("devices", {}).update(entry)
        with open(args.merge, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
