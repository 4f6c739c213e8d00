"""`multitune export RUN_DIR --task NAME OUT`: one task of a run as a standalone Hugging Face model folder.

What plain transformers (and torch, safetensors) load from OUT, without multitune:
- every task: the fine-tuned backbone (`AutoModel.from_pretrained(OUT)`), per-task LoRA merged into its
  weights with peft's `merge_and_unload` (the task's adapter plus the shared one, when there is one), and
  the tokenizer;
- classification, pair classification, regression: `multitune_head.safetensors` and `multitune_head.json`
  (pooling, labels, target scaling). No transformers class pools the way multitune does (mean or first
  token, then one linear layer; BERT's sequence classifier adds a tanh pooler), so the model card gives
  the ten lines that apply the head;
- token classification: a genuine `AutoModelForTokenClassification` (backbone, dropout, linear: exactly
  multitune's head), with its labels;
- generation: the causal or seq2seq LM itself (`AutoModelForCausalLM`/`AutoModelForSeq2SeqLM`), greedy
  decoding and the task's `max_new_tokens` in its generation config.
Before writing the card, the export loads OUT back with plain transformers and checks it reproduces
multitune's outputs on probe inputs. `README.md` is the model card: task, data sources, metrics, licenses.
With `--onnx`, the encoder and head are also exported to `model.onnx` (needs the `onnx` package).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multitune.config import ModelConfig
from multitune.core.files import atomic_write, new_folder, staged_folder
from multitune.data.readers import Row
from multitune.data.tasks import TaskData
from multitune.errors import ConfigError, MultitunError
from multitune.export.card import model_card
from multitune.models.adapters import ADAPTERS
from multitune.models.assemble import FROM_RUN
from multitune.models.multitask import MultiTaskModel, pool
from multitune.models.peft_tasks import SHARED
from multitune.runs.load import load_refined, load_run, task_from_manifest
from multitune.runs.predict import encode_for_prediction, input_schema, prediction_bounds

HEAD_WEIGHTS = "multitune_head.safetensors"
HEAD_CONFIG = "multitune_head.json"
PROBE_TEXTS = ["Who wrote Hamlet?", "free prize call now", "a good movie about a dog in Paris"]
PROBE_TOKENS = [["John", "lives", "in", "Paris"], ["I", "love", "London"]]

HEAD_LOADER = """import json, torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

folder = "{folder}"
tokenizer = AutoTokenizer.from_pretrained(folder)
encoder = AutoModel.from_pretrained(folder).eval()
head = json.load(open(f"{{folder}}/multitune_head.json"))
weights = load_file(f"{{folder}}/multitune_head.safetensors")


