"""The versus benchmark's CPU-lane decode rows alone (graphrt/bench/versus.graphrt_rows; llama.cpp not run):

    python3 tools/lane_rows.py --out DIR [--rows bf16:1,int8:1,int4:1,bf16:4,bf16:8,bf16:16] [--nodes auto|host]
                               [--placement auto|lane|lane-split|lane-beside]

--nodes host loads every runtime with CUDA host nodes for the lane (RuntimeOptions.lane_nodes) instead of the
default signalled nodes, for a same-machine comparison; --placement restricts the planner to one family of the CPU
lane's plans (RuntimeOptions.placement). Writes lane_rows_<nodes>[_<placement>].json (the rows as graphrt_rows
writes them) and prints each row's tokens/s, the plan's prediction and the share of the two-lane limit.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from graphrt.bench import versus
from graphrt.bench.run import make_bench_model

ALL = [("bf16", 1), ("int8", 1), ("int4", 1), ("bf16", 4), ("bf16", 8), ("bf16", 16)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default=",".join(f"{f}:{b}" for f, b in ALL))
    ap.add_argument("--nodes", default="auto", choices=("auto", "signal", "host"))
    ap.add_argument("--placement", default="auto", choices=("auto", "lane", "lane-split", "lane-beside"))
    ap.add_argument("--model", type=Path, default=Path("/tmp/graphrt-versus-model"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    wanted = {(f, int(b)) for f, b in (r.split(":") for r in a.rows.split(","))}
    skip = [dict(format=f, placement=p, test="decode", batch=b, skipped=True)
            for f in ("bf16", "int8", "int4") for p in ("gpu", "split", "split+cpu") for b in (1, 4, 8, 16)
            if not (p == "split+cpu" and (f, b) in wanted)]
    skip += [dict(format="bf16", placement=p, test="prefill", batch=1, skipped=True) for p in ("gpu", "split", "split+cpu")]
    keep = a.out / (f"lane_rows_{a.nodes}" + ("" if a.placement == "auto" else f"_{a.placement}") + ".json")
    keep.write_text(json.dumps(skip))
    options = {} if a.nodes == "auto" else {"lane_nodes": a.nodes}
    if a.placement != "auto":
        options["placement"] = a.placement
    model = make_bench_model(a.model, versus.LAYERS)
    rows = [r for r in versus.graphrt_rows(model, keep, options) if not r.get("skipped")]
    keep.write_text(json.dumps(rows, indent=1))
    for r in rows:
        if "error" in r:
            print(r["format"], r["batch"], r["error"])
            continue
        pred, lim = r.get("predicted_tokens_per_s"), r.get("limit_tokens_per_s")
        print(f"{r['format']} batch {r['batch']} nodes {a.nodes} {a.placement}: {r['tokens_per_s']:.1f} tok/s, predicted "
              f"{pred:.1f} ({100 * (pred / r['tokens_per_s'] - 1):+.1f}% step), limit {lim:.1f} "
              f"({100 * r['tokens_per_s'] / lim:.0f}%)")


if __name__ == "__main__":
    main()
