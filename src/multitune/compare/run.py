"""`multitune compare CONFIG`: the multi-task model against one model per task, on the same budget.

The multi-task run trains first; each single-task baseline then trains on exactly as many rows of its task
as the multi-task run saw (the same batch size, ceil(rows / batch_size) steps). Every training runs in its
own process, so its wall time and peak memory are its own. Baselines are cached under
`output_dir/.baselines/` by a hash of the task's data files, its config, the model and the budget, and
reused while those are unchanged. Writes `comparison.json` and `comparison.md` into the multi-task run.

Progress goes to stderr: which model trains (k of n), with an estimate of the time left from the seconds
per step so far; on a terminal (and unless `training.progress: false`) each training's own bars show live.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from multitune.catalogue import load_config, load_run_config
from multitune.compare.measures import delta_m, delta_m_tasks, deployment_bytes
from multitune.compare.merges import format_merges, merge_rows
from multitune.compare.processes import Progress, _train_subprocess
from multitune.compare.seeds import aggregate, format_seeds
from multitune.config import SPLITS, Config
from multitune.config.schema import EarlyStopping, TrainingConfig
from multitune.core.files import write_json, write_text
from multitune.core.history import read_history
from multitune.data.tasks import load_tasks
from multitune.errors import ConfigError, MultitunError
from multitune.evaluation.evaluate import change_text
from multitune.evaluation.report import write_report
from multitune.runs.layout import create_run_dir, data_fingerprint

BASELINES = ".baselines"
SIDES = ("single_total", "multi")  # the two sides' keys in comparison.json's cost fields


# training settings that change no weight and no score
UNLEARNED = ("progress", "tensorboard", "read_ahead", "tokenize_workers")


def _fingerprint(config: Config, task: str) -> str:
    """Hash of what decides a baseline: the task's config and data files (an image task: every image's bytes),
    the model, training and seed.
    Only settings that differ from their defaults enter it, so a newly added option leaves caches valid, and
    none that only change what a run shows (progress bars, TensorBoard files)."""
    digest = hashlib.sha256()
    task_config = config.tasks[task]
    for group in (task_config, config.model, config.training, config.regularization):
        settings = group.model_dump(mode="json", exclude_defaults=True)
        if group is config.training:  # what a run shows, not what it learns: a bar, TensorBoard files
            settings = {k: v for k, v in settings.items() if k not in UNLEARNED}
        digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(str(config.run.seed).encode())
    if task_config.modality == "image":  # the files name images: their bytes decide the baseline too
        loaded = load_tasks({task: task_config}, config.run.seed, config.model.trust_remote_code)[task]
        digest.update(json.dumps(data_fingerprint(loaded), sort_keys=True).encode())
    for split in SPLITS:
        paths = getattr(task_config.source, split) or []
        for path in [paths] if isinstance(paths, str) else paths:
            try:
                digest.update(Path(path).read_bytes())
            except OSError:
                digest.update(path.encode())
    return digest.hexdigest()[:16]


def validation_trajectory(run_dir: Path, task: str, batch_size: int) -> list[list[float]]:
    """[[rows seen, main score], ...] at each validation of a single-task run (batch_size rows per step)."""
    history = run_dir / "history.jsonl"
    if not history.is_file():
        return []
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    main = metrics["tasks"][task]["main_metric"]
    out = []
    for entry in read_history(history):
        if "validation" in entry and task in entry["validation"]:
            out.append([entry["step"] * batch_size, entry["validation"][task][main]])
    return out


def single_task_config(config: Config, task: str, rows: int) -> Config:
    """The baseline of one task: the same backbone and training settings, as many rows as multi-task gave
    it, fully fine-tuned (one model per task: no sharing architecture, no adapters)."""
    data = json.loads(json.dumps(config.model_dump(mode="json")))
    data["model"].update(architecture={"name": "hard"}, peft=None)
    steps = max(1, math.ceil(rows / config.training.batch_size))
    data["tasks"] = {task: data["tasks"][task]}
    stopping = data["training"]["early_stopping"]
    data["training"].update(
        steps=steps,
        eval_every=max(1, min(config.training.eval_every, steps)),
        mixed_batches=False,
        checkpoint_every=None,
        schedule={"name": "joint"},  # one model trained on its task, as a user trains it alone
        # one task: the same rule, counted in validations (its own steps are every step)
        early_stopping=None if stopping is None else {**stopping, "per_task": False, "count": "validations"},
    )
    data["recipe"] = None  # the recipe's multi-task stages are the multi-task side's, not the baseline's
    data["sampling"], data["loss_weighting"], data["gradient_aggregation"] = (
        {"name": "uniform"},
        {"name": "equal"},
        None,
    )
    data["analysis"], data["guard"] = {}, {}  # a plain baseline: no relation measurements, no guard
    data["run"].update(name=f"single-{task}", resume=None)
    return Config.model_validate(data)


@dataclass(frozen=True)
class Budget:
    """How the two sides train. Equal budget (`converge` false): each baseline trains on `factor` times the
    rows the multi-task run saw of its task. To convergence (`converge`): each side trains as a user trains a
    model alone: validation every `training.eval_every` steps, early stopping after `patience` validations
    without a gain, at most `max_steps` steps (default: training.steps), the best checkpoint kept."""

    factor: float = 1.0
    converge: bool = False
    patience: int = 3
    max_steps: int | None = None

    def check(self) -> None:
        if not self.factor > 0:
            raise MultitunError(f"--baseline-budget must be positive, not {self.factor}")
        if self.patience < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise MultitunError("--patience and --max-steps must be at least 1")

    def applied(self, config: Config) -> Config:
        """The multi-task config under this budget (to convergence: its early stopping and step limit)."""
        if not self.converge:
            return config
        config = config.model_copy(deep=True)
        config.training.steps = self.max_steps or config.training.steps
        own = config.training.early_stopping  # a per-task rule and its min_delta stay; the patience is the budget's
        config.training.early_stopping = (
            EarlyStopping(patience=self.patience) if own is None else replace(own, patience=self.patience)
        )
        return config

    def baseline_rows(self, training: TrainingConfig, rows_seen: int) -> int:
        if self.converge:  # the same step limit as the multi-task side; early stopping decides
            return training.steps * training.batch_size
        return round(self.factor * rows_seen)

    def rule(self, training: TrainingConfig) -> str:
        if self.converge:
            own = training.early_stopping is not None and training.early_stopping.count == "own_steps"
            each = f" (multi-task: per task, {self.patience} x {training.eval_every} of its own steps)" if own else ""
            return (
                f"each side trains to convergence: validation every {training.eval_every} steps, early stopping "
                f"after {self.patience} validations without a gain{each}, at most {training.steps} steps, the best "
                "checkpoint kept"
            )
        if self.factor == 1.0:
            return "each baseline trains on as many rows of its task as the multi-task run saw"
        return f"each baseline trains on {self.factor:g}x the rows of its task the multi-task run saw"


def compare(
    config_path: str,
    overrides: list[str],
    budget: Budget | float = 1.0,
    seeds: list[int] | None = None,
    merges: Sequence[str] = (),
) -> dict[str, Any]:
    """comparison.json of one run; with `seeds`, one comparison per seed (run.seed) and their aggregate,
    written to OUTPUT_DIR/NAME-seeds/ (per task: mean and standard deviation of each side; Δm per seed)."""
    budget = budget if isinstance(budget, Budget) else Budget(factor=budget)
    budget.check()
    config = load_config(config_path, overrides)
    if merges and config.model.random_init:  # refused before anything trains
        raise ConfigError(
            "merging adds task vectors to the backbone's pretrained weights, and this config builds the backbone "
            "with random weights (model.random_init): there are none to merge onto",
            field="--merge",
        )
    if not seeds:
        return compare_once(config, budget, merges)
    if len(set(seeds)) != len(seeds):
        raise MultitunError(f"--seeds names a seed twice: {seeds}")
    results = []
    for seed in seeds:
        seeded = config.model_copy(deep=True)
        seeded.run.seed, seeded.run.name = seed, f"{config.run.name}-seed{seed}"
        results.append(compare_once(seeded, budget, merges))
    summary = aggregate(results, seeds)
    folder = create_run_dir(config.run.output_dir, f"{config.run.name}-seeds")
    write_json(folder / "comparison.json", summary)
    write_text(folder / "comparison.md", format_seeds(summary) + "\n")
    print(format_seeds(summary))
    print(f"saved to {folder}")
    return summary


def compare_run(run_dir: str | Path, budget: Budget | float = 1.0, merges: Sequence[str] = ()) -> dict[str, Any]:
    """A finished multi-task run against its baselines (from the cache, or trained now), without training the
    run again: comparison.json in the run's folder. Its time is what its training loops took (every stage,
    from metrics.json); the baselines' is their processes' wall time. Raises MultitunError for a folder
    that is not a finished run, and, with --converge, for a run not trained by that budget's rule."""
    budget = budget if isinstance(budget, Budget) else Budget(factor=budget)
    budget.check()
    run = Path(run_dir)
    if not (run / "metrics.json").is_file() or not (run / "config.yaml").is_file():
        raise MultitunError("not a finished multitune run (config.yaml and metrics.json)", file=str(run))
    config = load_run_config(run / "config.yaml")
    if budget.converge:  # the baselines train by the same rule as the run did, or the comparison is unfair
        rule = budget.applied(config).training
        if (rule.steps, rule.early_stopping) != (config.training.steps, config.training.early_stopping):
            raise MultitunError(
                f"the run trained at most {config.training.steps} steps with early stopping "
                f"{config.training.early_stopping}; --converge with these --patience and --max-steps means "
                f"{rule.steps} steps with {rule.early_stopping}: give the run's own",
                field="--from-run",
            )
    multi = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    if "merge" in multi or "train_seconds" not in multi:  # a merged run, or another kind of metrics.json
        what = "a merged run" if "merge" in multi else "not a trained run (metrics.json has no train_seconds)"
        raise MultitunError(f"{what}: --from-run takes a trained multi-task run", file=str(run / "metrics.json"))
    return compare_once(config, budget, merges, trained=(run, loop_seconds(multi)))


