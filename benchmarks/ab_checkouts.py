"""Training steps per second of two checkouts side by side: the same synthetic instruction mixture and tiny
causal LM as benchmarks/streaming_memory.py, trained in memory by each checkout's code in turn (PYTHONPATH
switched per run, the runs alternating), for each task count; the losses of the two must agree.

    git worktree add ../before HEAD~1
    python benchmarks/ab_checkouts.py --before ../before/src --after src --tasks 10,300 --out ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import streaming_memory as sm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the first checkout's src folder")
    parser.add_argument("--after", required=True, help="the second checkout's src folder")
    parser.add_argument("--tasks", default="10,300")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    codes = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = sm.build_model(work / "model")
        sm.write_mixture(work / "warm", 200, 2)
        for src in codes.values():  # one run of each first, not recorded: later runs find the imports cached
            os.environ["PYTHONPATH"] = src
            sm.run(work / "warm", model, work, False, 2)
        for tasks in (int(t) for t in args.tasks.split(",")):
            data = work / f"data-{tasks}"
            sm.write_mixture(data, args.rows, tasks)
            for repeat in range(args.repeats):
                for name, src in codes.items():
                    os.environ["PYTHONPATH"] = src
                    result = sm.run(data, model, work, False, args.steps)
                    runs.setdefault(f"{tasks}-{name}", []).append(result)
                    print(tasks, name, repeat, round(result["steps_per_second"], 1), flush=True)
    summary = {}
    for tasks in (int(t) for t in args.tasks.split(",")):
        before, after = runs[f"{tasks}-before"], runs[f"{tasks}-after"]
        summary[str(tasks)] = {
            "before_steps_per_second": [round(r["steps_per_second"], 1) for r in before],
            "after_steps_per_second": [round(r["steps_per_second"], 1) for r in after],
            "max_loss_difference": max(
                abs(a - b)
                for x, y in zip(before, after, strict=True)
                for a, b in zip(x["losses"], y["losses"], strict=True)
            ),
        }
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
