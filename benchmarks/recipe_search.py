"""Run several pretraining recipes (same data, fixed step budgets) and compare their kNN top-1.

Used to choose the defaults of the Fashion-MNIST recipes: the step budget of each variant is
what this project's 2-core CPU trains in the wall-clock budget (measured separately), so a
GPU can search recipes quickly and the CPU then confirms the winner in real time.

    python benchmarks/recipe_search.py benchmarks/fmnist_variants.yaml --parallel 4 --out /tmp/search
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ONE = r"""
import json, sys, logging
from selfsight.resolve import load_config
from selfsight.engine.trainer import pretrain
from selfsight.eval.knn import evaluate_knn
name, out, over, base = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
cfg = load_config(base.get("files", []), overrides=base.get("overrides", []) + over)
r = pretrain(cfg, out)
row = {"name": name, "steps": r["steps"], "minutes": round(r["minutes"], 2)}
for b in [None] + (["random"] if "--random" in sys.argv else []):
    acc = evaluate_knn(out, "fashion-mnist", "fashion-mnist:test")  if b is None else \
          evaluate_knn(out, "fashion-mnist", "fashion-mnist:test", baseline=b)
    row["knn_top1" if b is None else "random_top1"] = round(acc["top1"], 4)
print("RESULT " + json.dumps(row), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variants")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--out", default="/tmp/recipe_search")
    ap.add_argument("--random", action="store_true", help="also evaluate each backbone at random init")
    args = ap.parse_args()
    spec = yaml.safe_load(Path(args.variants).read_text())
    base = spec.get("base", {})
    todo = list(spec["variants"])
    running, rows = [], []
    t0 = time.time()
    while todo or running:
        while todo and len(running) < args.parallel:
            v = todo.pop(0)
            cmd = [sys.executable, "-c", ONE, v["name"], f"{args.out}/{v['name']}", json.dumps(v["overrides"]),
                   json.dumps(base)] + (["--random"] if args.random else [])
            running.append((v, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for v, p in list(running):
            if p.poll() is not None:
                running.remove((v, p))
                out = p.stdout.read()
                res = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
                if res:
                    row = json.loads(res[-1][7:])
                    row["overrides"] = " ".join(v["overrides"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{v['name']} FAILED:\n{out[-3000:]}", flush=True)
        time.sleep(0.5)
    print(f"\n| variant | steps | knn top-1 | random-init top-1 | overrides |  ({time.time() - t0:.0f} s)")
    print("|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["knn_top1"]):
        print(f"| {r['name']} | {r['steps']} | {r['knn_top1']:.4f} | {r.get('random_top1', '')} | {r['overrides']} |")


if __name__ == "__main__":
    main()