def loop_seconds(metrics: dict[str, Any]) -> float:
    """Seconds a run spent in its training loops, every stage: a two-stage run's refinements too."""
    return float(metrics["train_seconds"]) + float(metrics.get("finetune_seconds") or 0.0)


def compare_once(
    config: Config, budget: Budget, merges: Sequence[str] = (), trained: tuple[Path, float] | None = None
) -> dict[str, Any]:
    """One multi-task run against its baselines (cached), written into the multi-task run's folder; with
    `trained` (its folder and seconds) the run exists already and is not trained again."""
    config = budget.applied(config)
    root = Path(config.run.output_dir)
    live = config.training.progress and sys.stderr.isatty()
    progress = Progress(1 + len(config.tasks), config.training.steps)
    if trained is None:
        progress.start(f"multi-task model '{config.run.name}'", config.training.steps)
        multi_dir, multi_seconds = _train_subprocess(config, root / ".configs", live)
        progress.finished(config.training.steps, multi_seconds)
    else:
        (multi_dir, multi_seconds), progress.done = trained, 1
    multi = json.loads((multi_dir / "metrics.json").read_text(encoding="utf-8"))
    seen = {task: int(multi["task_rows"].get(task, 0)) for task in config.tasks}
    empty = [task for task in config.tasks if budget.baseline_rows(config.training, seen[task]) == 0]
    if empty:  # an equal budget of no rows: there is no baseline to train
        rows = ", ".join(f"'{task}' ({seen[task]} rows)" for task in empty)
        raise MultitunError(
            f"the multi-task run drew {rows} in its {multi['steps']} step(s), so an equal-budget baseline of "
            f"{budget.factor:g}x those rows would train on none: give training.steps room for every task, or "
            "train each side to convergence (--converge)",
            file=str(multi_dir / "metrics.json"),
        )
    tasks: dict[str, dict[str, Any]] = {}
    single_wall: dict[str, float] = {}
    baselines = {
        task: single_task_config(config, task, budget.baseline_rows(config.training, seen[task]))
        for task in config.tasks
    }
    records = trained_baselines(baselines, root, progress, live)
    singles: dict[str, dict[str, Any]] = {}
    single_bytes = 0
    for task, baseline in baselines.items():
        cached, was_cached = records[task]
        singles[task] = cached["metrics"]
        tasks[task] = _task_entry(task, multi, cached, baseline.training, was_cached)
        single_wall[task] = float(cached["wall_seconds"])
        single_bytes += deployment_bytes(Path(cached["run_dir"]))
    adapters = config.model.peft is not None
    result = _result(tasks, multi, singles, single_wall, multi_seconds, config.training.batch_size, adapters)
    result["storage_bytes"] = {"single_total": single_bytes, "multi": deployment_bytes(multi_dir)}
    result["budget"] |= {
        "baseline_factor": budget.factor,
        "converge": budget.converge,
        "steps": {"multi": multi["steps"], **{t: int(m["steps"]) for t, m in singles.items()}},
        "rule": budget.rule(config.training),
    }
    result["seed"] = config.run.seed
    result["multi_run"] = str(Path(multi_dir).resolve())
    if trained is not None:
        result["budget"]["multi_time"] = "an existing run: its training loops' time (every stage), not a wall time"
    if merges:  # the other road to one model: the baselines merged, each method a row
        runs = {task: Path(records[task][0]["run_dir"]) for task in baselines}
        result["merges"] = merge_rows(merges, runs, tasks, sum(single_wall.values()), multi_dir / "merged")
    result["verdict"] = verdict(result)
    write_json(multi_dir / "comparison.json", result)
    write_text(multi_dir / "comparison.md", format_comparison(result) + "\n")
    write_report(multi_dir)
    print(format_comparison(result))
    return result


