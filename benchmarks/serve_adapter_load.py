"""What a task loaded into a running server costs: its head and LoRA adapter joining the served backbone,
against its whole model beside it (what loading did before, and still does where the runs do not fit).

Trains two short per-task-LoRA runs of the quickstart config (all-MiniLM-L6-v2, its four bundled tasks; the
second run's tasks renamed), serves the first, loads every task of the second both ways and reports the
bytes of weights each way adds (exact: the unique tensors the engine holds), and the resident memory of a
fresh process serving the first run alone, with the second's tasks joined, and with their whole models
beside it; and checks that both ways answer alike.

    python benchmarks/serve_adapter_load.py --steps 20 --out benchmarks/results/serve_adapter_load.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import yaml

from multitune.cli import main as cli
from multitune.serving.engine import Engine

ROOT = Path(__file__).resolve().parent.parent


def train(folder: Path, name: str, seed: int, steps: int, suffix: str) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    config["tasks"] = {f"{task}{suffix}": settings for task, settings in config["tasks"].items()}
    for settings in config["tasks"].values():
        settings.pop("sampling_weight", None)
    config["model"]["peft"] = {"method": "lora", "r": 8, "alpha": 16}
    config["run"].update(name=name, seed=seed, output_dir=str(folder))
    config["training"].update(steps=steps, eval_every=steps, progress=False)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert cli(["train", str(path)]) == 0
    return folder / name


def held_bytes(engine: Engine) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of every model the engine holds."""
    seen: dict[int, int] = {}
    for model in engine.models:
        if model is None:
            continue
        for tensor in [*model.parameters(), *model.buffers()]:
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def load_all(served: Path, other: Path, mode: str) -> dict[str, Any]:
    """In this process: serve `served`, load every task of `other` (mode "adapter_only", "whole_model", or
    "none" to load none and answer a served task)."""
    engine = Engine(served)
    tasks = list(yaml.safe_load((other / "config.yaml").read_text(encoding="utf-8"))["tasks"])
    before_bytes = held_bytes(engine)
    for task in tasks if mode != "none" else []:
        loaded = engine.loadable(other, task)
        if mode == "whole_model":
            loaded.host = None  # its whole model beside the served one
        engine.register(loaded)
        del loaded
    if mode == "none":
        tasks = list(engine.tasks)
    records = [{"text": "what is the capital of france ?"}, {"text": "win a free prize now, text back"}]
    task = next(t for t in tasks if engine.tasks[t].config.type == "classification")
    answers = engine.run([(task, engine.encode(task, records))])[0]
    return {
        "tasks_loaded": len(tasks) if mode != "none" else 0,
        "models_held": sum(m is not None for m in engine.models),
        "weights_added_bytes": held_bytes(engine) - before_bytes,
        "rss_bytes": rss(),
        "answers": answers,
    }


def measured(served: Path, other: Path, mode: str) -> dict[str, Any]:
    """load_all in a fresh process, so that its resident memory is that of the server it builds."""
    command = [sys.executable, __file__, "--measure", mode, str(served), str(other)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "SERVED", "OTHER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        mode, served_run, other_run = args.measure
        print(json.dumps(load_all(Path(served_run), Path(other_run), mode)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        served = train(folder, "served", 13, args.steps, "")
        other = train(folder, "other", 14, args.steps, "_b")
        alone = measured(served, other, "none")
        joined = measured(served, other, "adapter_only")
        whole = measured(served, other, "whole_model")
    for a, b in zip(joined["answers"], whole["answers"], strict=True):  # the two ways answer alike
        assert a["prediction"] == b["prediction"], (a, b)
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) < 1e-4, (a, b)
    result = {"served_alone": alone, "adapter_only": joined, "whole_model": whole}
    for side in result.values():
        side.pop("answers")
    mib = 2**20
    for name, side in result.items():
        print(
            f"{name:13s} tasks loaded {side['tasks_loaded']}  models held {side['models_held']}  weights added "
            f"{side['weights_added_bytes'] / mib:8.2f} MiB  process RSS {side['rss_bytes'] / mib:8.1f} MiB"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
