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
import os
import shutil
from pathlib import Path

from multitune.errors import ConfigError
from multitune.export.model import base_backbone, save_hf_model
from multitune.runs.load import load_run
from multitune.training.checkpoint import discard_staging

VLLM_README = """# {run}: {count} generation task(s) for vLLM

`base/` is the backbone ({backbone}) as trained; `adapters/NAME/` holds each task's LoRA adapter (peft's
format, rank {rank}). Serve every task from one vLLM process, one adapter per request:

```
vllm serve ./base --enable-lora --max-lora-rank {rank} --max-loras {count} \\
    --lora-modules {modules}
```

Then call it with an OpenAI client, naming the task as the model (`model="{first}"`). Each task was trained
on its own prompt format (the chat template in `base/`, with the task's instruction): send what
`multitune serve` would build for it. Plain peft loads an adapter too:
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapters/{first}")`.
"""


def export_vllm(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's generation tasks into the new folder `out` (see the module's docstring); returns it.
    Raises ConfigError for a run that is not a causal LM with per-task LoRA adapters."""
    run, target = Path(run_dir), Path(out).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError("the output folder exists and is not empty: choose a new one", file=str(target))
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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.urandom(6).hex()}"
    staging.mkdir()
    try:
        save_hf_model(base_backbone(model, run, config.model), staging / "base")
        backbone.tokenizer.save_pretrained(str(staging / "base"))
        for name in tasks:
            shutil.copytree(run / "adapters" / name, staging / "adapters" / name)
        settings = json.loads((staging / "adapters" / tasks[0] / "adapter_config.json").read_text(encoding="utf-8"))
        readme = VLLM_README.format(
            run=run.name,
            count=len(tasks),
            backbone=config.model.backbone,
            rank=settings.get("r", peft.r),
            modules=" ".join(f"{name}=./adapters/{name}" for name in tasks),
            first=tasks[0],
        )
        (staging / "README.md").write_text(readme, encoding="utf-8")
        os.replace(staging, target)
    finally:
        discard_staging(staging)
    return target
