from pathlib import Path

import pytest

from multitune.catalogue import load_config
from multitune.config import package_path
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
    assert str(caught.value) == f"{path}:4: field 'training.stepz': unknown key (did you mean 'steps'?)"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  name: demo", "  nmae: demo", "3: field 'run.nmae': unknown key (did you mean 'name'?)"),
        (
            "    type: classification",
            "    type: classification\n    lables: [x, y]",
            "9: field 'tasks.a.lables': unknown key (did you mean 'labels'?)",
        ),
        (
            "      train: data/a.jsonl",
            "      train: data/a.jsonl\n      validaton: data/b.jsonl",
            "12: field 'tasks.a.source.validaton': unknown key (did you mean 'validation'?)",
        ),
        ("training:", "trainig:", "4: field 'trainig': unknown key (did you mean 'training'?)"),
        ("  steps: 10", "  zzz: 10", "5: field 'training.zzz': unknown key"),  # nothing close: no guess
    ],
)
def test_an_unknown_key_suggests_the_closest_key_of_its_group(tmp_path, old, new, message):
    path = write(tmp_path, ("# a comment line first\n" + MINIMAL).replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}:{message}"


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
    # keys and tasks the file never had, brought in by an override: the override is named, not a line of the
    # file (the file's nearest written key, `tasks.a` on line 6 or `tasks` on line 5, holds no fault)
    with pytest.raises(ConfigError, match=r"^override: field 'tasks.a.max_rowz': unknown key"):
        load_config(write(tmp_path, MINIMAL), ["tasks.a.max_rowz.train=3"])
    with pytest.raises(ConfigError, match=r"^override: field 'tasks.b.source'"):
        load_config(write(tmp_path, MINIMAL), ["tasks.b.type=classification"])
    with pytest.raises(ConfigError, match=r"config.yaml:7: field 'tasks.a.type'"):  # the file's own fault, still
        load_config(write(tmp_path, MINIMAL.replace("type: classification", "type: clasification")), ["tasks.a.lr=1"])


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


# --- duplicate keys: the later one would silently replace the earlier -----------------------------


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        # a second training block would replace the first
        (MINIMAL + "training:\n  lr: 0.1\n", 11, "training"),
        # the same task twice would train one task
        (MINIMAL + "  a:\n    type: regression\n    source: {format: jsonl, train: data/b.jsonl}\n", 11, "tasks.a"),
        (MINIMAL.replace("  steps: 10\n", "  steps: 10\n  lr: 0.1\n  steps: 20\n"), 6, "training.steps"),
        (MINIMAL + "    source:\n      format: csv\n", 11, "tasks.a.source"),
        (MINIMAL + "sampling: {name: temperature, temperature: 1.0, temperature: 3.0}\n", 11, "sampling.temperature"),
        (
            MINIMAL.replace("  steps: 10\n", "  schedule:\n    name: joint\n    name: sequential\n"),
            6,
            "training.schedule.name",
        ),
        (MINIMAL.replace("  steps: 10\n", "  <<: {steps: 1}\n  <<: {lr: 0.1}\n"), 5, "training.<<"),
        # equal as Python keys though written differently: 1 and 0x1
        (MINIMAL + "guard:\n  baselines: {1: 0.5, 0x1: 0.7}\n", 12, "guard.baselines.0x1"),
    ],
)
def test_a_key_given_twice_is_refused_naming_file_line_and_key(tmp_path, text, line, field):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    key = field.rsplit(".", 1)[-1]
    assert (error.file, error.line, error.field) == (str(path), line, field)
    assert f"key '{key}' is given twice (first on line" in error.message


