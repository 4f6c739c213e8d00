"""Data parallelism: two CPU processes (gloo) reach the weights one process reaches with the same global
batch, for plain equal weighting and for gradient methods, with the backbone whole on every process,
sharded across them (FSDP), or its optimizer state and gradients partitioned by DeepSpeed ZeRO; a sharded or
partitioned run resumes from its checkpoint on two processes or on one."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.training.checkpoint import checkpoint_dirs
from tests.conftest import classification_rows, tiny_config


@pytest.fixture(scope="module")
def still_backbone(tiny_backbone, tmp_path_factory):
    """The tiny BERT without dropout: one process and two must draw no different random masks."""
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    for file in tiny_backbone.iterdir():
        shutil.copy(file, folder / file.name)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(config_path, processes: int, *args: str, command_name: str = "train", accelerate_config=None) -> str:
    """multitune on `processes` processes (torchrun, or `accelerate launch` with a config file); its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    multitune = ["-m", "multitune", command_name, str(config_path), *args]
    if accelerate_config is not None:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
            f"--main_process_port={free_port()}", *multitune,
        ]  # fmt: skip
    elif processes == 1:
        command = [sys.executable, *multitune]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={free_port()}", *multitune,
        ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


SETTINGS = {
    "equal": {},
    "pcgrad-parameters": {
        "sampling": {"name": "all_tasks"},
        "loss_weighting": {"name": "dwa"},
        "gradient_aggregation": {"name": "pcgrad", "source": "parameters"},
    },
    "mgda-representation": {
        "sampling": {"name": "all_tasks"},
        "gradient_aggregation": {"name": "mgda", "source": "representation"},
    },
    # the backbone sharded across the two processes (FSDP2); one process trains it whole
    "fsdp-equal": {"training": {"fsdp": True}},
    "fsdp-uncertainty-mgda-accumulation": {
        "training": {"fsdp": True, "gradient_accumulation": 2},
        "sampling": {"name": "all_tasks"},
        "loss_weighting": {"name": "uncertainty"},
        "gradient_aggregation": {"name": "mgda", "source": "representation"},
    },
    # DeepSpeed ZeRO partitions the AdamW state (1) and the gradients (2); one process trains without it.
    # Every task in every step: DeepSpeed steps parameters without a gradient too (training/zero.py). Stage 2
    # with the optimizer state offloaded is the accelerate launch below.
    "zero1-uncertainty-pcgrad-parameters": {
        "training": {"deepspeed": {"stage": 1}},
        "sampling": {"name": "all_tasks"},
        "loss_weighting": {"name": "uncertainty"},
        "gradient_aggregation": {"name": "pcgrad", "source": "parameters"},
    },
}


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


NEEDS_DEEPSPEED = pytest.mark.skipif(not deepspeed_installed(), reason="deepspeed is not installed")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=NEEDS_DEEPSPEED) if n.startswith("zero") else n for n in SETTINGS]
)
def test_two_processes_reach_the_weights_of_one(tmp_path, still_backbone, write_jsonl, name):
    a = write_jsonl("a.jsonl", classification_rows(40))
    b = write_jsonl("b.jsonl", classification_rows(40, seed=7))
    weights = {}
    for processes in (1, 2):
        data = tiny_config(still_backbone, a, b, tmp_path / f"runs{processes}", steps=6, eval_every=3)
        data["tasks"]["ner"] = {"type": "classification", "source": {"format": "jsonl", "train": str(b)}}
        data["model"]["dropout"] = 0.0
        data["training"].update(batch_size=4, checkpoint_every=6)
        settings = dict(SETTINGS[name])
        data["training"].update(settings.pop("training", {}))
        data.update(settings)
        path = tmp_path / f"{processes}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        run(path, processes)
        [run_dir] = (tmp_path / f"runs{processes}").iterdir()
        weights[processes] = load_file(str(checkpoint_dirs(run_dir)[-1] / "model.safetensors"))
        assert (run_dir / "metrics.json").exists()
    assert weights[1].keys() == weights[2].keys()
    start = load_file(str(still_backbone / "model.safetensors"))
    moved = [k for k in weights[1] if k.startswith("backbone.") and not torch.equal(weights[1][k], start[k[9:]])]
    assert moved, "training changed the backbone"
    for key, one in weights[1].items():
        assert torch.allclose(one, weights[2][key], atol=2e-5, rtol=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize(
    "partitioning",
    [{"fsdp": True}, pytest.param({"deepspeed": {"stage": 2}}, marks=NEEDS_DEEPSPEED)],
    ids=["fsdp", "zero2"],
)
def test_a_sharded_run_resumes_on_two_processes_or_one(tmp_path, still_backbone, write_jsonl, partitioning):
    a = write_jsonl("a.jsonl", classification_rows(40))
    b = write_jsonl("b.jsonl", classification_rows(40, seed=7))
    data = tiny_config(still_backbone, a, b, tmp_path / "runs", steps=6, eval_every=3)
    data["tasks"]["ner"] = {"type": "classification", "source": {"format": "jsonl", "train": str(b)}}
    data["model"]["dropout"] = 0.0
    data["training"].update(batch_size=4, checkpoint_every=3, keep_checkpoints=5, **partitioning)
    if "deepspeed" in partitioning:  # every task each step: one process steps exactly as DeepSpeed does
        data["sampling"] = {"name": "all_tasks"}
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    run(path, 2)
    [run_dir] = (tmp_path / "runs").iterdir()
    first, last = checkpoint_dirs(run_dir)
    expected = load_file(str(last / "model.safetensors"))
    for processes in (2, 1):
        shutil.rmtree(last)  # as if killed between the two checkpoints
        run(run_dir, processes, command_name="resume")
        got = load_file(str(checkpoint_dirs(run_dir)[-1] / "model.safetensors"))
        assert checkpoint_dirs(run_dir)[0] == first
        for key, value in expected.items():
            assert torch.allclose(value, got[key], atol=2e-5, rtol=1e-4), (processes, key)


ACCELERATE_DEEPSPEED = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "DEEPSPEED",
    "deepspeed_config": {"zero_stage": 2, "offload_optimizer_device": "cpu", "offload_param_device": "none"},
    "num_processes": 2,
    "num_machines": 1,
    "machine_rank": 0,
    "mixed_precision": "no",
    "use_cpu": True,
}


