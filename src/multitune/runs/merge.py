"""`multitune merge`: runs fine-tuned from one pretrained backbone (e.g. compare's single-task baselines)
merged into one backbone by a merge method of models/merging.py, each task keeping its own head, written as a
run that `evaluate`, `predict`, `serve` and `export` use like any other.

Runs with per-task LoRA adapters (one run with several tasks' adapters, or several single-task LoRA runs on
one frozen backbone) merge their adapters instead, through peft's `add_weighted_adapter`
(models/merging.py's `merge_lora_adapters`): the merged adapter is kept in peft's format under
RUN_DIR/adapter and folded into the backbone the run's weights hold.

The method's settings that `grid` names (e.g. `scaling: [0.3, 0.5, 1.0]`) are chosen on the tasks'
validation splits (the average main score), never on test; metrics.json records every candidate's
validation score, the chosen settings, and the chosen model's test scores.
"""

from __future__ import annotations

import copy
import functools
import itertools
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from multitune.catalogue import check_methods
from multitune.config import Config
from multitune.config.loading import dump_config, validate_config
from multitune.core.files import WEIGHTS_FILE, discard_folder, write_json, write_text
from multitune.errors import ConfigError
from multitune.models.assemble import LOADERS
from multitune.models.backbone import load_backbone
from multitune.models.merging import (
    MERGE_METHODS,
    MERGED,
    InputGrams,
    LayerInputs,
    LayerSums,
    add_layer_inputs,
    lora_deltas,
    merge_lora_adapters,
    merge_weights,
    task_vector_cosines,
)
from multitune.runs.evaluate import evaluate_run
from multitune.runs.layout import create_run_dir
from multitune.runs.load import load_run
from multitune.training.checkpoint import nonfinite_tensors, save_weights

# model settings that change what a fine-tuned backbone computes or started from: merged runs must share them
SAME_MODEL_SETTINGS = ("revision", "pooling", "max_length", "random_init", "trust_remote_code")