def test_merge_keys_are_not_duplicates_and_keep_lines(tmp_path):
    # `<<` merges a mapping in; an explicit key beside it wins, as YAML specifies: no duplicate
    text = MINIMAL.replace("  steps: 10\n", "  <<: {steps: 10, lr: 0.1}\n  lr: 0.2\n")
    config = load_config(write(tmp_path, text))
    assert config.training.steps == 10 and config.training.lr == pytest.approx(0.2)
    for good, bad, line, field in (
        ("steps: 10,", "steps: -1,", 4, "training.steps"),
        ("lr: 0.2", "lr: -2", 5, "training.lr"),
    ):
        path = write(tmp_path, text.replace(good, bad))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert (caught.value.line, caught.value.field) == (line, field)


def test_an_override_given_twice_or_undone_by_a_later_one_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(
        ConfigError, match=r"^override: field 'training.steps': 'training.steps' is overridden twice, with different"
    ):
        load_config(path, ["training.steps=5", "training.steps=6"])
    with pytest.raises(ConfigError, match=r"'training.mixed_batches' is overridden twice"):  # 1 is not true
        load_config(path, ["training.mixed_batches=1", "training.mixed_batches=true"])
    # the same value twice loses nothing (`multitune affinity` adds analysis.task_affinity=true itself)
    assert load_config(path, ["training.steps=5", "training.steps=5"]).training.steps == 5
    with pytest.raises(ConfigError, match=r"field 'training': 'training' replaces the earlier override"):
        load_config(path, ["training.steps=5", "training={lr: 0.1}"])
    # a group first, then one of its keys: the key refines the group
    config = load_config(path, ["training={steps: 5}", "training.lr=0.1"])
    assert config.training.steps == 5 and config.training.lr == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"^override: field 'sampling.name': key 'name' is given twice$"):
        load_config(path, ["sampling={name: temperature, name: equal}"])


def test_an_override_of_an_aliased_group_changes_that_group_only(tmp_path):
    text = MINIMAL.replace("  a:\n    type", "  a: &task\n    type") + "  b: *task\n"
    config = load_config(write(tmp_path, text), ["tasks.a.sampling_weight=3"])
    assert config.tasks["a"].sampling_weight == 3.0 and config.tasks["b"].sampling_weight == 1.0


# --- YAML alias bombs and deep nesting: bounded time and memory ---------------------------------

LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LAUGHS, "more than 100000 values once aliases are expanded"),  # 9^9 values
        ("run: &a {name: *a}\n", "an alias refers to a value that contains it"),
        ("a: &a [*a]\n", "an alias refers to a value that contains it"),
        ("training: &t\n  <<: *t\n", "an alias refers to a value that contains it"),
        ("a: " + "[" * 500 + "]" * 500 + "\n", "nested deeper than 64 levels"),
        ("".join(" " * i + "k:\n" for i in range(200)), "nested deeper than 64 levels"),
        # shallow as written, 80 levels deep once expanded
        ("a: &a0 [1]\n" + "".join(f"a{i + 1}: &a{i + 1} [[*a{i}]]\n" for i in range(40)), "nested deeper than 64"),
    ],
)
def test_alias_bombs_and_deep_nesting_fail_fast_in_one_line(tmp_path, text, message):
    import time
    import tracemalloc

    path = write(tmp_path, text)
    start = time.process_time()  # CPU seconds: the machine may be busy with other work
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert time.process_time() - start < 1.0
    assert caught.value.file == str(path) and caught.value.line is not None
    assert "\n" not in str(caught.value)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=message):
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_the_same_bomb_in_an_override_fails_fast(tmp_path):
    laughs = "{" + ", ".join(LAUGHS.splitlines()) + "}"  # the same anchors, as one flow mapping
    with pytest.raises(ConfigError, match=r"^override: field 'sampling\.[a-i][.0-9]*': more than 100000 values"):
        load_config(write(tmp_path, MINIMAL), [f"sampling={laughs}"])


def test_an_unreadable_scalar_names_its_line(tmp_path):
    # the timestamp pattern matches, the date does not exist: PyYAML raised a bare ValueError
    path = write(tmp_path, MINIMAL.replace("name: demo", "name: 2020-13-45"))
    with pytest.raises(ConfigError, match=r"config.yaml:2: field 'run.name': cannot read '2020-13-45'"):
        load_config(path)


