"""Safe by default: safetensors weights, weights_only torch files, no remote code, validated names, clear
errors on an unwritable or full disk, and no deletion outside our own checkpoint folders."""

import ast
import errno
from pathlib import Path

import pytest
import yaml

from multitune.cli import main
from multitune.config import Config
from multitune.errors import MultitunError
from multitune.training.checkpoint import write_json
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
    for name in ("rmtree", "rmdir", "unlink", "remove"):
        for path, node in calls(name):
            assert path.name == "checkpoint.py", f"{path}: {ast.unparse(node)}"


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


def test_a_name_cannot_escape_the_output_directory(config_path, tmp_path, capsys):
    assert main(["train", str(config_path(tmp_path / "runs")), "run.name=../../etc"]) == 2
    assert "run name '../../etc' must be" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
