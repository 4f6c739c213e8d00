"""Schedules (sequential, two-stage, Reptile) and early stopping, on the tiny backbone."""

import json

import pytest
import torch
import yaml

from multitune.catalogue import validate_config
from multitune.cli import main
from multitune.core.history import read_history
from multitune.errors import ConfigError
from multitune.training.schedules import Reptile
from tests.conftest import classification_rows, tiny_config, token_rows


@pytest.fixture
def run_with(tmp_path, tiny_backbone, write_jsonl):
    def run(training=None, **top):
        a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
        data = tiny_config(tiny_backbone, a, b, tmp_path / "runs", log_every=1, **(training or {}))
        data.update(top)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        assert main(["train", str(path)]) == 0
        run_dir = tmp_path / "runs" / "tiny"
        history = read_history(run_dir / "history.jsonl")
        return run_dir, json.loads((run_dir / "metrics.json").read_text()), history

    return run


def test_sequential_trains_the_tasks_in_the_given_order(run_with):
    _, metrics, history = run_with({"steps": 8, "schedule": {"name": "sequential", "order": ["ner", "sentiment"]}})
    assert metrics["task_steps"] == {"ner": 4, "sentiment": 4}
    current = [max(h["probabilities"], key=h["probabilities"].get) for h in history if "probabilities" in h]
    assert current == ["ner"] * 3 + ["sentiment"] * 5  # logged after steps 1..8; stage 2 starts at step 5


def test_reptile_trains_blocks_of_one_task(run_with):
    _, metrics, _ = run_with({"steps": 12, "schedule": {"name": "reptile", "inner_steps": 3, "meta_lr": 0.5}})
    assert all(n % 3 == 0 for n in metrics["task_steps"].values())
    assert sum(metrics["task_steps"].values()) == 12


def test_reptile_meta_update_interpolates_between_start_and_inner_weights():
    model = torch.nn.Linear(3, 1)
    reptile = Reptile(model, inner_steps=2, meta_lr=0.25)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        reptile.before_step(step)
        optimizer.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        optimizer.step()
        if step == 0:
            saved = reptile.state_dict()
            assert torch.equal(saved["start"][0], start[0])
        inner = [p.detach().clone() for p in model.parameters()]
        reptile.after_step(step)
    for p, p0, p1 in zip(model.parameters(), start, inner, strict=True):
        assert torch.allclose(p, p0 + 0.25 * (p1 - p0))


def test_two_stage_fine_tunes_a_copy_per_task_and_evaluates_with_it(run_with, capsys):
    run_dir, metrics, history = run_with(
        {"steps": 6, "schedule": {"name": "two_stage", "finetune_steps": 4, "finetune_lr": 5e-3}}
    )
    assert set(metrics["multi_task_stage"]["tasks"]) == {"sentiment", "ner"}
    assert metrics["finetune_seconds"] > 0
    for name in ("sentiment", "ner"):
        assert (run_dir / "finetuned" / name / "model.safetensors").exists()
    assert {h["task"] for h in history if h.get("stage") == "finetune"} == {"sentiment", "ner"}
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    again = json.loads((run_dir / "evaluation_test.json").read_text())
    for name in ("sentiment", "ner"):
        assert again["tasks"][name]["metrics"] == metrics["tasks"][name]["metrics"]


@pytest.mark.parametrize("refine", ["full", "lora"])
@pytest.mark.parametrize("finetune_lr", [1e-12, 5e-3])
def test_two_stage_keeps_per_task_the_predictor_better_on_validation(run_with, finetune_lr, refine, capsys):
    """schedule.keep best: a refined copy is kept only where its validation score beats the shared model's;
    the shared model answers the other tasks, in evaluate, predict and serve alike."""
    from multitune.runs.load import refined
    from multitune.serving.engine import Engine

    schedule = {"name": "two_stage", "finetune_steps": 4, "finetune_lr": finetune_lr, "keep": "best", "refine": refine}
    run_dir, metrics, history = run_with({"steps": 6, "eval_every": 2, "schedule": schedule})
    answered = metrics["answered_by"]
    assert set(answered) == {"sentiment", "ner"}
    decisions = {h["task"]: h["validation_scores"] for h in history if h.get("kept") == "shared"}
    for name, by in answered.items():
        assert (refined(run_dir, name) is not None) == (by == "refined")
        if by == "shared":  # not better on validation: a tie counts for the shared model
            assert decisions[name]["refined"] <= decisions[name]["shared"]
            assert metrics["tasks"][name] == metrics["multi_task_stage"]["tasks"][name]
    if finetune_lr == 1e-12:  # the copies barely move from the shared weights: never strictly better
        assert set(answered.values()) == {"shared"}
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    again = json.loads((run_dir / "evaluation_test.json").read_text())
    for name in ("sentiment", "ner"):
        assert again["tasks"][name]["metrics"] == metrics["tasks"][name]["metrics"]
    engine = Engine(run_dir)
    shared = [name for name, by in answered.items() if by == "shared"]
    assert len({engine.model_of[name] for name in shared}) <= 1
    assert len(engine.models) == len(set(engine.model_of.values()))