# --- settings that make training meaningless ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "override_text", "field", "message"),
    [
        ("  lr: .inf", "training.lr=.inf", "training.lr", "finite number within float32's range"),
        ("  lr: 1e308", "training.lr=1e308", "training.lr", "got 1e+308"),
        ("  lr: 4e38", "training.lr=4.0e38", "training.lr", "got 4e+38"),  # float32 max is 3.4028e38
        ("  weight_decay: .inf", "training.weight_decay=.inf", "training.weight_decay", "finite"),
        ("  max_grad_norm: .inf", "training.max_grad_norm=.inf", "training.max_grad_norm", "finite"),
        ("  steps: 10000000000000000000000000000000", "training.steps=1.0e+30", "training.steps", "int64's range"),
    ],
)
def test_non_finite_and_overflowing_settings_are_refused(tmp_path, line, override_text, field, message):
    path = write(tmp_path, MINIMAL.replace("  steps: 10", line))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.file, caught.value.line, caught.value.field) == (str(path), 4, field)
    assert message in caught.value.message
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL), [override_text])
    assert (caught.value.file, caught.value.field) == ("override", field)


def test_the_largest_float32_is_still_a_setting(tmp_path):
    config = load_config(write(tmp_path, MINIMAL.replace("  steps: 10", "  lr: 3.4028234663852886e38")))
    assert config.training.lr == 3.4028234663852886e38


