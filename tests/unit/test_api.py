"""The Python API (api/): your own nn.Module backbone, in-memory tasks, multitune's loop and balancers."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from multitune import EarlyStopping, Task, fit
from multitune.data.samplers import SAMPLERS
from multitune.errors import ConfigError, DataError
from tests.conftest import REPO

QUIET: dict[str, Any] = {"progress": False, "eval_every": 5, "batch_size": 8}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and spares a shared machine
    yield
    torch.set_num_threads(threads)


def synthetic(n: int = 60, seed: int = 0, width: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs [n, width]; an easy class (sign of the first feature) and an easy target (twice the second)."""
    x = np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)
    return x, np.where(x[:, 0] > 0, "pos", "neg"), 2.0 * x[:, 1]


def synthetic_tasks(n: int = 60) -> list[Task]:
    x, sign, target = synthetic(n)
    xt, sign_t, target_t = synthetic(30, seed=1)
    return [
        Task("sign", "classification", (x, sign), test=(xt, sign_t)),
        Task("target", "regression", (x, target), test=(xt, target_t)),
    ]


def mlp(width: int = 6, hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU())


def test_digits_three_tasks_learn_and_evaluate_predict_have_the_metrics_shape() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, target = digits.images[:, None] / 16.0, digits.target  # float64 [N, 1, 8, 8]: converted
    train, validation, test = slice(0, 900), slice(900, 1100), slice(1100, 1400)

    def split(rows: slice, labels: Any) -> tuple[Any, Any]:
        return images[rows], labels[rows]

    parity = np.where(target % 2 == 0, "even", "odd")
    tasks = [
        Task("digit", "classification", split(train, target), split(validation, target), split(test, target)),
        Task("parity", "classification", split(train, parity), split(validation, parity), split(test, parity)),
        Task("value", "regression", split(train, target * 1.0), split(validation, target * 1.0)),  # no test
    ]
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
    fitted = fit(backbone, tasks, steps=300, batch_size=32, lr=3e-3, eval_every=100, progress=False)
    result = fitted.evaluate("test")
    assert set(result) == {"tasks", "average_main_score"}
    digit = result["tasks"]["digit"]
    assert set(digit) == {"split", "n", "metrics", "main_metric", "main_score", "higher_is_better"}
    assert digit["split"] == "test" and digit["n"] == 300 and digit["main_metric"] == "accuracy"
    assert digit["main_score"] > 0.6  # chance is 0.1
    assert result["tasks"]["parity"]["main_score"] > 0.7
    assert result["tasks"]["value"]["split"] == "validation"  # no test split: scored on validation
    assert fitted.metrics["tasks"] == result["tasks"] and fitted.metrics["steps"] == 300
    assert sum(fitted.metrics["task_rows"].values()) == 300 * 32
    assert [h["step"] for h in fitted.history if "validation" in h] == [100, 200, 300]

    predictions = fitted.predict("digit", images[:5])
    assert len(predictions) == 5 and all(
        type(p["prediction"]) is int and 0 <= p["prediction"] < 10 for p in predictions
    )
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    assert {p["prediction"] for p in fitted.predict("parity", images[:5])} <= {"even", "odd"}
    values = fitted.predict("value", torch.tensor(images[:3], dtype=torch.float32))
    assert len(values) == 3 and all(isinstance(v["prediction"], float) for v in values)
    assert "digit" in fitted.table("test")


def sampler_params(name: str) -> dict[str, Any]:
    return {"manual": {"probabilities": {"sign": 0.3, "target": 0.7}}, "temperature": {"temperature": 3.0}}.get(
        name, {}
    )


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_trains(name: str) -> None:
    fitted = fit(mlp(), synthetic_tasks(), steps=6, sampling={"name": name, **sampler_params(name)}, **QUIET)
    assert fitted.metrics["steps"] == 6 and set(fitted.metrics["tasks"]) == {"sign", "target"}


@pytest.mark.parametrize("source", ["representation", "parameters"])
@pytest.mark.parametrize("method", ["pcgrad", "mgda"])
def test_gradient_aggregation_from_either_source(method: str, source: str) -> None:
    fitted = fit(
        mlp(),
        synthetic_tasks(),
        steps=6,
        sampling="all_tasks",
        loss_weighting="uncertainty",  # a weighting with learnable parameters of its own
        gradient_aggregation={"name": method, "source": source},
        **QUIET,
    )
    assert fitted.metrics["skipped_steps"] == 0 and fitted.metrics["task_steps"] == {"sign": 6, "target": 6}