def trained_baselines(
    baselines: dict[str, Config], root: Path, progress: Progress, live: bool = False
) -> dict[str, tuple[dict[str, Any], bool]]:
    """{task: (its baseline's record, whether it came from the cache)} for the single-task configs in
    `baselines` (`single_task_config`), cached under root/.baselines. A baseline another process is training
    now is waited for after the others, so several comparisons (or benchmark scripts) of one config share the
    work."""
    caches = {task: root / BASELINES / f"{task}-{_fingerprint(b, task)}" for task, b in baselines.items()}
    progress.steps_left = sum(
        b.training.steps for task, b in baselines.items() if not (caches[task] / "baseline.json").is_file()
    )
    records: dict[str, tuple[dict[str, Any], bool]] = {}
    for wait in (False, True):  # a baseline another comparison is training now: the others first, then wait
        for task, baseline in baselines.items():
            if task not in records and (found := _baseline(task, baseline, caches[task], progress, live, wait)):
                records[task] = found
    return records


def _baseline(
    task: str, baseline: Config, cache: Path, progress: Progress, live: bool, wait: bool = True
) -> tuple[dict[str, Any], bool] | None:
    """The single-task baseline's record (its metrics, wall seconds and run directory): from the cache when
    its data, config, model and budget are unchanged, else trained now and cached; and whether it was cached.
    Comparisons run side by side (variants of one config) share the cache: each baseline is trained by one
    of them under a lock on its cache folder; with `wait` false, None where another holds that lock now."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as lock:
        if not _lock(lock, wait):
            return None
        return _cached_or_trained(task, baseline, cache, progress, live)


def _lock(handle: Any, wait: bool) -> bool:
    """An exclusive lock on the open file (released when it is closed); False if another holds it and not
    `wait`. Where the system has no flock, no lock: the comparison runs alone as before."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _cached_or_trained(
    task: str, baseline: Config, cache: Path, progress: Progress, live: bool
) -> tuple[dict[str, Any], bool]:
    record = cache / "baseline.json"
    if record.is_file():
        progress.cached(f"single-task baseline '{task}'")
        return json.loads(record.read_text(encoding="utf-8")), True
    baseline.run.output_dir = str(cache)
    progress.start(f"single-task baseline '{task}'", baseline.training.steps)
    run_dir, seconds = _train_subprocess(baseline, cache, live)
    progress.finished(baseline.training.steps, seconds)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    cached = {"metrics": metrics, "wall_seconds": seconds, "run_dir": str(run_dir)}
    write_json(record, cached)
    return cached, False


