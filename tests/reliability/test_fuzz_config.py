"""Property-based tests of config loading: a key given twice at any depth, alias structures of any shape,
a non-finite or overflowing number in any setting, and a run folder whose config.yaml is anything at all.

Each expectation is computed here, independently of the loader: the line of a duplicate from the text as
written, the size and depth of an alias structure from its definition, the line of a setting from PyYAML's
own composer. Every failure is one ConfigError line naming the file, within a second of CPU time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from multitune.catalogue import load_config
from multitune.cli import main
from multitune.config import MAX_DEPTH, MAX_VALUES, Config, MethodConfig, parse_yaml
from multitune.errors import ConfigError
from tests.conftest import classification_rows, tiny_config, token_rows

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

# plain lowercase keys that YAML reads as strings (yes/no/on/off/true/false/null would not be)
keys = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(
    lambda k: k not in {"yes", "no", "on", "off", "true", "false", "null"}
)
scalars = st.one_of(st.integers(-100, 100), st.text(alphabet="abc xyz", max_size=6), st.booleans())
trees = st.recursive(
    st.dictionaries(keys, scalars, min_size=1, max_size=3),
    lambda inner: st.dictionaries(keys, st.one_of(scalars, inner), min_size=1, max_size=3),
    max_leaves=12,
)


def mappings(tree: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    found = [(path, tree)]
    for key, value in tree.items():
        if isinstance(value, dict):
            found += mappings(value, (*path, key))
    return found


def emit(tree: dict[str, Any], at: tuple[str, ...], key: str, out: list[str], path: tuple[str, ...] = ()) -> dict:
    """Block YAML of `tree` into `out`, with `key` of the mapping at path `at` written a second time after
    that mapping's other entries; returns {key path: line} of what was written."""
    lines: dict[Any, int] = {}
    indent = "  " * len(path)
    for name, value in tree.items():
        out.append(f"{indent}{name}:" + ("" if isinstance(value, dict) else f" {json.dumps(value)}"))
        lines[(*path, name)] = len(out)
        if isinstance(value, dict):
            lines.update(emit(value, at, key, out, (*path, name)))
    if path == at:
        out.append(f"{indent}{key}: 0")
        lines["duplicate"] = len(out)
    return lines