def predict(texts, pairs=None):
    batch = tokenizer(  # text that spells a special token ("[SEP]") stays text, as in multitune
        texts, pairs, truncation=True, max_length=head["max_length"], padding=True, return_tensors="pt",
        split_special_tokens=True,
    )
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = hidden[:, 0] if head["pooling"] == "cls" else (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    outputs = pooled @ weights["weight"].T + weights["bias"]
    if head["type"] == "regression":  # held to the training targets' range, as multitune predict holds it
        values = outputs[:, 0] * head["target_std"] + head["target_mean"]
        if head.get("target_min") is not None:
            values = values.clamp(head["target_min"], head["target_max"])
        return values.tolist()
    return [head["labels"][i] for i in outputs.argmax(-1).tolist()]


print(predict(["{example}"]{pairs}))
"""

TOKEN_LOADER = """import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

folder = "{folder}"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForTokenClassification.from_pretrained(folder).eval()


def predict(words):  # one tag per word, read at its first sub-token
    batch = tokenizer(  # a word that spells a special token ("[SEP]") stays text, as in multitune
        words, is_split_into_words=True, truncation=True, max_length={max_length}, return_tensors="pt",
        split_special_tokens=True,
    )
    with torch.no_grad():
        ids = model(**batch).logits[0].argmax(-1).tolist()
    firsts = {{}}
    for position, word in enumerate(batch.word_ids(0)):
        if word is not None and word not in firsts:
            firsts[word] = position
    # a sentence longer than max_length is cut here: its last words get None, not a tag (multitune predict
    # and serve tag them in overlapping windows)
    return [model.config.id2label[ids[firsts[w]]] if w in firsts else None for w in range(len(words))]


print(predict({example}))
"""

GENERATION_LOADER = """from transformers import {auto_class}, AutoTokenizer

folder = "{folder}"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = {auto_class}.from_pretrained(folder).eval()
# build the prompt as multitune does (the task's instruction, through the chat template when there is one)
inputs = tokenizer("...", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True))
"""


def export_task(run_dir: str | Path, task_name: str, out: str | Path, onnx: bool = False) -> Path:
    """Write task `task_name` of a finished run into the new folder `out`; returns it."""
    run, target = Path(run_dir), new_folder(out)
    config, manifest, model, backbone = load_run(run)
    if task_name not in config.tasks:
        raise ConfigError(f"no task '{task_name}' in this run (tasks: {', '.join(config.tasks)})", field="--task")
    task = task_from_manifest(task_name, config.tasks[task_name], manifest[task_name])
    if config.model.kind == "vision":
        raise ConfigError(
            "an image task's head reads multitune's pooled image features, which no transformers image-classification "
            "class reproduces: serve the run with multitune serve, or predict with multitune predict",
            field="--task",
        )
    if not model.backbone_features:
        raise ConfigError(
            f"a '{model.architecture}' model gives each task features of its own, which no plain transformers "
            "model reproduces: only hard parameter sharing (and LMs) can be exported",
            field="model.architecture",
        )
    load_refined(model, run, task_name)  # a two-stage run: this task's refined predictor, if it has one
    plain = merged_backbone(model, run, config.model, task_name)
    with staged_folder(target) as staging:
        bounds = prediction_bounds(task, manifest[task_name])
        records = _probe_records(task)  # encoded as `multitune predict` encodes its inputs
        probes = encode_for_prediction(config.model, task, backbone.tokenizer, records) if records else []
        loader, checked = _write_model(model, plain, backbone.tokenizer, config.model, task, staging, probes, bounds)
        loader = loader.replace(staging.name, target.name)  # the card names the final folder
        if onnx:
            export_onnx(model, backbone.tokenizer, task, staging / "model.onnx")
        card = model_card(run, config.model, list(config.tasks), task, loader, checked, onnx)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return target


def merged_backbone(model: MultiTaskModel, run: Path, model_config: ModelConfig, task: str) -> nn.Module:
    """A fresh transformers backbone with the run's weights; per-task adapters (of a method that merges)
    merged in with peft."""
    adapters = model.task_adapters
    if adapters is not None and not adapters.merges:
        merging = [name for name in ADAPTERS.names() if getattr(ADAPTERS.get(name), "merges", False)]
        raise ConfigError(
            f"'{adapters.method}' adapters cannot be merged into the backbone's weights: only "
            f"{', '.join(merging)} adapters export",
            field="model.peft.method",
        )
    plain = base_backbone(model, run, model_config)
    if adapters is None:
        return plain
    from peft import PeftModel

    folder = run / "adapters"
    if not (folder / task / "adapter_config.json").is_file():
        raise MultitunError(f"this run has no saved merging adapter for task '{task}'", file=str(folder / task))
    peft_model = PeftModel.from_pretrained(plain, str(folder / task), adapter_name=task)
    names = [task]
    if adapters.shared:
        peft_model.load_adapter(str(folder / SHARED), adapter_name=SHARED)
        names.append(SHARED)
    return peft_model.merge_and_unload(adapter_names=names).eval()  # type: ignore[no-any-return,operator]


def base_backbone(model: MultiTaskModel, run: Path, model_config: ModelConfig) -> nn.Module:
    """A fresh transformers backbone holding the run's own backbone weights, without any per-task adapter."""
    plain: nn.Module = FROM_RUN.get(model_config.kind, _encoder_from_run)(run / "backbone").model
    adapter_keys = _adapter_keys(model)
    state = {
        key.replace(".base_layer.", "."): value
        for key, value in model.backbone.state_dict().items()
        if key not in adapter_keys
    }
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def _adapter_keys(model: MultiTaskModel) -> set[str]:
    """The backbone's state-dict keys of adapter weights living inside it (LoRA's): not the backbone's own."""
    adapters = model.task_adapters
    if adapters is None or not adapters.inside_backbone:
        return set()
    names = [*adapters.tasks, *([SHARED] if adapters.shared else [])]
    ids = {id(p) for name in names for p in adapters.adapter_parameters(name)}
    return {key for key, p in model.backbone.named_parameters() if id(p) in ids}