@pytest.mark.slow
@NEEDS_DEEPSPEED
def test_an_accelerate_deepspeed_config_trains_with_zero(tmp_path, still_backbone, write_jsonl):
    """Stage 2 with the optimizer state in host memory, MGDA and gradient accumulation, from accelerate's config."""
    a = write_jsonl("a.jsonl", classification_rows(40))
    b = write_jsonl("b.jsonl", classification_rows(40, seed=7))
    accelerate_config = tmp_path / "deepspeed.yaml"
    accelerate_config.write_text(yaml.safe_dump(ACCELERATE_DEEPSPEED), encoding="utf-8")
    weights = {}
    for processes in (1, 2):
        data = tiny_config(still_backbone, a, b, tmp_path / f"runs{processes}", steps=6, eval_every=3)
        data["tasks"]["ner"] = {"type": "classification", "source": {"format": "jsonl", "train": str(b)}}
        data["model"]["dropout"] = 0.0
        data["training"].update(batch_size=4, checkpoint_every=6, gradient_accumulation=2)
        data["sampling"] = {"name": "all_tasks"}
        data["gradient_aggregation"] = {"name": "mgda", "source": "representation"}
        path = tmp_path / f"{processes}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        err = run(path, processes, accelerate_config=accelerate_config if processes == 2 else None)
        if processes == 2:
            assert "DeepSpeed ZeRO stage 2 over 2 processes, optimizer state offloaded to the CPU" in err
        [run_dir] = (tmp_path / f"runs{processes}").iterdir()
        weights[processes] = load_file(str(run_dir / "model.safetensors"))
    for key, one in weights[1].items():
        assert torch.allclose(one, weights[2][key], atol=2e-5, rtol=1e-4), key


def test_the_zero_settings_of_an_accelerate_launch(tmp_path):
    from multitune.config import TrainingConfig
    from multitune.errors import ConfigError
    from multitune.training.zero import ZeroSettings, check_zero, zero_from_accelerate

    assert zero_from_accelerate({}) is None
    fields = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}
    assert zero_from_accelerate(fields) == ZeroSettings(1, "none")
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    from_file = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(file)}
    assert zero_from_accelerate(from_file) == ZeroSettings(2, "cpu")
    file.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    assert zero_from_accelerate(from_file) is None  # no partitioning: plain data parallelism
    file.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the DeepSpeed config"):
        zero_from_accelerate(from_file)
    with pytest.raises(ConfigError, match=r"stage 3 partitions the parameters.*training\.fsdp"):
        check_zero(ZeroSettings(3), TrainingConfig())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"guard": {"enabled": True}}, "guard.enabled"),
        ({"analysis": {"task_affinity": True}}, "analysis.task_affinity"),
        (
            {"sampling": {"name": "all_tasks"}, "gradient_aggregation": {"name": "pcgrad", "source": "parameters"}},
            "gradient_aggregation.source",
        ),
        ({"regularization": {"l2_sp_alpha": 0.01}}, "regularization"),
        ({"model": {"architecture": {"name": "mmoe"}}}, "model.architecture.name"),
    ],
)
def test_a_sharded_backbone_refuses_what_needs_whole_shared_gradients(tmp_path, write_jsonl, change, field):
    from multitune.catalogue import validate_config
    from multitune.errors import ConfigError
    from multitune.recipe.launch import check_sharded
    from tests.conftest import balancer_for

    a = write_jsonl("a.jsonl", classification_rows(8))
    data = tiny_config(tmp_path, a, a, tmp_path / "runs")
    for key, value in change.items():
        data.setdefault(key, {}).update(value)
    config = validate_config(data)
    with pytest.raises(ConfigError, match="sharded backbone") as error:
        check_sharded(config, balancer_for(config, list(config.tasks)))
    assert field in str(error.value)
