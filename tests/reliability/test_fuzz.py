"""Property-based tests: malformed data files and configs always give one clear line, never a traceback.

Several hundred generated cases per run: broken JSON, wrong types, missing fields, non-UTF-8 bytes, long
lines, empty files, unknown labels, token/tag count mismatches, over every reader; and random edits of a
valid config. Through the CLI: exit code 2, and an earlier run directory is never touched.
"""

import contextlib
import io
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitune.cli import main
from multitune.config import validate_config
from multitune.data.tasks import load_tasks
from multitune.errors import MultitunError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

texts = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
labels = st.sampled_from(["pos", "neg"])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), texts)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=6
)


@st.composite
def classification_line(draw):
    kind = draw(
        st.sampled_from(["valid", "valid", "valid", "broken", "type", "missing", "bytes", "long", "blank", "array"])
    )
    record = {"text": draw(texts), "label": draw(labels)}
    if kind == "broken":
        return json.dumps(record)[: draw(st.integers(0, 10))].encode()
    if kind == "type":
        record[draw(st.sampled_from(["text", "label"]))] = draw(json_values)
    if kind == "missing":
        del record[draw(st.sampled_from(["text", "label"]))]
    if kind == "bytes":
        return json.dumps(record).encode()[:5] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80\x80"])) + b'"}'
    if kind == "long":
        record["text"] = "x" * draw(st.integers(10_000, 200_000))
    if kind == "blank":
        return b"   "
    if kind == "array":
        return json.dumps([record]).encode()
    return json.dumps(record).encode()


@st.composite
def token_line(draw):
    n = draw(st.integers(1, 5))
    tokens = draw(
        st.lists(st.text(min_size=1, max_size=6).filter(lambda t: t.strip() == t and t), min_size=n, max_size=n)
    )
    tags = draw(st.lists(st.sampled_from(["O", "B-x", "I-x", "B-y"]), min_size=n, max_size=n))
    kind = draw(st.sampled_from(["valid", "valid", "mismatch", "type", "tags-type"]))
    if kind == "mismatch":
        tags = tags + ["O"] * draw(st.integers(1, 2)) if draw(st.booleans()) else tags[:-1]
    if kind == "type":
        tokens = draw(json_values)
    if kind == "tags-type":
        tags = draw(json_values)
    return json.dumps({"tokens": tokens, "tags": tags}).encode()


@st.composite
def delimited_file(draw):
    rows = draw(st.lists(st.tuples(labels, texts), max_size=8))
    lines = [f"{label}\t{text}".encode() for label, text in rows]
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from([b"only-one-column", b"\xff\xfe\tbroken", b'"unterminated\tquote', b""]))
        lines.insert(draw(st.integers(0, len(lines))), mutation)
    return b"\n".join(lines)


@st.composite
def conll_file(draw):
    sentences = []
    for _ in range(draw(st.integers(0, 4))):
        n = draw(st.integers(1, 4))
        words = [
            f"{draw(st.sampled_from(['a', 'b', 'Paris', '@x']))}\t{draw(st.sampled_from(['O', 'B-loc', 'I-loc', 'X']))}"
            for _ in range(n)
        ]
        if draw(st.booleans()):
            words[0] = draw(st.sampled_from(["lonely", "\xff", "a\tb\tc", " \t "]))
        sentences.append("\n".join(words))
    return "\n\n".join(sentences).encode("utf-8", "surrogatepass")


def assert_clean(call):
    """`call()` succeeds, or fails with a MultitunError that prints as one line."""
    try:
        call()
    except MultitunError as error:
        text = str(error)
        assert text and "\n" not in text and "Traceback" not in text, text


def task_config(kind, fmt, train, test=None, **extra):
    source = {"format": fmt, "train": str(train), **({"test": str(test)} if test else {}), **extra.pop("source", {})}
    return {"type": kind, "source": source, **extra}


def load(tasks):
    config = validate_config({"model": {"backbone": "unused"}, "tasks": tasks})
    load_tasks(config.tasks, seed=0)


@FUZZ
@given(
    train=st.lists(classification_line(), max_size=8),
    test=st.lists(classification_line(), max_size=4),
    given_labels=st.booleans(),
)
def test_jsonl_classification_files(train, test, given_labels):
    with tempfile.TemporaryDirectory() as folder:
        train_path, test_path = Path(folder) / "train.jsonl", Path(folder) / "test.jsonl"
        train_path.write_bytes(b"\n".join(train))
        test_path.write_bytes(b"\n".join(test))
        extra = {"labels": ["pos", "neg"]} if given_labels else {}
        assert_clean(lambda: load({"t": task_config("classification", "jsonl", train_path, test_path, **extra)}))