def test_two_stage_lora_refinement_stores_an_adapter_and_head_that_loading_merges(run_with, capsys):
    """schedule.refine lora: each task stores a LoRA adapter and its head, not a model; evaluate, predict and
    serve answer with W + (alpha/r)·B·A, computed here by hand from the stored matrices."""
    from safetensors.torch import load_file

    from multitune.runs.load import load_refined, load_run
    from multitune.serving.engine import Engine

    schedule = {"name": "two_stage", "finetune_steps": 4, "finetune_lr": 5e-3, "refine": "lora", "refine_r": 2}
    run_dir, metrics, _ = run_with({"steps": 6, "schedule": schedule})
    shared = load_file(str(run_dir / "model.safetensors"))
    for name in ("sentiment", "ner"):
        folder = run_dir / "finetuned" / name
        assert not (folder / "model.safetensors").exists()
        stored = load_file(str(folder / "refinement.safetensors"))
        assert stored and all("lora_" in k or k.startswith(f"heads.{name}.") for k in stored)
        assert any(k.startswith(f"heads.{name}.") for k in stored)
        assert sum(v.numel() for v in stored.values()) < 0.2 * sum(v.numel() for v in shared.values())
        assert json.loads((folder / "refinement.json").read_text())["r"] == 2
    key = "backbone.encoder.layer.0.attention.self.query"
    stored = load_file(str(run_dir / "finetuned" / "ner" / "refinement.safetensors"))
    a, b = stored[f"{key}.lora_A.refine.weight"], stored[f"{key}.lora_B.refine.weight"]  # [r, in], [out, r]
    assert a.shape[0] == 2 and b.shape[1] == 2 and b.abs().sum() > 0  # B starts at 0: it trained
    expected = shared[f"{key}.weight"] + (4 / 2) * b @ a  # alpha = 2r
    _, _, model, _ = load_run(run_dir)
    assert load_refined(model, run_dir, "ner")
    assert torch.allclose(model.state_dict()[f"{key}.weight"], expected, atol=1e-6)
    heads = [k for k in stored if k.startswith("heads.ner.")]
    assert heads and all(torch.equal(model.state_dict()[k], stored[k]) for k in heads)
    engine = Engine(run_dir)
    served = engine.models[engine.model_of["ner"]].state_dict()[f"{key}.weight"]
    assert torch.allclose(served, expected, atol=1e-6)
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    again = json.loads((run_dir / "evaluation_test.json").read_text())
    for name in ("sentiment", "ner"):
        assert again["tasks"][name]["metrics"] == metrics["tasks"][name]["metrics"]
    (run_dir / "finetuned" / "ner" / "refinement.json").write_text("{", encoding="utf-8")
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 2
    assert "refinement.json" in capsys.readouterr().err


