"""`recipe: recommended`: its settings under the config's own, and the whole recipe on the tiny backbone."""

import json

import pytest
import yaml

from multitune.catalogue import validate_config
from multitune.cli import main
from multitune.compare import Budget
from multitune.config.recipes import RECIPES, with_recipe
from tests.conftest import classification_rows, tiny_config, token_rows


def test_the_configs_own_settings_win_and_another_method_replaces_the_recipes_whole():
    data = {"training": {"steps": 7, "schedule": {"finetune_steps": 9}}, "sampling": {"name": "uniform"}}
    merged = with_recipe(data, "recommended")
    schedule = RECIPES["recommended"]["training"]["schedule"]
    assert merged["training"]["steps"] == 7
    assert merged["training"]["schedule"] == {**schedule, "finetune_steps": 9}
    assert merged["training"]["early_stopping"] == {"patience": 3, "per_task": True, "count": "own_steps"}
    assert merged["sampling"] == {"name": "uniform"}  # no temperature leaking into the uniform sampler
    assert RECIPES["recommended"]["training"]["schedule"]["finetune_steps"] == 400  # the recipe is not changed


def test_an_unknown_recipe_is_a_config_error(tmp_path, tiny_backbone):
    from multitune.errors import ConfigError

    data = tiny_config(tiny_backbone, tmp_path / "a", tmp_path / "b", tmp_path / "runs")
    data["recipe"] = "fastest"
    with pytest.raises(ConfigError) as error:
        validate_config(data)
    assert error.value.field == "recipe"


def test_converging_keeps_the_configs_per_task_early_stopping(tmp_path, tiny_backbone):
    data = tiny_config(tiny_backbone, tmp_path / "a", tmp_path / "b", tmp_path / "runs")
    data["recipe"] = "recommended"
    config = Budget(converge=True, patience=2, max_steps=30).applied(validate_config(data))
    stopping = config.training.early_stopping
    assert (stopping.patience, stopping.per_task, config.training.steps) == (2, True, 30)
    plain = Budget(converge=True, patience=2).applied(validate_config(tiny_config(tiny_backbone, "a", "b", "r")))
    assert plain.training.early_stopping.per_task is False


def test_the_recommended_recipe_runs_every_stage(tmp_path, tiny_backbone, write_jsonl, capsys):
    """Per-task early stopping in the joint stage, then per task a LoRA refinement kept only where it beats
    the shared model on validation; the saved config keeps the recipe and what it filled in."""
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    data = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=30, eval_every=2, lr=1e-6, log_every=1)
    data["recipe"] = "recommended"
    data["training"]["schedule"] = {"finetune_steps": 4, "finetune_lr": 5e-3}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped_early"] and set(metrics["stopped_tasks"]) == {"sentiment", "ner"}  # lr 1e-6 stalls
    assert metrics["steps"] < 30
    assert set(metrics["answered_by"]) == {"sentiment", "ner"}
    for name, by in metrics["answered_by"].items():
        folder = run_dir / "finetuned" / name
        assert (folder / "refinement.safetensors").exists() == (by == "refined")
        assert not (folder / "model.safetensors").exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["recipe"] == "recommended" and saved["training"]["schedule"]["refine"] == "lora"
    assert saved["training"]["schedule"]["finetune_steps"] == 4


def test_a_recipes_baseline_is_the_plain_configs_baseline(tmp_path, tiny_backbone):
    """The recipe changes the multi-task side only: its single-task baselines are the very ones (same
    settings, same cache) that the plain config's comparison trains."""
    from multitune.compare.run import _fingerprint, single_task_config

    plain = validate_config(tiny_config(tiny_backbone, tmp_path / "a", tmp_path / "b", tmp_path / "runs"))
    data = tiny_config(tiny_backbone, tmp_path / "a", tmp_path / "b", tmp_path / "runs")
    data["recipe"] = "recommended"
    recipe = validate_config(data)
    budget = Budget(converge=True, patience=2)
    for task in ("sentiment", "ner"):
        mine, theirs = (single_task_config(budget.applied(c), task, 64) for c in (recipe, plain))
        assert mine.training.schedule.name == "joint" and mine.recipe is None
        assert not mine.training.early_stopping.per_task and mine.training.early_stopping.patience == 2
        assert _fingerprint(mine, task) == _fingerprint(theirs, task)
        shown = mine.model_copy(deep=True)  # a run without a progress bar or with TensorBoard: the same baseline
        shown.training.progress, shown.training.tensorboard = False, True
        assert _fingerprint(shown, task) == _fingerprint(mine, task)
        shown.training.lr *= 2
        assert _fingerprint(shown, task) != _fingerprint(mine, task)


def test_learnable_loss_weights_that_cannot_move_are_named():
    """AdamW moves a parameter by at most about its rate per step: at 5e-5 for 240 steps uncertainty
    weighting's log-variances move by at most 0.012, so its weights stay within e^0.012 - 1 = 1.2% of equal."""
    from multitune.balancing.losses import LOSS_WEIGHTINGS
    from multitune.config import TrainingConfig
    from multitune.recipe.components import still_loss_weights

    uncertainty = LOSS_WEIGHTINGS.build("uncertainty", injected={"task_names": ["a", "b"]})
    slow = TrainingConfig(steps=240, lr=5e-5)
    warning = still_loss_weights(uncertainty, slow)
    assert warning is not None and "at most 0.012" in warning and "within 1.2% of their start" in warning
    assert still_loss_weights(uncertainty, TrainingConfig(steps=240, lr=5e-5, head_lr=1e-2)) is None  # 2.4
    assert still_loss_weights(uncertainty, TrainingConfig(steps=2000, lr=5e-5)) is None  # reach 0.1: can move
    equal = LOSS_WEIGHTINGS.build("equal", injected={"task_names": ["a", "b"]})
    assert still_loss_weights(equal, slow) is None  # nothing to learn