def _task_entry(
    task: str, multi: dict[str, Any], cached: dict[str, Any], baseline: TrainingConfig, was_cached: bool
) -> dict[str, Any]:
    """One task's line of comparison.json: both scores, the baseline's trajectory, the rows each saw."""
    entry = cached["metrics"]["tasks"][task]
    mine = multi["tasks"][task]
    return {
        "single": entry["main_score"],
        "single_trajectory": validation_trajectory(Path(cached["run_dir"]), task, baseline.batch_size),
        "multi": mine["main_score"],
        "metric": mine["main_metric"],
        "higher_is_better": mine["higher_is_better"],
        "split": mine["split"],
        "rows_seen": int(multi["task_rows"].get(task, 0)),
        "single_rows": baseline.steps * baseline.batch_size,
        "cached_baseline": was_cached,
    }


def _result(
    tasks: dict[str, dict[str, Any]],
    multi: dict[str, Any],
    singles: dict[str, dict[str, Any]],
    single_wall: dict[str, float],
    multi_seconds: float,
    batch_size: int,
    per_task_adapters: bool,
) -> dict[str, Any]:
    """comparison.json: Δm, stored parameters, training and wall time, peak memory, the rows per task."""

    def total(params: dict[str, Any]) -> int:
        return int(params["shared"] + sum(params["heads"].values()))

    multi_total = total(multi["parameters"])
    return {
        "tasks": tasks,
        "delta_m_percent": round(delta_m(tasks), 3),
        "delta_m_excluded": [t for t in tasks if t not in delta_m_tasks(tasks)],
        "params": {
            "single_total": sum(total(m["parameters"]) for m in singles.values()),
            "multi_total": multi_total,
            # base model + T adapters (+ heads): with per-task PEFT this is the multi-task deployment itself
            "adapters_total": multi_total if per_task_adapters else None,
        },
        "train_seconds": {
            "single_total": round(sum(float(m["train_seconds"]) for m in singles.values()), 2),
            "multi": round(loop_seconds(multi), 2),
        },
        "wall_seconds": {"single_total": round(sum(single_wall.values()), 2), "multi": round(multi_seconds, 2)},
        "peak_memory_bytes": {
            "single_max": max(int(m["peak_memory_bytes"]) for m in singles.values()),
            "multi": multi["peak_memory_bytes"],
        },
        "budget": {"batch_size": batch_size, "rows_per_task": {t: e["rows_seen"] for t, e in tasks.items()}},
    }