def test_an_easy_synthetic_task_is_learned_with_mixed_batches_and_early_stopping() -> None:
    fitted = fit(
        mlp(),
        synthetic_tasks(200),
        steps=200,
        lr=1e-2,
        mixed_batches=True,
        early_stopping=EarlyStopping(patience=20),
        **{**QUIET, "eval_every": 20},
    )
    scores = fitted.evaluate("test")["tasks"]
    assert scores["sign"]["main_score"] > 0.85 and scores["target"]["main_score"] > 0.8


def test_mmoe_architecture_and_a_dict_input_with_its_own_mask() -> None:
    class Tokens(nn.Module):
        """Token ids [B, L] (+ mask) -> token features [B, L, 8]."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(12, 8)

        def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
            return self.embed(ids) * attention_mask.unsqueeze(-1)

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 12, size=(40, 5))
    mask = np.ones((40, 5), dtype=np.int64)
    mask[:, 4] = 0
    tags = np.where(ids > 6, 1, 0)
    tags[:, 4] = -100  # an unlabelled (padding) position
    inputs = {"ids": ids, "attention_mask": mask}
    tasks = [
        Task("tagging", "token_classification", (inputs, tags), labels=["low", "high"], metrics=["token_accuracy"]),
        Task("any_high", "classification", (inputs, (tags == 1).any(1).astype(int))),
    ]
    fitted = fit(Tokens(), tasks, steps=8, architecture={"name": "mmoe", "experts": 2}, **QUIET)
    tagged = fitted.predict("tagging", {"ids": ids[:2], "attention_mask": mask[:2]})
    assert [len(p["prediction"]) for p in tagged] == [4, 4]  # the masked position is left out
    assert set(fitted.evaluate("validation")["tasks"]) == {"tagging", "any_high"}


def test_output_dir_holds_weights_and_metrics(tmp_path) -> None:
    fitted = fit(mlp(), synthetic_tasks(), steps=5, output_dir=tmp_path, name="api", **QUIET)
    run = tmp_path / "api"
    assert fitted.run_dir == run
    for name in ("model.safetensors", "metrics.json", "tasks.json", "history.jsonl"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tasks"] == fitted.metrics["tasks"]
    assert (
        fit(mlp(), synthetic_tasks(), steps=1, output_dir=tmp_path, name="api", **QUIET).run_dir == tmp_path / "api-2"
    )


@pytest.mark.parametrize("refine", ["full", "lora"])
def test_fit_refines_each_task_and_answers_with_the_kept_predictor(tmp_path, refine: str) -> None:
    """schedule two_stage in fit: the shared model's stage, then each task refined alone; evaluate and
    predict use the refined predictor of a task that kept one, the shared model elsewhere; the run folder
    holds what the YAML route writes (a LoRA refinement: adapter and head only)."""
    schedule = {"name": "two_stage", "finetune_steps": 10, "finetune_lr": 1e-2, "refine": refine, "refine_r": 2}
    fitted = fit(mlp(), synthetic_tasks(), steps=10, schedule=schedule, output_dir=tmp_path, name="r", **QUIET)
    metrics = fitted.metrics
    assert set(metrics["answered_by"]) == {"sign", "target"} and metrics["finetune_seconds"] > 0
    assert set(metrics["multi_task_stage"]["tasks"]) == {"sign", "target"}
    assert set(fitted.refined) == {n for n, by in metrics["answered_by"].items() if by == "refined"}
    assert fitted.evaluate("test")["tasks"] == metrics["tasks"]  # the answering predictors, as trained
    x, _, _ = synthetic(5, seed=3)
    for name, own in fitted.refined.items():
        want = own(collate_for(fitted, name, x))[name]
        shared = fitted.model(collate_for(fitted, name, x))[name]
        assert not torch.allclose(want, shared)  # the refined predictor differs from the shared model
        got = [p["raw" if "raw" in p else "prediction"] for p in fitted.predict(name, x)]
        if name == "target":
            scale = fitted.tasks[name]
            expected = (want.squeeze(-1) * scale.target_std + scale.target_mean).tolist()
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
        folder = tmp_path / "r" / "finetuned" / name
        stored = "refinement.safetensors" if refine == "lora" else "model.safetensors"
        assert (folder / stored).exists() and len(list(folder.glob("*.safetensors"))) == 1


def collate_for(fitted: Any, name: str, inputs: np.ndarray) -> Any:
    from multitune.api.backbone import collate_tensors
    from multitune.api.tensors import Rows, as_inputs

    rows = Rows(as_inputs(inputs, "x"), None, [])
    with torch.no_grad():
        return collate_tensors({name: (rows, torch.arange(len(inputs)))}, fitted.length)


def test_fit_takes_the_recommended_recipe() -> None:
    fitted = fit(mlp(), synthetic_tasks(), steps=10, recipe="recommended", **QUIET)
    assert set(fitted.metrics["answered_by"]) == {"sign", "target"}
    with pytest.raises(ConfigError, match="unknown recipe"):
        fit(mlp(), synthetic_tasks(), steps=10, recipe="fastest", **QUIET)
    with pytest.raises(ConfigError, match="joint or the two_stage"):
        fit(mlp(), synthetic_tasks(), steps=10, schedule={"name": "reptile"}, **QUIET)


def test_no_run_directory_by_default(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    fit(mlp(), synthetic_tasks(), steps=2, **QUIET)
    assert list(tmp_path.iterdir()) == []


x, sign, target = synthetic()


class Wrong(nn.Module):
    """Returns feature maps [B, 2, 3, 1] instead of vectors."""

    def forward(self, inputs: Tensor) -> Tensor:
        return inputs.view(-1, 2, 3, 1)


BAD: list[tuple[str, Any, Any, type[Exception], str]] = [
    ("length", mlp, [Task("a", "classification", (x, sign[:-1]))], DataError, "60 inputs but 59 labels"),
    ("type", mlp, [Task("a", "classifier", (x, sign))], ConfigError, "unknown type 'classifier'"),
    ("range", mlp, [Task("a", "classification", (x, np.arange(60) % 3), labels=2)], DataError, "out of range"),
    ("label", mlp, [Task("a", "classification", (x, sign), labels=["pos", "other"])], DataError, "unknown label"),
    ("nan", mlp, [Task("a", "regression", (x, target * np.nan))], DataError, "finite numbers"),
    ("overflow", mlp, [Task("a", "regression", (x, np.full(60, 1e308)))], DataError, "within ±1e+15"),
    ("features", Wrong, [Task("a", "classification", (x, sign))], DataError, "features of shape [2, 2, 3, 1]"),
    ("backbone", lambda: nn.Linear(5, 4), [Task("a", "classification", (x, sign))], DataError, "backbone failed"),
    ("not a module", lambda: "resnet", [Task("a", "classification", (x, sign))], ConfigError, "torch.nn.Module"),
    (
        "shapes",
        mlp,
        [Task("a", "classification", (x, sign)), Task("b", "classification", (x[:, :4], sign))],
        DataError,
        "one backbone reads every task's rows",
    ),
    ("duplicate", mlp, [Task("a", "regression", (x, target))] * 2, ConfigError, "unique"),
    ("metric", mlp, [Task("a", "classification", (x, sign), metrics=["acc"])], ConfigError, "did you mean"),
    ("f1", mlp, [Task("a", "classification", (x, sign), metrics=["f1"])], ConfigError, "positive_label"),
    ("name", mlp, [Task("a b", "regression", (x, target))], ConfigError, "task name"),
    (
        "token",
        mlp,
        [Task("a", "token_classification", (x, np.zeros((60, 6), int)), metrics=["token_accuracy"])],
        DataError,
        "token-level",
    ),
    ("one class", mlp, [Task("a", "classification", (x, np.zeros(60, int)))], DataError, "only one label in train"),
    ("one id seen", mlp, [Task("a", "classification", (x, np.ones(60, int)))], DataError, "only one label in train"),
    ("one string", mlp, [Task("a", "classification", (x, np.full(60, "pos")))], DataError, "train: ['pos']"),
    (
        "one label",
        mlp,
        [Task("a", "classification", (x, np.array(["A"] * 60)), labels=["A"])],
        ConfigError,
        "needs at least two labels",
    ),
    (
        "one class by number",
        mlp,
        [Task("a", "classification", (x, np.zeros(60, int)), labels=1)],
        ConfigError,
        "at least two classes",
    ),
    (
        "tag ids for entity_f1",
        mlp,
        [Task("a", "token_classification", (x, (x > 0).astype(int)))],
        ConfigError,
        "task 'a': its metric entity_f1 reads tags as IOB2",
    ),
    (
        "tag names for entity_f1",
        mlp,
        [Task("a", "token_classification", (x, (x > 0).astype(int)), labels=["low", "high"])],
        ConfigError,
        "tag 'low' is not; give labels in IOB2 or choose metrics=['token_accuracy']",
    ),
]


@pytest.mark.parametrize(("case", "backbone", "tasks", "error", "text"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_multitune_error(case, backbone, tasks, error, text) -> None:
    with pytest.raises(error, match=re.escape(text)):
        fit(backbone(), tasks, steps=2, **QUIET)


@pytest.mark.parametrize(
    ("settings", "text"),
    [
        ({"sampling": "temprature"}, "did you mean 'temperature'"),
        ({"sampling": {"name": "temperature", "tau": 2}}, "unknown parameter"),
        ({"gradient_aggregation": "pcgrad"}, "feeds one task per step"),
        ({"gradient_aggregation": {"name": "graddrop", "source": "parameters"}}, "only for the representation"),
        ({"steps": 0}, "greater than or equal to 1"),
        ({"architecture": "hybrid"}, "BERT-style encoder"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict[str, Any], text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        fit(mlp(), synthetic_tasks(), **{**QUIET, "steps": 2, **settings})


def test_predict_checks_the_task_and_the_inputs() -> None:
    fitted = fit(mlp(), synthetic_tasks(), steps=2, **QUIET)
    with pytest.raises(ConfigError, match="no task 'nope'"):
        fitted.predict("nope", x)
    with pytest.raises(DataError, match="trained on inputs \\[6\\] float32"):
        fitted.predict("sign", x[:, :3])


@pytest.mark.slow
def test_the_digits_example_runs_offline() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_multitask.py"), "--steps", "150"],  # a sixth of its run
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["task", "train", "rows", "seen"]
    scores = {line.split()[0]: float(line.split()[4]) for line in lines[1:4]}
    assert scores["digit"] > 0.8 and scores["parity"] > 0.9 and scores["value"] > 0.8


@pytest.mark.slow
def test_the_bilstm_example_trains_a_model_from_scratch_on_two_tasks() -> None:
    sst2 = REPO.parent / "shared" / "data" / "sst2"
    if not (sst2 / "train_full.tsv").is_file():
        pytest.skip("the shared data folder (SST-2) is not beside the project")
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "bilstm_multitask.py"), "--steps", "300", "--sst2", str(sst2)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:3]}
    assert set(rows) == {"sentiment", "topic"}
    assert float(rows["sentiment"][2]) > 0.6 and float(rows["topic"][2]) > 0.6  # chance: 0.5 and about 0.2


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [[], ["--recipe", "recommended"]])
def test_the_digits_example_compares_over_seeds_as_compare_does(recipe: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_multitask.py"), "--steps", "60", "--seeds", "1,2", *recipe],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "| task | metric | single-task | multi-task | change | verdict |" in out and "Seeds: 1, 2" in out
    rows = [line for line in out.splitlines() if line.startswith(("| digit", "| parity", "| value"))]
    assert len(rows) == 3 and all(" ± " in row for row in rows)
    verdicts = {line.split(":")[0]: line.split(": ")[1].split(" (")[0] for line in out.splitlines()[-4:-1]}
    assert set(verdicts) == {"digit", "parity", "value"}
    assert set(verdicts.values()) <= {"gain", "loss", "within noise", "equal"}
    assert "(per seed: " in out
    if recipe:  # baselines to convergence; the joint side stores the shared model and the kept refinements
        assert "budget: each side trains to convergence" in out


LABEL_KINDS = [  # (the train labels a user gives, `labels=`, the type predict answers with, the classes)
    (lambda ids: ids.astype(np.int64), None, int, {0, 1, 2}),
    (lambda ids: ids.astype(np.uint8), None, int, {0, 1, 2}),
    (lambda ids: torch.tensor(ids, dtype=torch.long), None, int, {0, 1, 2}),
    (lambda ids: [int(i) for i in ids], 3, int, {0, 1, 2}),
    (lambda ids: ids.astype(np.float32), None, float, {0.0, 1.0, 2.0}),
    (lambda ids: np.array(["a", "b", "c"])[ids], None, str, {"a", "b", "c"}),
    (lambda ids: ids, ["low", "mid", "high"], str, {"low", "mid", "high"}),  # named classes: names
]


@pytest.mark.parametrize("kind", range(len(LABEL_KINDS)))
def test_predictions_are_the_classes_as_the_user_gave_them(kind: int) -> None:
    convert, names, answer, classes = LABEL_KINDS[kind]
    x = np.random.default_rng(0).normal(size=(48, 6)).astype(np.float32)
    ids = np.digitize(x[:, 0], [-0.4, 0.4])  # three classes by the first feature
    task = Task("cls", "classification", (x, convert(ids)), labels=names)
    fitted = fit(mlp(), [task], steps=3, **QUIET)
    predicted = fitted.predict("cls", x[:12])
    assert all(type(p["prediction"]) is answer and p["prediction"] in classes for p in predicted)
    assert all(set(p["probabilities"]) == classes for p in predicted)
    assert all(max(p["probabilities"], key=p["probabilities"].get) == p["prediction"] for p in predicted)


def test_bool_labels_come_back_as_bools_and_tag_ids_as_ids() -> None:
    x = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    fitted = fit(mlp(), [Task("flag", "classification", (x, x[:, 0] > 0))], steps=2, **QUIET)
    assert {type(p["prediction"]) for p in fitted.predict("flag", x[:8])} == {bool}
    tokens = torch.randn(40, 5, 6)
    tags = (tokens[..., 0] > 0).long()
    tags[:, -1] = -100  # an unlabelled position
    backbone = nn.Linear(6, 8)
    task = Task("tags", "token_classification", (tokens, tags), metrics=["token_accuracy"])
    tagged = fit(backbone, [task], steps=2, **QUIET)
    rows = tagged.predict("tags", tokens[:4])
    assert all(len(r["prediction"]) == 5 and {type(t) for t in r["prediction"]} == {int} for r in rows)
    assert all(set(r["prediction"]) <= {0, 1} for r in rows)


def test_regression_predictions_are_held_to_the_training_range_as_predict_and_serve_hold_them() -> None:
    x, _, target = synthetic()
    fitted = fit(mlp(), [Task("target", "regression", (x, target))], steps=20, **QUIET)
    low, high = float(target.min()), float(target.max())  # computed from the data, not from the model
    far = np.concatenate([x[:2] * 50.0, x[:2]])  # inputs far outside the data push the raw outputs out of range
    predictions = fitted.predict("target", far)
    raw = [p["raw"] for p in predictions]
    assert any(r < low or r > high for r in raw)
    assert [p["prediction"] for p in predictions] == [min(max(r, low), high) for r in raw]


FLOAT_ARGUMENTS = ["lr", "head_lr", "weight_decay", "warmup_ratio", "max_grad_norm", "dropout"]
TASK_FLOATS = ["sampling_weight", "loss_weight", "validation_fraction"]


@settings(max_examples=30, deadline=None)
@given(
    where=st.sampled_from([*FLOAT_ARGUMENTS, *(f"task.{key}" for key in TASK_FLOATS), "early_stopping.min_delta"]),
    value=st.one_of(st.sampled_from([math.inf, -math.inf, math.nan]), st.floats(min_value=3.5e38, max_value=1e308)),
)
def test_a_float_argument_out_of_float32s_range_is_refused_before_training(where: str, value: float) -> None:
    """As the YAML route refuses `lr: .inf`: any float argument (and a task's own) that is not a finite float32."""
    tasks = synthetic_tasks()
    arguments: dict[str, Any] = {**QUIET, "steps": 2}
    if where.startswith("task."):
        key = where.removeprefix("task.")
        tasks[0] = dataclasses.replace(tasks[0], **{key: value})
        field = f"tasks.sign.{key}"
    elif where == "early_stopping.min_delta":
        arguments["early_stopping"] = EarlyStopping(patience=2, min_delta=value)
        field = where
    else:
        arguments[where] = value
        field = where
    with pytest.raises(ConfigError, match=re.escape(f"field '{field}': must be a finite number")):
        fit(mlp(), tasks, **arguments)


def test_tag_ids_named_in_iob2_train_with_entity_f1() -> None:
    """The refusal of tag ids under entity_f1 is about their names: ids named O / B-ent score as entities."""
    tokens = torch.randn(40, 5, 6)
    tags = (tokens[..., 0] > 0).long()
    fitted = fit(
        nn.Linear(6, 8), [Task("t", "token_classification", (tokens, tags), labels=["O", "B-ent"])], steps=2, **QUIET
    )
    result = fitted.evaluate("validation")["tasks"]["t"]
    assert result["main_metric"] == "entity_f1" and 0.0 <= result["main_score"] <= 1.0


def _digits_example() -> Any:
    """examples/digits_multitask.py as a module (it trains nothing on import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_multitask", REPO / "examples" / "digits_multitask.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ablation_table_shows_each_variants_mean_scores_delta_m_and_cost_ratios() -> None:
    """Two seeds, two tasks, by hand: digit single 0.8 and 0.9, multi 0.88 and 0.9 -> relative changes +10%
    and 0%; value (lower is better) single 2.0, multi 1.0 and 3.0 -> +50% and -50%. Δm per seed: +30% and
    -25%: mean +2.5, sample standard deviation 38.89. Stored 50/100 and 30/100 -> 0.40x; time 10/20 and
    30/20 -> 1.00x."""
    example = _digits_example()

    def result(seed: int, digit: tuple[float, float], value: tuple[float, float], stored: int, seconds: float):
        tasks = {
            "digit": {"single": digit[0], "multi": digit[1], "metric": "accuracy", "higher_is_better": True},
            "value": {"single": value[0], "multi": value[1], "metric": "mse", "higher_is_better": False},
        }
        return example.comparison_row(tasks, stored, 100, seconds, 20.0, seed)

    runs = [result(1, (0.8, 0.88), (2.0, 1.0), 50, 10.0), result(2, (0.9, 0.9), (2.0, 3.0), 30, 30.0)]
    table = example.format_ablation({"recipe": runs}, [1, 2])
    lines = table.splitlines()
    assert lines[0] == "| variant | digit | value | Δm (%) | stored | time |"
    assert lines[2] == "| one model per task | 0.8500 | 2.0000 | 0 | 1 | 1 |"
    assert lines[3] == "| recipe | 0.8900 | 2.0000 | +2.50 ± 38.89 | 0.40x | 1.00x |"


@pytest.mark.slow
def test_the_digits_example_ablation_prints_the_recipe_without_each_stage() -> None:
    options = ["--steps", "30", "--seeds", "1", "--recipe", "recommended", "--ablation"]
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_multitask.py"), *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ")[0].lstrip("| ") for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "one model per task",
        "recipe",
        "without refinement",
        "without per-task early stopping",
        "without temperature sampling",
        "without every stage",
    ]
    alone = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_multitask.py"), "--ablation"], capture_output=True, text=True
    )
    assert alone.returncode == 2 and "--ablation takes --seeds and --recipe" in alone.stderr


@pytest.mark.parametrize("labels", [["a"] * 10 + ["b"] * 9 + ["c"], [0] * 10 + [1] * 9 + [2]])
def test_a_class_held_out_into_validation_is_still_a_class(labels):
    """As the YAML route: the classes are those of the whole train split given, so the one row of class c that
    the seeded hold-out puts in validation is scored, not refused as unknown."""
    from multitune.api.tensors import prepare_task

    held = []
    for seed in range(40):
        task = prepare_task(Task("t", "classification", (np.zeros((20, 4)), labels)), seed)
        if 2 in task.splits["validation"].labels.tolist():
            held.append(seed)
            assert task.labels == ["a", "b", "c"] if isinstance(labels[0], str) else ["0", "1", "2"]
            assert 2 not in task.splits["train"].labels.tolist()
    assert held  # 2 of 20 rows are held out: some seed of 40 holds out the one row of c