def merge_runs(
    run_dirs: Sequence[str | Path],
    method: str,
    settings: dict[str, Any] | None = None,
    grid: dict[str, list[float]] | None = None,
    output_dir: str | Path = "runs",
    name: str = "merged",
) -> Path:
    """Merge the runs' backbones with `method` (its `settings`, and each combination of `grid` tried on
    validation); returns the new run directory. Raises ConfigError when the runs are not single-model runs
    of one backbone and seed with distinct task names."""
    started = time.perf_counter()
    settings, grid = dict(settings or {}), dict(grid or {})
    for key in grid:
        if key in settings:
            raise ConfigError(f"'{key}' is given by --set and by --grid: name it once", field="--grid")
        if len(set(grid[key])) != len(grid[key]):
            raise ConfigError(f"--grid {key} lists a value twice: {grid[key]}", field="--grid")
    MERGE_METHODS.get(method, field="--method")  # an unknown method is refused before its defaults are read
    settings = {**_defaults(method), **settings}  # recorded as used, defaults included
    combos = [{**settings, **dict(zip(grid, values, strict=True))} for values in itertools.product(*grid.values())]
    for chosen in combos or [settings]:  # every setting checked before anything is loaded or written
        MERGE_METHODS.build(method, field="--method", **chosen)
    loaded = [load_run(run) for run in run_dirs]
    lora = any(config.model.peft is not None for config, *_ in loaded)
    config = _combined(loaded, [Path(run) for run in run_dirs], output_dir, name, lora)
    if lora and not hasattr(MERGE_METHODS.get(method), "peft_combination"):
        raise ConfigError(f"{method} does not merge LoRA adapters (peft has no such combination)", field="--method")
    model_config = config.model
    if lora:
        base, adapters = _lora_parts(loaded, [Path(run) for run in run_dirs], model_config.kind)
        base_state = {key: value.detach() for key, value in base.state_dict().items()}
        tuned = _lora_task_states(base, base_state, adapters)
    else:
        loader = LOADERS.get(model_config.kind, load_backbone)
        base = loader(model_config.backbone, model_config.revision, model_config.trust_remote_code, False).model
        base_state = {key: value.detach() for key, value in base.state_dict().items()}
        tuned = [model.backbone.state_dict() for _, _, model, _ in loaded]
    # what the models measured, not learned (BatchNorm's running statistics): averaged, never merged as vectors
    statistics = {name for name, _ in base.named_buffers()}
    overall, per_layer = task_vector_cosines(base_state, tuned, statistics)
    heads = {
        key: value for _, _, model, _ in loaded for key, value in model.state_dict().items() if key.startswith("heads.")
    }
    run_dir = create_run_dir(str(config.run.output_dir), config.run.name)
    try:  # a merge that fails leaves nothing behind: the folder is this call's own
        write_text(run_dir / "config.yaml", dump_config(config))
        manifest = {task: entry for _, own, _, _ in loaded for task, entry in own.items()}
        write_json(run_dir / "tasks.json", manifest)
        shutil.copytree(Path(run_dirs[0]) / "backbone", run_dir / "backbone")
        candidates = []
        best: tuple[float, dict[str, Any], dict[str, torch.Tensor]] | None = None
        layer_sums: dict[int, dict[str, LayerSums]] = {}  # RegMean's sums over the models, by rows read
        for chosen in combos or [settings]:
            merger = MERGE_METHODS.build(method, field="--method", **chosen)
            if lora:
                merged = merge_lora_adapters(copy.deepcopy(base), adapters, merger)
                from peft import get_peft_model_state_dict

                saved = get_peft_model_state_dict(merged, adapter_name=MERGED)  # SVD factors may be views: copied whole
                adapter = ({k: v.detach().contiguous().clone() for k, v in saved.items()}, merged.peft_config[MERGED])
                weights = merged.merge_and_unload().state_dict()
            elif getattr(merger, "learns", False):  # AdaMerging: coefficients learned on unlabelled validation inputs
                model, batches = _unlabelled(config, loaded, heads)
                weights, learned = merger.learn(model, base_state, tuned, batches, statistics)  # type: ignore[attr-defined]
                chosen = {**chosen, "coefficients": learned}
            elif getattr(merger, "in_order", False):  # RegMean++: block by block, on the merged blocks' outputs
                weights = _merge_in_order(merger, config, loaded, heads, base_state, tuned, statistics, run_dirs)
            elif getattr(merger, "needs_inputs", False):  # RegMean: from each model's own layer inputs
                rows = merger.rows  # type: ignore[attr-defined]
                if rows not in layer_sums:  # collected once for every setting of the grid that reads as many
                    layer_sums[rows] = {}
                    for entry, state, run in zip(loaded, tuned, run_dirs, strict=True):  # one model's Grams at a time
                        try:
                            add_layer_inputs(layer_sums[rows], _layer_inputs(entry, rows), state)
                        except ValueError as error:  # a forward through other layers than the runs before it
                            raise ConfigError(str(error), file=str(run)) from None
                weights = merger.merge(base_state, tuned, layer_sums[rows], statistics)  # type: ignore[attr-defined]
            else:
                weights = merge_weights(base_state, tuned, merger, statistics)
            state = {f"backbone.{key}": value for key, value in weights.items()}
            bad, total = nonfinite_tensors(state)
            if bad:  # a setting that overflows (a huge λ), said as a merge's fault, not a diverged training's
                message = f"the merge with settings {chosen} gives {len(bad)} of {total} tensors holding NaN"
                raise ConfigError(f"{message} or infinity (first: {bad[0]})", field="--set")
            save_weights({**state, **heads}, run_dir / WEIGHTS_FILE)
            score = evaluate_run(run_dir, "validation")["average_main_score"]
            candidates.append({"settings": chosen, "validation_average_main_score": score})
            if best is None or score > best[0]:
                best = (score, chosen, {**state, **heads})
                if lora:  # the chosen adapter, in peft's format
                    _save_adapter(*adapter, run_dir / "adapter")
        assert best is not None
        save_weights(best[2], run_dir / WEIGHTS_FILE)
        test = evaluate_run(run_dir, "test")
        metrics = {
            "tasks": test["tasks"],
            "average_main_score": test["average_main_score"],
            "merge": {
                "method": method,
                "paper": getattr(MERGE_METHODS.get(method), "paper", None),
                "settings": best[1],
                "candidates": candidates,
                "runs": [str(run) for run in run_dirs],
                "chosen_on": "validation",
                # rows and columns: the runs in order (their tasks: `task_order`)
                "task_vector_cosine": {"overall": overall, "per_layer": per_layer},
                "task_order": [list(config.tasks) for config, *_ in loaded],
            },
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        write_json(run_dir / "metrics.json", metrics)
    except BaseException:
        discard_folder(run_dir)
        raise
    return run_dir


def _defaults(method: str) -> dict[str, Any]:
    """A merge method's settings with a default value (its constructor's keyword defaults)."""
    import inspect

    parameters = MERGE_METHODS.parameters(method).values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _merged_model(config: Config, loaded: list[Any], heads: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """The merged run's model (the first run's backbone module, every run's head) and its scored tasks."""
    from multitune.models.assemble import build_model
    from multitune.runs.load import scored_tasks

    manifest = {task: entry for _, own, _, _ in loaded for task, entry in own.items()}
    tasks = scored_tasks(config, manifest)
    model = build_model(config.model, tasks, loaded[0][3])
    model.load_state_dict(heads, strict=False)
    return model, tasks


def _unlabelled(config: Config, loaded: list[Any], heads: dict[str, torch.Tensor], rows: int = 16) -> tuple[Any, Any]:
    """The merged run's model (`_merged_model`) and each task's validation inputs in batches of `rows` (their
    labels are not read): what a merge that learns its coefficients needs."""
    model, tasks = _merged_model(config, loaded, heads)
    backbone = loaded[0][3]
    batches = {
        name: _batches(task.splits["validation"], name, task, config, backbone, rows) for name, task in tasks.items()
    }
    return model, batches


def _merge_in_order(
    merger: Any,
    config: Config,
    loaded: list[Any],
    heads: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    tuned: list[dict[str, torch.Tensor]],
    statistics: set[str],
    runs: Sequence[str | Path],
) -> dict[str, torch.Tensor]:
    """RegMean++'s merge (models/merging.py): a copy of the merged run's model carries each model's weights in
    turn, with the blocks merged so far, over up to `merger.rows` of that model's tasks' training inputs."""
    model = copy.deepcopy(_merged_model(config, loaded, heads)[0]).eval()  # a copy: the runs' tensors stay intact
    inputs = [_input_batches(entry, merger.rows) for entry in loaded]

    def forward(index: int, grams: InputGrams) -> None:
        for batch in inputs[index]:
            grams.mask = batch.inputs.get("attention_mask")
            grams.run(functools.partial(model, batch))

    try:
        return merger.merge_in_order(model.backbone, base, tuned, forward, statistics)  # type: ignore[no-any-return]
    except ValueError as error:  # no blocks, or a forward through other layers than the runs before it
        raise ConfigError(str(error), file=str(runs[0])) from None


def _batches(examples: Sequence[Any], name: str, task: Any, config: Config, backbone: Any, rows: int) -> list[Any]:
    """`examples` of task `name` encoded and collated into batches of `rows`."""
    from multitune.data.collate import collate
    from multitune.data.encoding import encode

    seq2seq = config.model.kind == "seq2seq"
    encoded = encode(examples, task, backbone.tokenizer, config.model.max_length, decoder_targets=seq2seq)
    return [collate({name: encoded[start : start + rows]}, backbone.pad_id) for start in range(0, len(encoded), rows)]


def _input_batches(entry: Any, rows: int, batch_rows: int = 16) -> list[Any]:
    """Up to `rows` of each of one run's tasks' training inputs, drawn with the run's seed (labels not read),
    in batches of `batch_rows`; a streamed training split, which is not held in memory, gives its validation
    inputs instead."""
    from multitune.data.tasks import seeded_subsample
    from multitune.runs.load import scored_tasks

    config, manifest, _, backbone = entry
    batches = []
    for name, task in scored_tasks(config, manifest).items():
        train = task.splits.get("train")
        pool = train if isinstance(train, list) and train else task.splits["validation"]
        drawn = seeded_subsample(pool, rows, config.run.seed)
        batches += _batches(drawn, name, task, config, backbone, batch_rows)
    return batches


def _layer_inputs(entry: Any, rows: int) -> dict[str, LayerInputs]:
    """One run's linear-layer input Gram matrices (RegMean): its own model's forward over `_input_batches`."""
    model = entry[2]
    was_training = model.training
    model.eval()
    with InputGrams(model.backbone) as grams, torch.no_grad():
        for batch in _input_batches(entry, rows):
            grams.mask = batch.inputs.get("attention_mask")
            model(batch)
    model.train(was_training)
    return grams.layers


def _save_adapter(state: dict[str, torch.Tensor], config: Any, folder: Path) -> None:
    """A LoRA adapter in peft's format (adapter_model.safetensors and adapter_config.json) in `folder`."""
    from safetensors.torch import save_file

    from multitune.core.files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(state, str(tmp)))
    config.save_pretrained(str(folder))


def _lora_parts(loaded: list[Any], runs: Sequence[Path], kind: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """The frozen backbone the LoRA runs share (a fresh module with their base weights) and each task's
    adapter folder. Raises ConfigError when the runs' frozen weights differ."""
    from multitune.runs.load import rebuilt_backbone

    base_state: dict[str, torch.Tensor] | None = None
    adapters: dict[str, str] = {}
    for (config, _, model, _), run in zip(loaded, runs, strict=True):
        state = {
            key.replace(".base_layer", ""): value
            for key, value in model.backbone.state_dict().items()
            if "lora_" not in key
        }
        if base_state is None:
            base_state = state
        elif state.keys() != base_state.keys() or any(not torch.equal(state[k], base_state[k]) for k in state):
            raise ConfigError(
                "its frozen backbone differs from the first run's: the adapters do not share a base", file=str(run)
            )
        for task in config.tasks:
            adapters[task] = str(run / "adapters" / task)
    assert base_state is not None
    base = rebuilt_backbone(runs[0] / "backbone", kind).model
    base.load_state_dict(base_state)
    return base.eval(), adapters


def _lora_task_states(
    base: torch.nn.Module, base_state: dict[str, torch.Tensor], adapters: dict[str, str]
) -> list[dict[str, torch.Tensor]]:
    """Each task's backbone as its adapter changes it (θ_0 + B·A·α/r on the adapted tensors), for the task
    vector cosines."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    deltas = lora_deltas(model, names)
    return [
        {key: value + delta[key] if key in delta else value for key, value in base_state.items()} for delta in deltas
    ]


def _combined(loaded: list[Any], runs: Sequence[Path], output_dir: str | Path, name: str, lora: bool) -> Config:
    """One config holding every run's tasks, the first run's model (without adapters: the merged run is one
    backbone); the runs must fit together."""
    first = loaded[0][0]
    tasks = sum(len(config.tasks) for config, *_ in loaded)
    if (len(loaded) if not lora else tasks) < 2:
        raise ConfigError(
            "name at least two runs to merge" if not lora else "a LoRA merge needs two tasks' adapters", field="runs"
        )
    seen: dict[str, Path] = {}
    for (config, _, model, _), run in zip(loaded, runs, strict=True):
        model_config = config.model
        if (model_config.backbone, model_config.kind) != (first.model.backbone, first.model.kind):
            raise ConfigError(f"not fine-tuned from {first.model.backbone}: {model_config.backbone}", file=str(run))
        for setting in SAME_MODEL_SETTINGS:  # what the backbone computes, or starts from, must be the same
            own, want = getattr(model_config, setting), getattr(first.model, setting)
            if own != want:
                raise ConfigError(
                    f"model.{setting} is {own!r} here and {want!r} in {runs[0]}: the runs must share it to merge",
                    file=str(run),
                    field=f"model.{setting}",
                )
        peft = model_config.peft
        if lora and (peft is None or peft.method != "lora" or peft.shared or peft.train_backbone):
            message = "a LoRA merge takes runs whose every task has its own LoRA adapter on a frozen backbone"
            raise ConfigError(message + " (no shared adapter, no train_backbone)", file=str(run))
        if (not lora and peft is not None) or model.architecture != "hard" or model_config.init_from is not None:
            message = "only fully fine-tuned hard-sharing runs, or per-task LoRA runs, merge (no init_from)"
            raise ConfigError(message, file=str(run))
        if config.run.seed != first.run.seed:
            raise ConfigError(
                f"seed {config.run.seed}, not {first.run.seed}: validation rows are carved by the seed, so the runs "
                "must share it for the choice on validation to see no training row",
                file=str(run),
            )
        for task in config.tasks:
            if task in seen:
                raise ConfigError(f"task '{task}' is in two runs ({seen[task]} and {run})", file=str(run))
            seen[task] = run
    data = first.model_dump(mode="json")
    data["model"]["peft"] = None
    data["tasks"] = {
        task: spec for config, *_ in loaded for task, spec in config.model_dump(mode="json")["tasks"].items()
    }
    data["run"].update(name=name, output_dir=str(output_dir), resume=None)
    data["recipe"] = None
    data["training"]["schedule"] = {"name": "joint"}
    merged = validate_config(data)  # a bad --name is a one-line error, as run.name is in a config
    check_methods(merged)
    return merged