@FUZZ
@given(data=st.data(), tree=trees)
def test_a_key_given_twice_at_any_depth_names_its_line_and_path(data, tree):
    at, mapping = data.draw(st.sampled_from(mappings(tree)))
    key = data.draw(st.sampled_from(sorted(mapping)))
    out: list[str] = []
    lines = emit(tree, at, key, out)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text("\n".join(out) + "\n", encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
    error = caught.value
    assert (error.file, error.line, error.field) == (str(path), lines["duplicate"], ".".join((*at, key)))
    assert error.message == f"key '{key}' is given twice (first on line {lines[(*at, key)]})"


# An alias structure: anchors a0, a1, ... each a list of scalars "x" and aliases (anchor numbers) to earlier
# anchors, sometimes to itself (a cycle), written as the top-level keys k0, k1, ...; a narrow one nests
# deep with few values, a wide one has many values with little depth.
@st.composite
def alias_structures(draw: Any) -> list[list[Any]]:
    count, width = draw(st.integers(1, 80)), draw(st.integers(1, 9))
    chain = draw(st.booleans())  # each anchor holds the one before it: depth grows with the count
    anchors: list[list[Any]] = []
    for i in range(count):
        if chain:
            anchors.append(draw(st.lists(st.just("x"), max_size=2)) + ([i - 1] if i else []))
            continue
        item = st.one_of(st.just("x"), st.just(i - 1), st.integers(0, i - 1)) if i else st.just("x")
        anchors.append(draw(st.lists(item, max_size=width)))
    if draw(st.integers(0, 4)) == 4:  # one alias inside its own anchor
        i = draw(st.integers(0, count - 1))
        anchors[i].insert(draw(st.integers(0, len(anchors[i]))), i)
    return anchors


def alias_text(anchors: list[list[Any]]) -> str:
    return "".join(
        f"k{i}: &a{i} [" + ", ".join("x" if item == "x" else f"*a{item}" for item in items) + "]\n"
        for i, items in enumerate(anchors)
    )


@FUZZ
@given(resolved=alias_structures())
def test_alias_structures_load_or_fail_within_the_bounds(resolved):
    text = alias_text(resolved)
    cyclic = any(item == i for i, items in enumerate(resolved) for item in items)
    size: list[int] = []  # values in each anchor's expanded tree
    height: list[int] = []  # levels below each anchor's list
    for items in resolved:
        if any(item == len(size) for item in items):
            size.append(math.inf)  # type: ignore[arg-type]
            height.append(math.inf)  # type: ignore[arg-type]
            continue
        size.append(1 + sum(1 if item == "x" else size[item] for item in items))
        height.append(max([1 + (0 if item == "x" else height[item]) for item in items], default=0))
    total = 1 + sum(size)  # the top-level mapping too
    depth = 1 + max(height)  # the anchors' lists sit one level below it
    reasons = {
        "an alias refers to a value that contains it": cyclic,
        f"more than {MAX_VALUES} values once aliases are expanded": total > MAX_VALUES,
        f"nested deeper than {MAX_DEPTH} levels once aliases are expanded": depth > MAX_DEPTH,
    }
    event(
        ", ".join(reason.split(" ")[0] + " " + reason.split(" ")[2] for reason, on in reasons.items() if on) or "loads"
    )
    # CPU seconds, with room for a busy machine's slower cores: an unbounded expansion would take far longer
    start = time.process_time()
    try:
        data, lines = parse_yaml(text, "a.yaml")
    except ConfigError as error:
        assert time.process_time() - start < 2.5
        assert reasons.get(error.message), (error.message, total, depth)
        assert error.file == "a.yaml" and error.line is not None
    else:
        assert time.process_time() - start < 2.5
        assert not any(reasons.values()), (total, depth)

        def expand(i: int) -> list[Any]:
            return ["x" if item == "x" else expand(item) for item in resolved[i]]

        assert data == {f"k{i}": expand(i) for i in range(len(resolved))}
        assert all(lines[(f"k{i}",)] == i + 1 for i in range(len(resolved)))


# Every numeric setting of the schema, found by walking the pydantic models, as (key path, "float" | "int").
def numeric_settings(model: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        found += numeric_leaves(info.annotation, path)
    return found


def numeric_leaves(annotation: Any, path: str) -> list[tuple[str, str]]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in numeric_leaves(arg, path)]
    if origin is list:
        return numeric_leaves(typing.get_args(annotation)[0], f"{path}.0")
    if origin is dict:
        name = "a" if path == "tasks" else "k"  # the fixture's one task
        return numeric_leaves(typing.get_args(annotation)[1], f"{path}.{name}")
    if annotation is float:
        return [(path, "float")]
    if annotation is int:
        return [(path, "int")]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        leaves = numeric_settings(annotation, path)
        if issubclass(annotation, MethodConfig):  # a method's own parameters are numbers too
            leaves += [(f"{path}.temperature", "float"), (f"{path}.some_parameter", "float")]
        return leaves
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):  # a dataclass group (EarlyStopping)
        hints = typing.get_type_hints(annotation)
        return [
            leaf for f in dataclasses.fields(annotation) for leaf in numeric_leaves(hints[f.name], f"{path}.{f.name}")
        ]
    return []


NUMERIC = numeric_settings(Config, "")
FLOAT32_MAX = 3.4028234663852886e38
BASE = {
    "run": {"name": "fuzz"},
    "model": {"backbone": "unused", "max_length": 32},
    "training": {"steps": 5, "batch_size": 4},
    "tasks": {"a": {"type": "classification", "source": {"format": "jsonl", "train": "x.jsonl"}}},
}


def test_the_schema_walk_finds_the_settings_of_every_group():
    paths = dict(NUMERIC)
    for path, kind in [
        ("training.lr", "float"),
        ("training.schedule.fractions.0", "float"),
        ("training.early_stopping.min_delta", "float"),
        ("guard.baselines.k", "float"),
        ("tasks.a.sampling_weight", "float"),
        ("tasks.a.max_rows.train", "int"),
        ("model.peft.dropout", "float"),
        ("gradient_aggregation.temperature", "float"),
        ("run.seed", "int"),
    ]:
        assert paths.get(path) == kind, path
    assert len(NUMERIC) > 50


def setting(config: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = config
    for part, after in itertools.pairwise(parts):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = [None] if after == "0" else {}
        if part in ("sampling", "loss_weighting", "gradient_aggregation", "architecture"):
            node[part].setdefault("name", "equal" if part == "loss_weighting" else "hard")
        if part == "discover":  # the group's required source, as the fixture's task has one
            node[part].setdefault("source", {"format": "unified", "train": "x.jsonl"})
        node = node[part]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


bad_floats = st.one_of(
    st.sampled_from([math.inf, -math.inf, math.nan]),
    st.floats(min_value=FLOAT32_MAX * 1.0001, allow_infinity=True),
    st.floats(max_value=-FLOAT32_MAX * 1.0001, allow_infinity=True),
)
bad_ints = st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1))


