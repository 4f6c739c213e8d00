import json

import pytest
import yaml

from multitune.cli import main
from multitune.errors import ConfigError
from multitune.sweep import split_top_level, variants
from tests.conftest import classification_rows, tiny_config, token_rows


def test_axes_multiply_and_mappings_keep_their_commas():
    assert split_top_level("{name: pcgrad, source: parameters},equal") == [
        "{name: pcgrad, source: parameters}",
        "equal",
    ]
    fixed, combos = variants(
        ["training.steps=3", "loss_weighting.name=equal,uncertainty", "sampling={name: uniform},{name: all_tasks}"]
    )
    assert fixed == ["training.steps=3"] and len(combos) == 4
    assert combos[1] == ["loss_weighting.name=equal", "sampling={name: all_tasks}"]
    with pytest.raises(ConfigError, match="at least one key with several"):
        variants(["training.steps=3"])


def test_sweep_trains_each_variant_and_tabulates(tmp_path, tiny_backbone, write_jsonl, capsys):
    a, b = write_jsonl("a.jsonl", classification_rows(30)), write_jsonl("b.jsonl", token_rows(30))
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=2, eval_every=2)), encoding="utf-8"
    )
    assert main(["sweep", str(path), "loss_weighting.name=equal,uncertainty", "sampling.name=all_tasks"]) == 0
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    table = json.loads((sweep_dir / "sweep.json").read_text())["variants"]
    assert set(table) == {"equal", "uncertainty"}
    assert all((sweep_dir / name / "metrics.json").exists() for name in table)
    assert "| `uncertainty` |" in capsys.readouterr().out


def test_a_bad_variant_stops_the_sweep_before_training(tmp_path, tiny_backbone, write_jsonl, capsys):
    a, b = write_jsonl("a.jsonl", classification_rows(30)), write_jsonl("b.jsonl", token_rows(30))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs")), encoding="utf-8")
    assert main(["sweep", str(path), "loss_weighting.name=equal,uncertainy"]) == 2
    assert "did you mean 'uncertainty'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_variants_whose_labels_coincide_each_keep_their_row(tmp_path, tiny_backbone, write_jsonl):
    a, b = write_jsonl("a.jsonl", classification_rows(30)), write_jsonl("b.jsonl", token_rows(30))
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=1, eval_every=1)), encoding="utf-8"
    )
    assert main(["sweep", str(path), "training.lr=1e-3,1e-3"]) == 0  # a value given twice: two runs, two rows
    table = json.loads((tmp_path / "runs" / "tiny-sweep" / "sweep.json").read_text())["variants"]
    assert list(table) == ["1e-3", "1e-3-2"]
    assert table["1e-3"]["run_dir"] != table["1e-3-2"]["run_dir"]
