"""Safe by default: safetensors weights, weights_only torch files, no remote code, validated names, clear
errors on an unwritable or full disk, and no deletion outside our own checkpoint folders."""

import ast
import errno
from pathlib import Path

import pytest
import yaml
from torch import nn

from multitune.cli import main
from multitune.config import Config
from multitune.core.files import write_json
from multitune.errors import MultitunError
from multitune.training.checkpoint import CHECKPOINTS, checkpoint_dirs, latest_checkpoint, save_checkpoint, save_weights
from tests.conftest import REPO, classification_rows, tiny_config, token_rows

SOURCES = sorted((REPO / "src" / "multitune").rglob("*.py"))


def calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node


def test_every_torch_load_is_weights_only():
    found = list(calls("load"))
    torch_loads = [
        (p, n) for p, n in found if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "torch"
    ]
    assert torch_loads, "expected the checkpoint reader to use torch.load"
    for path, node in torch_loads:
        keywords = {k.arg: k.value for k in node.keywords}
        assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, path


def test_model_weights_are_only_written_as_safetensors():
    for path, node in calls("save"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
            assert path.name == "checkpoint.py"  # trainer.pt: optimizer and loop state, read back weights_only
    for path, node in calls("save_pretrained"):  # transformers writes only the config and the tokenizer
        receiver = ast.unparse(node.func.value)  # type: ignore[attr-defined]
        assert "config" in receiver or "tokenizer" in receiver, f"{path}: {receiver}"


def test_remote_code_is_off_unless_asked():
    assert (
        Config.model_validate(
            {"tasks": {"a": {"type": "classification", "source": {"format": "jsonl", "train": "x"}}}}
        ).model.trust_remote_code
        is False
    )


def test_nothing_outside_our_checkpoints_is_deleted():
    for name in ("rmtree", "rmdir", "unlink", "remove", "removedirs"):
        for path, node in calls(name):
            if name == "remove" and ast.unparse(node.func) not in ("os.remove", "remove"):
                continue  # x.remove(...) on a list or a hook handle deletes no file; os.remove does
            # checkpoint folders (training/checkpoint.py) and the atomic writes' own temporary files (core/files.py)
            assert path.name in ("checkpoint.py", "files.py"), f"{path}: {ast.unparse(node)}"


@pytest.fixture
def config_path(tmp_path, tiny_backbone, write_jsonl):
    def make(output_dir):
        a, b = write_jsonl("a.jsonl", classification_rows(20)), write_jsonl("b.jsonl", token_rows(20))
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(tiny_config(tiny_backbone, a, b, output_dir)), encoding="utf-8")
        return path

    return make


def test_unwritable_output_directory_is_a_clear_error(config_path, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    assert main(["train", str(config_path(blocker / "runs"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"multitune: error: {blocker / 'runs'}: field 'run.output_dir': cannot create the run directory"
    )


def test_full_disk_is_a_clear_error(monkeypatch, tmp_path):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(MultitunError, match=r"metrics.json: cannot write: No space left on device"):
        write_json(tmp_path / "metrics.json", {"a": 1})
    assert not list(tmp_path.iterdir())  # the temporary file is gone, nothing half-written


def test_a_really_full_disk_is_a_clear_error_and_keeps_the_earlier_checkpoint(small_filesystem):
    disk = small_filesystem("disk", 64)
    with pytest.raises(MultitunError, match=r"model.safetensors: cannot write: .*"):
        save_weights(nn.Linear(200, 200), disk / "model.safetensors")  # 160 KB on a 64 KiB disk
    assert not list(disk.iterdir())
    run = disk / "run"
    run.mkdir()
    save_checkpoint(run, 1, nn.Linear(3, 2), {"step": 1}, keep=2)
    with pytest.raises(MultitunError, match=r"step-00000002: cannot write checkpoint: .*"):
        save_checkpoint(run, 2, nn.Linear(200, 200), {"step": 2}, keep=2)
    assert [c.name for c in checkpoint_dirs(run)] == ["step-00000001"]
    assert latest_checkpoint(run) == run / CHECKPOINTS / "step-00000001"
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["step-00000001"]  # no partial folder left


@pytest.mark.parametrize("library", ["safetensors", "torch.save"])
def test_a_serializer_failing_its_own_way_is_a_clear_error(monkeypatch, tmp_path, library):
    import safetensors.torch
    import torch

    def fail(*args, **kwargs):  # what each library raises on a full disk: not an OSError
        if library == "safetensors":
            raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    save_checkpoint(tmp_path, 1, nn.Linear(3, 2), {"step": 1}, keep=1)
    if library == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_model", fail)
        with pytest.raises(MultitunError, match=r"model.safetensors: cannot write: Error while serializing"):
            save_weights(nn.Linear(3, 2), tmp_path / "model.safetensors")
    else:
        monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(MultitunError, match=r"cannot write checkpoint: (Error while serializing|\[enforce fail)"):
        save_checkpoint(tmp_path, 2, nn.Linear(3, 2), {"step": 2}, keep=1)
    assert latest_checkpoint(tmp_path) == tmp_path / CHECKPOINTS / "step-00000001"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary or partial leftovers


def test_a_full_disk_during_training_stops_with_one_line_and_a_loadable_checkpoint(
    config_path, tmp_path, capsys, monkeypatch
):
    import torch

    original, calls = torch.save, {"n": 0}

    def second_save_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    path = config_path(tmp_path / "runs")
    assert main(["train", str(path), "training.checkpoint_every=2", "training.eval_every=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("multitune: error: ") and "step-00000004: cannot write checkpoint" in err[-1]
    assert not any("Traceback" in line for line in err)
    run = tmp_path / "runs" / "tiny"
    assert latest_checkpoint(run) == run / CHECKPOINTS / "step-00000002"


def test_a_name_cannot_escape_the_output_directory(config_path, tmp_path, capsys):
    assert main(["train", str(config_path(tmp_path / "runs")), "run.name=../../etc"]) == 2
    assert "run name '../../etc' must be" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "x\\y", ""])
def test_a_task_name_cannot_become_a_path(config_path, tmp_path, capsys, name):
    """Task names become file names (per-task fine-tuned copies, adapters, exports): no separators or dots."""
    path = config_path(tmp_path / "runs")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["tasks"][name] = config["tasks"].pop("a" if "a" in config["tasks"] else next(iter(config["tasks"])))
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "task name" in err and "must be" in err, err
    assert not (tmp_path / "runs").exists()