def test_a_lora_refinement_of_the_top_blocks_adapts_only_them_and_backpropagates_no_lower(run_with, tiny_backbone):
    """refine_layers: 1 on the two-layer tiny BERT: the adapter holds layer 1's projections only, layer 0 runs
    without a graph (its output needs no gradient), and the stored refinement loads back to the same scores."""
    from safetensors.torch import load_file

    from multitune.models.refinement import add_lora, lora_targets, unload
    from multitune.runs.load import load_run

    schedule = {"name": "two_stage", "finetune_steps": 4, "finetune_lr": 5e-3, "refine": "lora", "refine_r": 2}
    run_dir, metrics, _ = run_with({"steps": 6, "schedule": {**schedule, "refine_layers": 1}})
    for name in ("sentiment", "ner"):
        settings = json.loads((run_dir / "finetuned" / name / "refinement.json").read_text())
        assert settings["target_modules"] and all(t.startswith("encoder.layer.1.") for t in settings["target_modules"])
        assert len(settings["target_modules"]) == 6  # query, key, value, attention output, intermediate, output
        lora = [k for k in load_file(str(run_dir / "finetuned" / name / "refinement.safetensors")) if "lora_" in k]
        assert lora and all(k.startswith("backbone.encoder.layer.1.") for k in lora)
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    again = json.loads((run_dir / "evaluation_test.json").read_text())
    assert all(again["tasks"][n]["metrics"] == metrics["tasks"][n]["metrics"] for n in ("sentiment", "ner"))

    _, _, model, backbone = load_run(run_dir)
    batch = backbone.tokenizer(["a short text", "another one"], return_tensors="pt", padding=True)
    outputs: dict[str, torch.Tensor] = {}
    for top, needs_grad in ((1, False), (None, True)):
        lora = add_lora(model, "sentiment", 2, 4, lora_targets(model, top))
        outputs.clear()
        hook = model.backbone.encoder.layer[0].register_forward_hook(lambda m, i, o: outputs.update(low=o[0]))
        model.backbone(**batch)
        hook.remove()
        assert outputs["low"].requires_grad is needs_grad  # a graph below the adapted block, or none
        unload(lora, merge=False)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # GPT-2's projections are transformers' Conv1D, which peft adapts as it does nn.Linear
        ("gpt2", {"transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"}),
        # an encoder-decoder: the last block of each stack, the encoder's (which classification heads read) too
        ("t5", {"encoder.block.1.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.o"}),
    ],
)
def test_refine_layers_takes_the_top_blocks_of_every_stack(kind, expected):
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    from multitune.models.refinement import add_lora, lora_targets, unload

    if kind == "gpt2":
        backbone = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16))
    else:
        config = T5Config(num_layers=2, d_model=16, d_kv=4, num_heads=2, d_ff=32, vocab_size=40)
        backbone = T5ForConditionalGeneration(config)
    holder = nn.Module()
    holder.backbone, holder.heads = backbone, nn.ModuleDict({"t": nn.Linear(16, 2)})
    targets = lora_targets(holder, 1)
    assert expected <= set(targets)
    tops = ("transformer.h.1.",) if kind == "gpt2" else ("encoder.block.1.", "decoder.block.1.")
    assert all(name.startswith(tops) for name in targets)  # nothing of a lower block, nor outside the blocks
    lora = add_lora(holder, "t", 2, 4, targets)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in backbone.named_parameters() if "lora_A" in name}
    assert adapted == set(targets)
    unload(lora, merge=False)
    with pytest.raises(ConfigError, match="refine_layers is 3, more blocks than a stack holds") as error:
        lora_targets(holder, 3)
    assert error.value.field == "training.schedule.refine_layers"


def test_refine_layers_beyond_the_backbone_fails_before_training(tmp_path, tiny_backbone, write_jsonl, capsys):
    from multitune import Task, fit

    a, b = write_jsonl("a.jsonl", classification_rows(8)), write_jsonl("b.jsonl", token_rows(8))
    schedule = {"name": "two_stage", "refine": "lora", "refine_layers": 3}  # the tiny BERT has 2 layers
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", schedule=schedule)))
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refine_layers is 3, more blocks than a stack holds: encoder.layer has 2" in error
    assert not (tmp_path / "runs").exists()
    rows = (torch.zeros(8, 4), [0, 1] * 4)
    with pytest.raises(ConfigError, match="refine_layers chooses the blocks a LoRA refinement adapts"):
        fit(torch.nn.Linear(4, 4), [Task("t", "classification", rows)], schedule={**schedule, "refine": "full"})