@FUZZ
@given(train=st.lists(token_line(), max_size=6), scheme=st.sampled_from(["iob1", "iob2"]))
def test_jsonl_token_files(train, scheme):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        path.write_bytes(b"\n".join(train))
        config = task_config(
            "token_classification", "jsonl", path, text_fields=["tokens"], label_field="tags", tag_scheme=scheme
        )
        assert_clean(lambda: load({"t": config}))


@FUZZ
@given(content=delimited_file(), quoting=st.sampled_from(["minimal", "none"]), header=st.booleans())
def test_tsv_files(content, quoting, header):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.tsv"
        path.write_bytes(content)
        config = task_config(
            "classification", "tsv", path, text_fields=[1], label_field=0, source={"quoting": quoting, "header": header}
        )
        assert_clean(lambda: load({"t": config}))


@FUZZ
@given(content=conll_file())
def test_conll_files(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.conll"
        path.write_bytes(content)
        assert_clean(lambda: load({"t": task_config("token_classification", "conll", path)}))


@FUZZ
@given(
    records=st.lists(
        st.dictionaries(st.sampled_from(["task", "input", "output", "instruction"]), json_values, max_size=4),
        max_size=6,
    )
)
def test_unified_files(records):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mix.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tasks = {
            "a": task_config("classification", "unified", path),
            "b": task_config("regression", "unified", path, text_fields=["x", "y"]),
        }
        assert_clean(lambda: load(tasks))


VALID = {
    "run": {"name": "fuzz", "seed": 1},
    "model": {"backbone": "unused", "max_length": 32},
    "training": {"steps": 5, "batch_size": 4},
    "sampling": {"name": "temperature", "temperature": 2.0},
    "tasks": {"a": {"type": "classification", "source": {"format": "jsonl", "train": "x.jsonl"}}},
}
key_paths = st.lists(
    st.sampled_from(
        [
            "run",
            "model",
            "training",
            "sampling",
            "loss_weighting",
            "gradient_aggregation",
            "tasks",
            "a",
            "source",
            "name",
            "steps",
            "type",
            "format",
            "temperature",
            "bogus",
            "labels",
            "metrics",
            "max_rows",
        ]
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(edits=st.lists(st.tuples(key_paths, st.one_of(json_values, st.just("__delete__"))), min_size=1, max_size=3))
def test_config_edits(edits):
    config = json.loads(json.dumps(VALID))
    for path, value in edits:
        node = config
        for key in path[:-1]:
            child = node.get(key) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                child = {}
                if isinstance(node, dict):
                    node[key] = child
            node = child
        if isinstance(node, dict):
            if value == "__delete__":
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    assert_clean(lambda: validate_config(config, file="fuzz.yaml"))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(train=st.lists(classification_line(), max_size=5), edit=st.sampled_from([None, "steps", "name", "bogus"]))
def test_cli_exit_code_and_earlier_run_untouched(train, edit):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        earlier = root / "runs" / "fuzz"
        earlier.mkdir(parents=True)
        (earlier / "metrics.json").write_text('{"earlier": true}', encoding="utf-8")
        (root / "train.jsonl").write_bytes(b"\n".join(train))
        config = json.loads(json.dumps(VALID))
        config["run"]["output_dir"] = str(root / "runs")
        config["model"]["backbone"] = str(root / "no-model")  # valid data still ends in a clean error
        config["tasks"]["a"]["source"]["train"] = str(root / "train.jsonl")
        if edit == "steps":
            config["training"]["steps"] = "many"
        elif edit == "name":
            config["run"]["name"] = "../escape"
        elif edit == "bogus":
            config["training"]["bogus"] = 1
        (root / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["train", str(root / "c.yaml")])
        assert code == 2
        lines = [line for line in err.getvalue().splitlines() if line.startswith("multitune:")]
        assert len(lines) == 1 and "Traceback" not in err.getvalue()
        assert sorted(p.name for p in (root / "runs").iterdir()) == ["fuzz"]
        assert list(earlier.iterdir()) == [earlier / "metrics.json"]
        assert (earlier / "metrics.json").read_text() == '{"earlier": true}'