def yaml_line(text: str, path: str) -> int:
    """The line of a key path's key (or list item), read with PyYAML's own composer."""
    node: Any = yaml.compose(text)
    line = 0
    for part in path.split("."):
        if isinstance(node, yaml.SequenceNode):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            key, node = next((k, v) for k, v in node.value if k.value == part)
            line = key.start_mark.line + 1
    return line


@FUZZ
@given(data=st.data(), chosen=st.sampled_from(NUMERIC), route=st.sampled_from(["file", "override"]))
def test_a_non_finite_or_overflowing_number_in_any_setting_is_refused(data, chosen, route):
    path, kind = chosen
    value = data.draw(bad_floats if kind == "float" else bad_ints)
    config = json.loads(json.dumps(BASE))
    setting(config, path, value)
    group = path.split(".")[0]
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "c.yaml"
        overrides: list[str] = []
        if route == "override":  # the whole group on the command line, in YAML flow style
            text = yaml.safe_dump(config[group], default_flow_style=True, width=10**6).strip()
            overrides = [f"{group}={text}"]
            config.pop(group)
        text = yaml.safe_dump(config, sort_keys=False)
        file.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_config(file, overrides)
    error = caught.value
    assert error.field == path, (str(error), value)
    if route == "override":
        assert error.file == "override"
    else:
        assert (error.file, error.line) == (str(file), yaml_line(text, path))


# Anything at all as a run folder's config.yaml: `multitune resume` says one line and touches nothing.
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10))
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)
group_names = st.sampled_from(["run", "model", "training", "tasks", "sampling", "guard", "bogus"])
foreign = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: yaml.safe_dump(v).encode()),
    st.dictionaries(group_names, json_values, max_size=4).map(lambda v: yaml.safe_dump(v).encode()),
    st.dictionaries(group_names, json_values, max_size=4).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=foreign)
def test_resume_of_a_folder_with_any_config_yaml_is_one_line(content):
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        run.mkdir()
        (run / "config.yaml").write_bytes(content)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["resume", str(run)])
        assert code == 2
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith(f"multitune: error: {run}"), err.getvalue()
        assert [p.name for p in run.iterdir()] == ["config.yaml"] and (run / "config.yaml").read_bytes() == content


@pytest.mark.parametrize("content", [b"- a\n", b"", b"tasks: {}\ntasks: {}\n", b"run: 3\n", b"\xff\xfe\x00junk"])
def test_every_reader_of_a_finished_run_refuses_a_foreign_config_in_one_line(
    tmp_path, tiny_backbone, write_jsonl, capsys, content
):
    """evaluate (and predict, serve, export: the same loader) and training with run.resume pointing at it."""
    a = write_jsonl("a.jsonl", classification_rows(20))
    b = write_jsonl("b.jsonl", token_rows(20))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=2, eval_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "runs" / "tiny"
    (run / "config.yaml").write_bytes(content)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    resumed = tmp_path / "resume.yaml"
    resumed.write_text(yaml.safe_dump({**config, "run": {**config["run"], "resume": str(run)}}), encoding="utf-8")
    for argv in (["evaluate", str(run)], ["resume", str(run)], ["train", str(resumed)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"multitune: error: {run / 'config.yaml'}"), (argv, err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_multitune_train_on_a_billion_laughs_exits_2_in_one_line_with_bounded_memory(tmp_path):
    """The 342-byte file of nine levels of nine aliases: once a hang past 3.9 GB."""
    import subprocess
    import sys

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)),
        encoding="utf-8",
    )
    assert len(bomb.read_bytes()) == 342
    # a wrapper process whose only child is multitune, so its children's peak memory is multitune's
    wrapper = (
        "import resource, subprocess, sys\n"
        "command = [sys.executable, '-m', 'multitune', 'train', sys.argv[1]]\n"
        "done = subprocess.run(command, capture_output=True, text=True)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stdout.write(done.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, str(bomb)], capture_output=True, text=True, timeout=120)
    status, _, stderr = done.stdout.partition("\n")
    code, peak_kib = map(int, status.split())
    assert code == 2 and stderr.count("\n") == 1, done.stdout
    assert stderr.startswith(f"multitune: error: {bomb}:") and "more than 100000 values" in stderr, stderr
    assert peak_kib < 1_500_000, peak_kib  # torch's import included