def test_refine_layers_needs_a_lora_refinement(tmp_path, tiny_backbone, write_jsonl):
    a, b = write_jsonl("a.jsonl", classification_rows(4)), write_jsonl("b.jsonl", token_rows(4))
    schedule = {"name": "two_stage", "refine": "lora", "refine_layers": 1}
    validate_config(tiny_config(tiny_backbone, a, b, tmp_path / "runs", schedule=schedule))
    data = tiny_config(tiny_backbone, a, b, tmp_path / "runs", schedule={**schedule, "refine": "full"})
    with pytest.raises(ConfigError, match="refine_layers chooses the blocks a LoRA refinement adapts") as error:
        validate_config(data)
    assert error.value.field == "training.schedule.refine_layers"


def test_early_stopping_on_the_average_ends_the_run(run_with):
    _, metrics, history = run_with(
        {"steps": 60, "eval_every": 1, "lr": 1e-6, "early_stopping": {"patience": 2, "min_delta": 0.5}}
    )
    assert metrics["stopped_early"] and metrics["steps"] == 3  # a gain of 0.5 never comes: stop after 1 + 2
    assert any("early_stopping" in h for h in history)


def test_early_stopping_per_task_drops_a_stalled_task(run_with):
    _, metrics, _ = run_with(
        {
            "steps": 40,
            "eval_every": 2,
            "lr": 1e-6,
            "early_stopping": {"patience": 1, "min_delta": 0.5, "per_task": True},
        }
    )
    assert metrics["stopped_early"] and set(metrics["stopped_tasks"]) == {"sentiment", "ner"}
    assert metrics["steps"] == 4


@pytest.mark.parametrize(
    "schedule,extra,match",
    [
        ({"name": "sequential", "order": ["ner"]}, {}, "order must name every task"),
        ({"name": "reptile"}, {"mixed_batches": True}, "one task at a time"),
    ],
)
def test_bad_schedules_are_config_errors(tmp_path, tiny_backbone, write_jsonl, schedule, extra, match):
    a, b = write_jsonl("a.jsonl", classification_rows(4)), write_jsonl("b.jsonl", token_rows(4))
    data = tiny_config(tiny_backbone, a, b, tmp_path / "runs", schedule=schedule, **extra)
    with pytest.raises(ConfigError, match=match) as error:
        validate_config(data)
    assert error.value.field.startswith("training.schedule")


def test_a_lora_refinement_over_per_task_adapters_is_a_config_error(tmp_path, tiny_backbone, write_jsonl):
    a, b = write_jsonl("a.jsonl", classification_rows(4)), write_jsonl("b.jsonl", token_rows(4))
    data = tiny_config(tiny_backbone, a, b, tmp_path / "runs", schedule={"name": "two_stage", "refine": "lora"})
    validate_config(data)  # alone it is fine
    data["model"]["peft"] = {"method": "lora"}
    with pytest.raises(ConfigError, match="already gives each task its own adapter") as error:
        validate_config(data)
    assert error.value.field == "training.schedule.refine"


def test_a_new_run_starts_from_a_finished_runs_backbone(run_with, tmp_path, tiny_backbone, write_jsonl):
    from safetensors.torch import load_file

    from multitune.recipe.prepare import prepare

    run_dir, _, _ = run_with({"steps": 4})
    saved = {k[len("backbone.") :]: v for k, v in load_file(str(run_dir / "model.safetensors")).items()}
    a = write_jsonl("new.jsonl", classification_rows(20, seed=5))
    data = tiny_config(tiny_backbone, a, a, tmp_path / "runs2")
    del data["tasks"]["ner"]
    data["model"]["init_from"] = str(run_dir)
    model = prepare(validate_config(data)).model
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, saved[key]), key
    data["model"]["architecture"] = {"name": "hybrid", "task_layers": 1}
    with pytest.raises(ConfigError, match="does not fit") as error:
        prepare(validate_config(data))
    assert error.value.field == "model.init_from"


