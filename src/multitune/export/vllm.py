"""`multitune export RUN_DIR --format vllm OUT`: a causal-LM run's generation tasks in the layout vLLM serves
with per-request LoRA adapters: OUT/base (the backbone as plain transformers loads it, its tokenizer and chat
template) and OUT/adapters/TASK (each generation task's LoRA adapter in peft's format), with a README giving
the exact `vllm serve ... --enable-lora --lora-modules TASK=PATH ...` command. A request then names the task
as its `model`, as with `multitune serve`'s OpenAI routes.

The run must give each task its own LoRA adapter (`model.peft.method: lora`) without a shared one (vLLM
applies one adapter per request).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from multitune.config import TaskConfig
from multitune.core.files import new_folder, staged_folder
from multitune.errors import ConfigError, MultitunError
from multitune.export.model import base_backbone, save_hf_model
from multitune.runs.load import load_run

VLLM_README = """# {run}: {count} generation task(s) for vLLM

`base/` is the backbone ({backbone}) as trained; `adapters/NAME/` holds each task's LoRA adapter (peft's
format, rank {rank}). Serve every task from one vLLM process, one adapter per request:

```
vllm serve ./base --enable-lora --max-lora-rank {vllm_rank} --max-loras {count} \\
    --lora-modules {modules}
```

(`--max-lora-rank` takes one of vLLM's sizes, {vllm_ranks}: {vllm_rank} is the smallest that holds rank
{rank}.)

Then call it with an OpenAI client, naming the task as the model (`model="{first}"`). Each task was trained
on one user message, rendered by the chat template in `base/` (or, without one, as plain text followed by a
line break): the task's instruction, a blank line, then the input (several input fields joined by line
breaks). Send the same message:

| task | instruction |
|---|---|
{instructions}

Plain peft loads an adapter too:
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapters/{first}")`.
"""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


def vllm_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds adapters of rank `rank` (vLLM's LoRA config:
    MaxLoRARanks). Raises ConfigError above vLLM's largest."""
    for size in VLLM_LORA_RANKS:
        if size >= rank:
            return size
    raise ConfigError(
        f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})", field="model.peft.r"
    )


def _instruction(task: TaskConfig) -> str:
    """A task's instruction for the README's table (a Markdown cell)."""
    if task.instruction and task.instruction.strip():
        return task.instruction.replace("|", "\\|").replace("\n", " ")
    if task.source.format == "unified":
        return "each record's own (`instruction` in its data), none where a record has none"
    return "none: the message is the input alone"


def export_vllm(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's generation tasks into the new folder `out` (see the module's docstring); returns it.
    Raises ConfigError for a run that is not a causal LM with per-task LoRA adapters."""
    run, target = Path(run_dir), new_folder(out)
    config, _, model, backbone = load_run(run)
    tasks = [name for name, task in config.tasks.items() if task.type == "generation"]
    adapters, peft = model.task_adapters, config.model.peft
    if config.model.kind != "causal_lm" or not tasks:
        raise ConfigError("--format vllm exports the generation tasks of a causal LM run", field="model.kind")
    if adapters is None or peft is None or adapters.method != "lora" or adapters.shared:
        raise ConfigError(
            "--format vllm needs one LoRA adapter per task and no shared one (model.peft: {method: lora, "
            "shared: false}): vLLM applies one adapter per request",
            field="model.peft",
        )
    for name in tasks:
        if not (run / "adapters" / name / "adapter_config.json").is_file():
            raise MultitunError(f"the run has no LoRA adapter for task '{name}' (damaged?)", file=str(run / "adapters"))
    others = [name for name in config.tasks if name not in tasks]
    if others:  # vLLM serves text generation only: say which tasks stay with multitune serve
        print(
            f"multitune: note: {', '.join(others)} (not generation tasks) are not exported; multitune serve "
            "answers them",
            file=sys.stderr,
        )
    with staged_folder(target) as staging:
        save_hf_model(base_backbone(model, run, config.model), staging / "base")
        backbone.tokenizer.save_pretrained(str(staging / "base"))
        for name in tasks:
            shutil.copytree(run / "adapters" / name, staging / "adapters" / name)
        ranks = [
            int(json.loads((staging / "adapters" / name / "adapter_config.json").read_text(encoding="utf-8"))["r"])
            for name in tasks
        ]
        readme = VLLM_README.format(
            run=run.name,
            count=len(tasks),
            backbone=config.model.backbone,
            rank=max(ranks),
            vllm_rank=vllm_rank(max(ranks)),
            vllm_ranks=", ".join(map(str, VLLM_LORA_RANKS)),
            modules=" ".join(f"{name}=./adapters/{name}" for name in tasks),
            first=tasks[0],
            instructions="\n".join(f"| {name} | {_instruction(config.tasks[name])} |" for name in tasks),
        )
        (staging / "README.md").write_text(readme, encoding="utf-8")
    return target
