"""Property-based tests: malformed data files and configs always give one clear line, never a traceback.

Several hundred generated cases per run: broken JSON, wrong types, missing fields, non-UTF-8 bytes, long
lines, empty files, unknown labels, token/tag count mismatches, over every reader (a line that is certainly
malformed must fail at that file and line); random edits of a valid config, as data and as YAML text.
Through the CLI: exit code 2, and an earlier run directory is never touched.
"""

import contextlib
import io
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitune.catalogue import load_config, validate_config
from multitune.cli import main
from multitune.data.tasks import load_tasks
from multitune.errors import MultitunError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

texts = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
labels = st.sampled_from(["pos", "neg"])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), texts)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=6
)


# A generated line is (bad, bytes): bad is True for a line no reader may accept, False for a valid one, None
# where it depends on the drawn value (a wrong type may still be a string). A file with a bad line must fail
# at that line or earlier: a reader that skipped broken lines silently would fail these tests.
@st.composite
def classification_line(draw):
    kind = draw(
        st.sampled_from(["valid", "valid", "valid", "broken", "type", "missing", "bytes", "long", "blank", "array"])
    )
    record = {"text": draw(texts), "label": draw(labels)}
    if kind == "broken":
        return True, json.dumps(record)[: draw(st.integers(1, 10))].encode()
    if kind == "type":
        record[draw(st.sampled_from(["text", "label"]))] = draw(json_values)
        return None, json.dumps(record).encode()
    if kind == "missing":
        del record[draw(st.sampled_from(["text", "label"]))]
        return True, json.dumps(record).encode()
    if kind == "bytes":
        return True, json.dumps(record).encode()[:5] + draw(
            st.sampled_from([b"\xff", b"\xc3\x28", b"\x80\x80"])
        ) + b'"}'
    if kind == "long":
        record["text"] = "x" * draw(st.integers(10_000, 200_000))
    if kind == "blank":
        return False, b"   "
    if kind == "array":
        return True, json.dumps([record]).encode()
    return False, json.dumps(record).encode()


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
    bad = {"valid": False, "mismatch": True}.get(kind)
    return bad, json.dumps({"tokens": tokens, "tags": tags}).encode()


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
    """`call()` succeeds, or fails with a MultitunError that prints as one line (returned)."""
    try:
        call()
    except MultitunError as error:
        text = str(error)
        assert text and "\n" not in text and "Traceback" not in text, text
        return error
    return None


def assert_fails_at_first_bad_line(error, lines, path):
    """Where a line no reader may accept is present, the error names this file and that line or an earlier one."""
    first_bad = next((number for number, (bad, _) in enumerate(lines, start=1) if bad), None)
    if first_bad is not None:
        assert error is not None, f"line {first_bad} is malformed but the file loaded"
        assert error.file == str(path) and error.line is not None and error.line <= first_bad, str(error)


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
        train_path.write_bytes(b"\n".join(line for _, line in train))
        test_path.write_bytes(b"\n".join(line for _, line in test))
        extra = {"labels": ["pos", "neg"]} if given_labels else {}
        error = assert_clean(
            lambda: load({"t": task_config("classification", "jsonl", train_path, test_path, **extra)})
        )
        assert_fails_at_first_bad_line(error, train, train_path)


@FUZZ
@given(train=st.lists(token_line(), max_size=6), scheme=st.sampled_from(["iob1", "iob2"]))
def test_jsonl_token_files(train, scheme):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        path.write_bytes(b"\n".join(line for _, line in train))
        config = task_config(
            "token_classification", "jsonl", path, text_fields=["tokens"], label_field="tags", tag_scheme=scheme
        )
        assert_fails_at_first_bad_line(assert_clean(lambda: load({"t": config})), train, path)


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


@st.composite
def mutated_yaml(draw):
    """The valid config as YAML text with random byte edits: stray colons, tabs, brackets, quotes, bad
    indentation, non-UTF-8 bytes, duplicated or cut lines."""
    text = bytearray(yaml.safe_dump({**VALID, "tasks": {"a": {**VALID["tasks"]["a"]}}}).encode())
    pieces = [
        b":",
        b"\t",
        b"[",
        b"{",
        b"'",
        b'"',
        b"  ",
        b"\n  - ",
        b"&a",
        b"*a",
        b"!!python/object:os.system",
        b"\xff",
        b"%",
    ]
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "cut-line", "repeat-line"]))
        if action == "insert":
            text[at:at] = draw(st.sampled_from(pieces))
        elif action == "delete":
            del text[at : at + draw(st.integers(1, 8))]
        else:
            lines = bytes(text).split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines[i : i + 1] = [] if action == "cut-line" else [lines[i], lines[i]]
            text = bytearray(b"\n".join(lines))
    return bytes(text)


@FUZZ
@given(content=mutated_yaml())
def test_config_files_as_text(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_bytes(content)
        error = assert_clean(lambda: load_config(path))
        if error is not None:
            assert error.file == str(path), str(error)
            if "invalid YAML" in error.message:
                assert error.line is not None, str(error)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(train=st.lists(classification_line(), max_size=5), edit=st.sampled_from([None, "steps", "name", "bogus"]))
def test_cli_exit_code_and_earlier_run_untouched(train, edit):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        earlier = root / "runs" / "fuzz"
        earlier.mkdir(parents=True)
        (earlier / "metrics.json").write_text('{"earlier": true}', encoding="utf-8")
        (root / "train.jsonl").write_bytes(b"\n".join(line for _, line in train))
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