def test_per_task_patience_counted_in_own_steps_waits_for_the_tasks_own_training():
    """count own_steps: a task stops once it has trained patience × eval_every of its own steps since its
    best validation; counted in validations, the same stall stops it at the second stale validation."""
    from multitune.balancing.backward import Balancer
    from multitune.config import EarlyStopping
    from multitune.training.loop import TrainState, Validation, early_stop

    def stop_steps(rule: EarlyStopping) -> list[int]:
        state, balancer, stopped_at = TrainState(), Balancer(weighting=None), []
        for validation in range(1, 9):  # every 10 steps; "a" is drawn on 2 steps in 10, "b" on 8
            state.step = 10 * validation
            state.task_steps = {"a": 2 * validation, "b": 8 * validation}
            score = 1.0 if validation == 1 else 0.5  # both peak at the first validation
            result = Validation(score, {"a": score, "b": score}, {"a": score, "b": score})
            before = list(state.stopped_tasks)
            early_stop(rule, state, result, balancer, eval_every=10)
            stopped_at += [(name, state.step) for name in state.stopped_tasks if name not in before]
        return stopped_at

    # best at own steps a: 2, b: 8; 20 own steps later: a at 22 own steps (validation 11, never here), b at 28
    assert stop_steps(EarlyStopping(patience=2, per_task=True, count="own_steps")) == [("b", 40)]
    assert stop_steps(EarlyStopping(patience=2, per_task=True)) == [("a", 30), ("b", 30)]


def test_own_steps_patience_needs_per_task(tmp_path, tiny_backbone, write_jsonl):
    a, b = write_jsonl("a.jsonl", classification_rows(4)), write_jsonl("b.jsonl", token_rows(4))
    stopping = {"patience": 2, "count": "own_steps"}
    data = tiny_config(tiny_backbone, a, b, tmp_path / "runs", early_stopping=stopping)
    with pytest.raises(ConfigError, match="per_task"):
        validate_config(data)


def test_two_stage_refinement_stops_when_its_validation_stalls(run_with):
    """finetune_patience 2 with a learning rate too small to gain: each task's refinement validates at its
    first eval_every steps (its best) and stops after 2 more, instead of training all 50 steps."""
    schedule = {"name": "two_stage", "finetune_steps": 50, "finetune_lr": 1e-12, "finetune_patience": 2}
    _, _, history = run_with({"steps": 4, "eval_every": 3, "schedule": schedule})
    for name in ("sentiment", "ner"):
        steps = [h["step"] for h in history if h.get("stage") == "finetune" and h.get("task") == name]
        validated = [h["step"] for h in history if h.get("task") == name and "validation" in h]
        assert validated == [3, 6, 9] and max(steps) == 9


@pytest.mark.parametrize("mix_by", ["rows", "tokens"])
def test_mix_by_tokens_gives_each_task_its_probability_of_the_training_tokens(
    tmp_path, tiny_backbone, write_jsonl, mix_by
):
    """Two tasks, uniform sampling, one with rows about five times as long: drawn by rows the long task takes
    about 5/6 of the tokens; by tokens each takes about half. The run counts each task's tokens (metrics.json,
    history.jsonl) and the report plots the shares against the probabilities."""
    short = [{"text": "good" if i % 2 else "bad", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    long = [
        {"text": " ".join(["good" if i % 2 else "bad"] * 20), "label": "pos" if i % 2 else "neg"} for i in range(40)
    ]
    data = tiny_config(tiny_backbone, write_jsonl("s.jsonl", short), write_jsonl("l.jsonl", long), tmp_path / "runs")
    data["tasks"]["ner"] = {"type": "classification", "source": {"format": "jsonl", "train": str(tmp_path / "l.jsonl")}}
    data["training"].update(steps=40, batch_size=8, mixed_batches=True, eval_every=40, log_every=10, mix_by=mix_by)
    data["sampling"] = {"name": "uniform"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    tokens, rows = metrics["task_tokens"], metrics["task_rows"]
    lengths = {name: tokens[name] / rows[name] for name in tokens}  # mean tokens per row: 3 and 22 ([CLS] ... [SEP])
    assert lengths["sentiment"] == pytest.approx(3) and lengths["ner"] == pytest.approx(22)
    share = tokens["ner"] / (tokens["ner"] + tokens["sentiment"])
    assert share == pytest.approx(0.5 if mix_by == "tokens" else 22 / 25, abs=0.08)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    last = [h for h in history if "token_shares" in h][-1]
    assert last["token_shares"]["ner"] == pytest.approx(share, abs=1e-5)
    assert "Share of training tokens per task against its sampling probability" in (run / "report.html").read_text()