def save_hf_model(model: Any, folder: Path) -> None:
    """A folder plain transformers loads: the config (and generation settings) through transformers, the
    weights through safetensors (multitune writes weights only as safetensors, by its own code; through
    atomic_write, which gives them the umask's mode where safetensors alone makes them 0600)."""
    from safetensors.torch import save_model

    model.config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(folder)
    atomic_write(folder / "model.safetensors", lambda tmp: save_model(model, str(tmp)))


def _encoder_from_run(folder: Path) -> Any:
    from multitune.models.backbone import backbone_from_run

    return backbone_from_run(folder)


def _write_model(
    model: MultiTaskModel,
    plain: nn.Module,
    tokenizer: Any,
    model_config: ModelConfig,
    task: TaskData,
    folder: Path,
    probes: Sequence[Any],
    bounds: tuple[float, float] | None = None,
) -> tuple[str, float]:
    """Save the task's model into `folder`; returns the model card's loading code and the largest difference
    between the reloaded folder's outputs and multitune's on the encoded `probes`. `bounds`: a regression
    task's range of training targets, which the card's code holds its answers to."""
    from safetensors.torch import save_file

    kind = task.config.type
    tokenizer.save_pretrained(folder)
    if kind == "generation":
        generation: Any = plain.generation_config  # type: ignore[union-attr]
        generation.max_new_tokens = task.config.max_new_tokens
        generation.do_sample = False
        save_hf_model(plain, folder)
        auto = "AutoModelForSeq2SeqLM" if model_config.kind == "seq2seq" else "AutoModelForCausalLM"
        return GENERATION_LOADER.format(auto_class=auto, folder=folder.name), 0.0
    head: Any = model.heads[task.name]
    linear = head.out
    if kind == "token_classification":
        difference = _write_token_model(model, plain, linear, task, folder, probes)
        example = json.dumps(PROBE_TOKENS[0])
        return TOKEN_LOADER.format(folder=folder.name, max_length=model_config.max_length, example=example), difference
    save_hf_model(plain, folder)
    head_weights = {"weight": linear.weight.detach().contiguous(), "bias": linear.bias.detach().contiguous()}
    atomic_write(folder / HEAD_WEIGHTS, lambda tmp: save_file(head_weights, str(tmp)))
    settings = {
        "task": task.name,
        "type": kind,
        "pooling": model.pooling,
        "labels": task.labels if kind != "regression" else None,
        "target_mean": task.target_mean,
        "target_std": task.target_std,
        "target_min": bounds[0] if bounds else None,
        "target_max": bounds[1] if bounds else None,
        "max_length": model_config.max_length,
    }
    (folder / HEAD_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    two = len(input_schema(task.name, task.config).fields) == 2  # a pair task's example gives both texts
    pairs = ", " + json.dumps([PROBE_TEXTS[2]]) if two else ""
    return HEAD_LOADER.format(folder=folder.name, example=PROBE_TEXTS[0], pairs=pairs), _check_sequence(
        model, task, folder, settings, probes
    )


def _write_token_model(
    model: MultiTaskModel,
    plain: nn.Module,
    linear: nn.Linear,
    task: TaskData,
    folder: Path,
    probes: Sequence[Any],
) -> float:
    from transformers import AutoModelForTokenClassification

    labels = task.labels or []
    base_config: Any = plain.config  # type: ignore[union-attr]
    base_config.num_labels = len(labels)
    base_config.id2label = dict(enumerate(labels))
    base_config.label2id = {label: i for i, label in enumerate(labels)}
    tagger: Any = AutoModelForTokenClassification.from_config(base_config)
    body = getattr(tagger, tagger.base_model_prefix)
    missing, _ = body.load_state_dict(plain.state_dict(), strict=False)  # the tagger's body has no pooler
    classifier = getattr(tagger, "classifier", None)
    if missing or not isinstance(classifier, nn.Linear):
        raise ConfigError(f"cannot map this backbone onto {type(tagger).__name__}", field="model.backbone")
    classifier.load_state_dict(linear.state_dict())
    save_hf_model(tagger, folder)
    reloaded = AutoModelForTokenClassification.from_pretrained(folder, local_files_only=True).eval()
    difference = 0.0
    with torch.no_grad():
        for row in probes:
            ours = _our_outputs(model, task, row)
            ids = torch.tensor([row.input_ids])
            theirs = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            difference = max(difference, float((ours - theirs).abs().max()))
    return difference


def _check_sequence(
    model: MultiTaskModel, task: TaskData, folder: Path, settings: dict[str, Any], probes: Sequence[Any]
) -> float:
    """Largest difference of the head's outputs: the folder reloaded with plain transformers against ours."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    weights = load_file(str(folder / HEAD_WEIGHTS))
    difference = 0.0
    with torch.no_grad():
        for row in probes:
            inputs = {"input_ids": torch.tensor([row.input_ids])}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            if row.token_type_ids is not None:
                inputs["token_type_ids"] = torch.tensor([row.token_type_ids])
            hidden = encoder(**inputs).last_hidden_state
            pooled = pool(hidden, inputs["attention_mask"], settings["pooling"])
            theirs = (pooled @ weights["weight"].T + weights["bias"])[0]
            ours = _our_outputs(model, task, row).reshape(theirs.shape)
            difference = max(difference, float((ours - theirs).abs().max()))
    return difference


def _probe_records(task: TaskData) -> list[Row]:
    """The probe inputs, as records `multitune predict` takes for the task: words for token classification,
    one text or a pair otherwise; none for generation (its export is the LM itself, not compared)."""
    if task.config.type == "generation":
        return []
    if task.config.type == "token_classification":
        records: list[dict[str, Any]] = [{"tokens": t} for t in PROBE_TOKENS]
    else:
        fields = input_schema(task.name, task.config).fields  # one text or a pair, as predict takes them
        records = [dict.fromkeys(fields, t) for t in PROBE_TEXTS]
    return [Row(r, "probe", i) for i, r in enumerate(records)]


def _our_outputs(model: MultiTaskModel, task: TaskData, row: Any) -> torch.Tensor:
    from multitune.data.collate import collate

    with torch.no_grad():
        return model(collate({task.name: [row]}, 0))[task.name][0].float()


# --- ONNX -------------------------------------------------------------------------------------------


class _EncoderWithHead(nn.Module):
    """input_ids, attention_mask -> the task's head outputs (logits, tag logits or standardised score)."""

    def __init__(self, model: MultiTaskModel, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from multitune.data.collate import Batch, TaskRows

        batch = Batch(
            {"input_ids": input_ids, "attention_mask": attention_mask}, {self.task: TaskRows(slice(0, None), None)}
        )
        return self.model(batch)[self.task]


def export_onnx(model: MultiTaskModel, tokenizer: Any, task: TaskData, path: Path) -> None:
    """The encoder path (backbone, pooling, head) as ONNX with dynamic batch and length; needs `onnx`."""
    import importlib.util

    if task.config.type == "generation":
        raise ConfigError("ONNX export covers encoder tasks only, not generation", field="--onnx")
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("ONNX export needs the onnx package: pip install onnx", field="--onnx")
    ids = torch.tensor([tokenizer("a short example")["input_ids"]])
    wrapper = _EncoderWithHead(model, task.name).eval()
    torch.onnx.export(
        wrapper,
        (ids, torch.ones_like(ids)),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["outputs"],
        dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}},
        dynamo=False,
    )


# --- the model card ---------------------------------------------------------------------------------