def verdict(result: dict[str, Any]) -> str:
    dm = result["delta_m_percent"]
    size = result["params"]["multi_total"] / max(result["params"]["single_total"], 1)
    time_ratio = result["train_seconds"]["multi"] / max(result["train_seconds"]["single_total"], 1e-9)
    worse = [
        t for t, e in result["tasks"].items() if (e["multi"] - e["single"]) * (1 if e["higher_is_better"] else -1) < 0
    ]
    outcome = "better" if round(dm, 2) > 0 else "worse" if round(dm, 2) < 0 else "level"  # as Δm is printed
    hurt = f"; worse on {', '.join(worse)}" if worse else ""
    return (
        f"multi-task is {outcome} on average (Δm {dm:+.2f}%) with {size:.0%} of the parameters "
        f"in {time_ratio:.2f}x the training time{hurt}"
    )


def format_comparison(result: dict[str, Any]) -> str:
    lines = ["| task | metric | single-task | multi-task | change |", "|---|---|---|---|---|"]
    for task, e in result["tasks"].items():
        lines.append(f"| {task} | {e['metric']} | {e['single']:.4f} | {e['multi']:.4f} | {change_text(e)} |")
    p, t = result["params"], result["train_seconds"]
    lines += [
        "",
        f"Δm: {result['delta_m_percent']:+.2f}%",
        f"stored parameters: {p['single_total']:,} (one model per task) vs {p['multi_total']:,} (one shared model)",
        f"training time: {t['single_total']:.1f} s (all single-task runs) vs {t['multi']:.1f} s",
        *format_merges(result),
        "",
        result["verdict"],
    ]
    return "\n".join(lines)