def test_method_parameters_must_be_finite(tmp_path):
    path = write(tmp_path, MINIMAL + "sampling: {name: temperature, temperature: .inf}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.line, caught.value.field) == (11, "sampling.temperature")
    with pytest.raises(ConfigError, match=r"^override: field 'loss_weighting.lr': must be a finite"):
        load_config(write(tmp_path, MINIMAL), ["loss_weighting={name: uncertainty, lr: .nan}"])
    with pytest.raises(ConfigError, match=r"field 'guard.baselines.a': must be a finite"):
        load_config(write(tmp_path, MINIMAL), ["guard.baselines={a: -.inf}"])


def test_the_seed_fits_every_generator(tmp_path):
    # numpy's default_rng refuses negative seeds; torch's manual_seed refuses 2^64 and beyond
    for seed in (-1, 2**32, 2**64):
        with pytest.raises(ConfigError, match=r"field 'run.seed'"):
            load_config(write(tmp_path, MINIMAL), [f"run.seed={seed}"])
    assert load_config(write(tmp_path, MINIMAL), [f"run.seed={2**32 - 1}"]).run.seed == 2**32 - 1


@pytest.mark.parametrize("kind", ["classification", "pair_classification", "token_classification"])
def test_fewer_than_two_labels_is_refused_naming_the_key(tmp_path, kind):
    text = MINIMAL + "    labels: [A]\n"
    if kind == "pair_classification":
        text += "    text_fields: [a, b]\n"
    path = write(tmp_path, text.replace("type: classification", f"type: {kind}"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.line, caught.value.field) == (11, "tasks.a.labels")
    assert f"a {kind} task needs at least two labels, got ['A']" in caught.value.message
    with pytest.raises(ConfigError, match=r"field 'tasks.a.labels': a label is listed twice"):
        load_config(path, ["tasks.a.labels=[A, A]"])
    assert load_config(path, ["tasks.a.labels=[A, B]"]).tasks["a"].labels == ["A", "B"]


# --- a run directory whose config.yaml is not multitune's ---------------------------------------

FOREIGN_CONFIGS = {
    "list": (b"- a\n- b\n", "the config must be a mapping of groups"),
    "scalar": (b"42\n", "the config must be a mapping of groups"),
    "empty": (b"", "field 'tasks': name at least one task"),
    "no tasks": (b"run:\n  name: x\ntraining:\n  steps: 3\n", "field 'tasks': name at least one task"),
    "no run, no tasks": (b"training:\n  steps: 3\n", "field 'tasks': name at least one task"),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    "run not a group": (b"run: [1, 2]\ntasks: {}\n", ":1: field 'run': must be a group"),
    "wrong types": (b"run: {seed: many}\ntasks: 5\n", ":1: field 'run.seed': Input should be a valid integer"),
    "duplicate": (b"tasks: {}\ntasks: {}\n", ":2: field 'tasks': key 'tasks' is given twice"),
}


@pytest.mark.parametrize("kind", list(FOREIGN_CONFIGS))
def test_resume_of_a_folder_without_a_multitune_config_is_one_line(tmp_path, capsys, kind):
    from multitune.cli import main

    content, message = FOREIGN_CONFIGS[kind]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(content)
    assert main(["resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"multitune: error: {run / 'config.yaml'}"), err
    assert message in err, err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"] and (run / "config.yaml").read_bytes() == content


def test_a_file_larger_than_any_config_is_refused_before_it_is_parsed(tmp_path):
    path = write(tmp_path, MINIMAL + "# " + "x" * (256 * 1024) + "\n")  # valid YAML: one long comment
    with pytest.raises(ConfigError, match=r"config.yaml: larger than 256 KiB: not a config$"):
        load_config(path)
    assert load_config(write(tmp_path, MINIMAL + "# " + "x" * (200 * 1024) + "\n")).training.steps == 10


def test_exponent_numbers_without_a_dot_are_numbers_everywhere(tmp_path):
    """YAML 1.1 reads 1e-3 as text; a method parameter got the text '1e-3' and crashed its method mid-run."""
    text = (
        MINIMAL + "loss_weighting:\n  name: gradnorm\n  alpha: 1e-1\nsampling: {name: temperature, temperature: 5E-1}\n"
    )
    config = load_config(write(tmp_path, text), ["training.lr=2e-5", "gradient_aggregation={name: cagrad, c: 5e-1}"])
    assert config.loss_weighting.params == {"alpha": 0.1}
    assert config.sampling.params == {"temperature": 0.5}
    assert config.gradient_aggregation is not None and config.gradient_aggregation.params == {"c": 0.5}
    assert config.training.lr == 2e-5
    assert load_config(write(tmp_path, MINIMAL.replace("name: demo", "name: 1e3x")), []).run.name == "1e3x"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("type: classification", "type: clasification", "field 'tasks.a.type': Input should be"),
        ("format: jsonl", "format: jsnl", "field 'tasks.a.source.format': Input should be"),
    ],
)
def test_a_misspelt_choice_suggests_the_closest(tmp_path, old, new, message):
    path = write(tmp_path, MINIMAL.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    right = old.split(": ")[1]
    assert message in str(caught.value) and str(caught.value).endswith(f"; did you mean '{right}'?")
    path = write(tmp_path, MINIMAL.replace(old, old.split(": ")[0] + ": zzzzzz"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "did you mean" not in str(caught.value)  # nothing close: no guess


def test_a_backbone_folder_beside_the_config_is_found_from_any_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "lm").mkdir()  # a local model folder named like a hub id, beside the config
    path = write(folder, MINIMAL + "model:\n  backbone: lm\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "lm").mkdir(parents=True)  # the same name where the command runs: not the one meant
    monkeypatch.chdir(elsewhere)
    assert load_config(path).model.backbone == str(folder / "lm")
    hub = write(folder, MINIMAL + "model:\n  backbone: org/name\n")  # no such folder: a hub id, left as it is
    assert load_config(hub).model.backbone == "org/name"


def test_a_task_type_that_is_not_a_string_is_a_one_line_error(tmp_path):
    path = write(tmp_path, MINIMAL.replace("    type: classification", "    type: {run: 1}"))
    with pytest.raises(ConfigError, match="type"):
        load_config(path)
