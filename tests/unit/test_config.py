from pathlib import Path

import pytest

from multitune.config import load_config, package_path
from multitune.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
run:
  name: demo
training:
  steps: 10
tasks:
  a:
    type: classification
    source:
      format: jsonl
      train: data/a.jsonl
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_gets_defaults_and_absolute_paths(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    task = config.tasks["a"]
    assert task.text_fields == ["text"] and task.metrics == ["accuracy", "macro_f1"] and task.main_metric == "accuracy"
    assert task.source.train == str(tmp_path / "data" / "a.jsonl")
    assert config.sampling.name == "temperature" and config.loss_weighting.name == "equal"


def test_overrides_are_typed_and_nested(tmp_path):
    overrides = ["training.steps=25", "training.lr=3e-4", "tasks.a.max_rows.train=7", "sampling={name: temperature}"]
    config = load_config(write(tmp_path, MINIMAL), [*overrides, "sampling.alpha=0.5"])
    assert config.training.steps == 25 and config.training.lr == pytest.approx(3e-4)
    assert config.tasks["a"].max_rows.train == 7
    assert config.sampling.name == "temperature" and config.sampling.params == {"alpha": 0.5}


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  steps: 10", "  stepz: 10"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}:4: field 'training.stepz': unknown key"


def test_bad_value_names_the_key(tmp_path):
    path = write(tmp_path, MINIMAL.replace("steps: 10", "steps: -3"))
    with pytest.raises(
        ConfigError, match=r"config.yaml:4: field 'training.steps': Input should be greater than or equal to 1"
    ):
        load_config(path)


def test_bad_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"^override: field 'training.nope': unknown key$"):
        load_config(write(tmp_path, MINIMAL), ["training.nope=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(write(tmp_path, MINIMAL), ["training.steps"])


def test_unknown_method_and_parameter(tmp_path):
    with pytest.raises(
        ConfigError, match=r"field 'sampling.name': unknown sampler 'temprature' \(did you mean 'temperature'\?\)"
    ):
        load_config(write(tmp_path, MINIMAL), ["sampling.name=temprature"])
    with pytest.raises(ConfigError, match=r"field 'sampling.tau': unknown parameter for sampler 'temperature'"):
        load_config(write(tmp_path, MINIMAL), ["sampling={name: temperature, tau: 2}"])
    with pytest.raises(ConfigError, match=r"unknown metric 'acc'"):
        load_config(write(tmp_path, MINIMAL), ["tasks.a.metrics=[acc]"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml:3: invalid YAML"):
        load_config(write(tmp_path, "run:\n  name: x\n  - broken\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_run_and_task_names_cannot_traverse_paths(tmp_path, name):
    with pytest.raises(ConfigError, match="name"):
        load_config(write(tmp_path, MINIMAL), [f"run.name='{name}'"])


def test_task_type_constraints(tmp_path):
    with pytest.raises(ConfigError, match="pair_classification task takes 2"):
        load_config(write(tmp_path, MINIMAL), ["tasks.a.type=pair_classification", "tasks.a.text_fields=[text]"])
    with pytest.raises(ConfigError, match="needs positive_label"):
        load_config(write(tmp_path, MINIMAL), ["tasks.a.metrics=[f1]"])
    with pytest.raises(ConfigError, match="main_metric 'mcc' is not in metrics"):
        load_config(write(tmp_path, MINIMAL), ["tasks.a.main_metric=mcc"])


def test_package_paths_resolve_to_bundled_data():
    config = load_config(REPO / "configs" / "quickstart.yaml")
    train = Path(config.tasks["trec"].source.train or "")
    assert train == package_path("quickstart/trec/train.jsonl") and train.is_file()


def test_a_per_step_weighting_with_one_task_per_step_warns(tmp_path, caplog):
    load_config(write(tmp_path, MINIMAL), ["loss_weighting.name=famo"])
    assert "equals 'equal'" in caplog.text
    caplog.clear()
    load_config(write(tmp_path, MINIMAL), ["loss_weighting.name=famo", "sampling={name: all_tasks}"])
    assert caplog.text == ""
