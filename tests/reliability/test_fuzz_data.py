"""Property-based tests: data that would silently train as something else is refused at its exact line.

Each generator builds files that mix valid lines with one kind of bad line, over every reader where the kind
can occur: rows with more or fewer cells than the header or `columns` (csv, tsv; every quoting mode),
CoNLL lines without a tag, lone surrogates (JSON escapes, and decoders such as utf-7 that let them through:
jsonl, unified, csv, tsv, conll, parallel, prediction input on standard input), JSON nested past the limit,
undecodable standard input, and Hugging Face class ids -1 / None (labels and tag sequences). The expected
outcome is worked out from the generated content alone: which line is the first bad one, or which labels
the split must yield.
"""

import base64
import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitune.catalogue import validate_config
from multitune.data.generative import read_parallel
from multitune.data.readers import read_conll, read_delimited, read_jsonl, read_unified
from multitune.data.tasks import load_tasks
from multitune.errors import DataError
from multitune.runs.predict import _rows

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
SLOW_FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

words = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=8).filter(lambda t: t.strip() == t and t)


def first_error(call):
    """The DataError `call()` raises, or None; any other exception fails the test."""
    try:
        call()
    except DataError as error:
        assert "\n" not in str(error)
        str(error).encode("utf-8")  # printable: the error itself holds no lone surrogate
        return error
    return None


# --- cells against the header --------------------------------------------------------------------------


@st.composite
def delimited_file(draw):
    """(content, delimiter, quoting, header, columns, rows of cells): cells may hold the delimiter where
    quoting keeps it inside the cell; the writer quotes them, so each row has exactly its cells."""
    delimiter = draw(st.sampled_from([",", "\t", ";"]))
    quoting = draw(st.sampled_from(["minimal", "none", "all"]))
    width = draw(st.integers(1, 4))
    names = [f"c{i}" for i in range(width)]
    cell = words if quoting == "none" else st.one_of(words, st.builds(lambda a, b: f"{a}{delimiter}{b}", words, words))
    rows = draw(st.lists(st.lists(cell, min_size=width, max_size=width), max_size=8))
    for _ in range(draw(st.integers(0, 2)) if rows else 0):  # some rows wider or narrower than the header
        row = rows[draw(st.integers(0, len(rows) - 1))]
        if draw(st.booleans()) or len(row) == 1:
            row.extend(draw(st.lists(cell, min_size=1, max_size=3)))
        else:
            del row[draw(st.integers(1, len(row) - 1)) :]
    header = draw(st.booleans())
    buffer = io.StringIO()
    mode = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE, "all": csv.QUOTE_ALL}[quoting]
    writer = csv.writer(buffer, delimiter=delimiter, quoting=mode, lineterminator="\n", escapechar=None)
    if header:
        writer.writerow(names)
    writer.writerows(rows)
    return buffer.getvalue(), delimiter, quoting, header, names, rows


@FUZZ
@given(case=delimited_file())
def test_every_row_has_as_many_cells_as_the_header(case):
    content, delimiter, quoting, header, names, rows = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.csv"
        path.write_text(content, encoding="utf-8")
        columns = None if header else names
        read = []
        error = first_error(lambda: read.extend(read_delimited(str(path), delimiter, quoting, True, columns)))
        offset = 2 if header else 1  # the line of rows[0]
        wrong = next((i for i, cells in enumerate(rows) if len(cells) != len(names)), None)
        if wrong is None:
            assert error is None
            assert [r.values for r in read] == [dict(zip(names, cells, strict=True)) for cells in rows]
            assert [r.line for r in read] == [offset + i for i in range(len(rows))]
        else:
            named = "the header has" if header else "'columns' names"
            assert error is not None and error.file == str(path) and error.line == offset + wrong
            assert error.message == f"row has {len(rows[wrong])} cells, {named} {len(names)}"


# --- CoNLL lines without a tag -------------------------------------------------------------------------

CONLL_LINES = {  # line -> (cells as split by tabs), the reader's view
    "ok": "{w}\t{t}",
    "three": "{w}\tNN\t{t}",
    "one": "{w}",
    "one-spaced": "{w}  ",
    "empty-tag": "{w}\t",
    "blank-tag": "{w}\t \t",
    "empty-token": "\t{t}",
    "wide-empty-tag": "{w}\t{t}\t",
}


def conll_line_is_bad(line, token_column, tag_column):
    cells = line.split("\t") if "\t" in line else line.split()
    n = len(cells)
    if not (-n <= token_column < n and -n <= tag_column < n) or token_column % n == tag_column % n:
        return True
    return not cells[token_column].strip() or not cells[tag_column].strip()


@st.composite
def conll_file(draw):
    sentences = []
    for _ in range(draw(st.integers(1, 4))):
        lines = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["ok", "ok", "ok", "three", *CONLL_LINES]))
            word = draw(words.filter(lambda w: " " not in w))
            tag = draw(st.sampled_from(["O", "B-loc", "I-loc"]))
            lines.append(CONLL_LINES[kind].format(w=word, t=tag))
        sentences.append(lines)
    return sentences


@FUZZ
@given(sentences=conll_file(), columns=st.sampled_from([(0, -1), (0, 1), (1, -1), (0, 2), (-2, -1)]))
def test_every_conll_line_has_a_token_and_a_tag(sentences, columns):
    numbered, lines = [], []
    for sentence in sentences:
        for line in sentence:
            lines.append(line)
            numbered.append((len(lines), line))
        lines.append("")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.conll"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        read = []
        error = first_error(lambda: read.extend(read_conll(str(path), *columns)))
        bad = next((number for number, line in numbered if conll_line_is_bad(line, *columns)), None)
        if bad is None:
            assert error is None and len(read) == len(sentences)
            for row, sentence in zip(read, sentences, strict=True):
                cells = [line.split("\t") for line in sentence]
                assert row.values == {
                    "tokens": [c[columns[0]].strip() for c in cells],
                    "tags": [c[columns[1]].strip() for c in cells],
                }
        else:
            assert error is not None and (error.file, error.line) == (str(path), bad), str(error)
            assert error.message.startswith(("line has", "empty token", "empty tag"))


# --- lone surrogates, in every reader ------------------------------------------------------------------


def _jsonl(texts):
    return [json.dumps({"text": t, "label": "a"}) for t in texts]


def _unified(texts):
    return [json.dumps({"task": "t", "input": t, "output": "a"}) for t in texts]


JSON_READERS = {
    "jsonl": (_jsonl, lambda path: read_jsonl(path)),
    "unified": (_unified, lambda path: read_unified(path)),
    "stdin": (_jsonl, lambda path: _rows(io.StringIO(Path(path).read_text(encoding="utf-8")), "<stdin>")),
}


@FUZZ
@given(
    texts=st.lists(words, min_size=1, max_size=6),
    at=st.integers(0, 5),
    surrogate=st.integers(0xD800, 0xDFFF),
    reader=st.sampled_from(sorted(JSON_READERS)),
    pair=st.booleans(),
)
def test_a_json_escape_of_a_lone_surrogate_is_refused(texts, at, surrogate, reader, pair):
    at = at % len(texts)
    lines, read = JSON_READERS[reader]
    records = lines([text + "Q" for text in texts])  # Q marks where each text's escape goes
    pair_escape = "\\ud83d\\ude00" if pair else ""  # a valid escaped pair (U+1F600) elsewhere is text
    records = [r.replace("Q", f"\\u{surrogate:04x}" if i == at else pair_escape) for i, r in enumerate(records)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text("\n".join(records) + "\n", encoding="utf-8")
        error = first_error(lambda: list(read(str(path))))
        assert error is not None and error.line == at + 1, str(error)
        assert error.message.startswith(f"not valid text: a lone surrogate U+{surrogate:04X}")


def _encoded_surrogate(encoding, code):
    """The bytes that `encoding` decodes to the lone code point: utf-7's base64 of UTF-16, or an escape."""
    if encoding == "utf-7":
        return b"+" + base64.b64encode(code.to_bytes(2, "big")).rstrip(b"=") + b"-"
    return f"\\u{code:04x}".encode()


TEXT_READERS = {  # content of one line from its words; the reader
    "csv": (lambda w: f"{w},a", lambda p, e: read_delimited(p, ",", header=False, encoding=e)),
    "tsv": (lambda w: f"{w}\ta", lambda p, e: read_delimited(p, "\t", quoting="none", header=False, encoding=e)),
    "conll": (lambda w: f"{w}\tO\n", lambda p, e: read_conll(p, encoding=e)),
    "jsonl": (lambda w: json.dumps({"text": w}), lambda p, e: read_jsonl(p, e)),
    "parallel": (lambda w: w, lambda p, e: read_parallel(p, p, e)),
}


@FUZZ
@given(
    texts=st.lists(words.filter(lambda w: "+" not in w), min_size=1, max_size=6),
    at=st.integers(0, 5),
    surrogate=st.integers(0xD800, 0xDFFF),
    reader=st.sampled_from(sorted(TEXT_READERS)),
    encoding=st.sampled_from(["utf-7", "raw_unicode_escape"]),
)
def test_a_decoded_lone_surrogate_is_refused_in_every_text_reader(texts, at, surrogate, reader, encoding):
    at = at % len(texts)
    line_of, read = TEXT_READERS[reader]
    lines = [line_of(t).encode() for t in texts]
    lines[at] = line_of(texts[at] + "Z").encode().replace(b"Z", _encoded_surrogate(encoding, surrogate))
    expected_line = 1 + sum(line.count(b"\n") + 1 for line in lines[:at])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data"
        path.write_bytes(b"\n".join(lines) + b"\n")
        error = first_error(lambda: list(read(str(path), encoding)))
        assert error is not None and (error.file, error.line) == (str(path), expected_line), str(error)
        assert error.message.startswith(f"not valid text: a lone surrogate U+{surrogate:04X}")


# --- JSON nesting ----------------------------------------------------------------------------------------


def nested(depth, dicts):
    """A JSON text `depth - 1` containers deep (the row object around it is the first level)."""
    opening = "".join('{"k": ' if dicts and i % 2 else "[" for i in range(depth - 1))
    closing = "".join("}" if dicts and i % 2 else "]" for i in reversed(range(depth - 1)))
    return opening + '"x"' + closing


@FUZZ
@given(
    depth=st.one_of(st.integers(1, 250), st.sampled_from([1_000, 3_000, 100_000])),
    dicts=st.booleans(),
    before=st.integers(0, 3),
    reader=st.sampled_from(sorted(JSON_READERS)),
)
def test_json_nesting_is_refused_past_the_limit_in_every_json_reader(depth, dicts, before, reader):
    lines, read = JSON_READERS[reader]
    records = lines(["ok"] * (before + 1))
    records[before] = records[before].replace('"ok"', nested(depth, dicts), 1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text("\n".join(records) + "\n", encoding="utf-8")
        error = first_error(lambda: list(read(str(path))))
        if depth <= 100:
            assert error is None
        else:
            assert error is not None and error.line == before + 1, str(error)
            assert error.message == "JSON nested deeper than 100 levels"


@FUZZ
@given(
    lines=st.lists(st.text(alphabet="abcé€😀 ", max_size=60), min_size=1, max_size=400),
    at=st.integers(0, 399),
    junk=st.sampled_from([b"\xff", b"\xc3(", b"\x80", b"\xed\xa0\x80"]),
    newline=st.sampled_from([b"\n", b"\r\n"]),
)
def test_undecodable_standard_input_names_its_line(lines, at, junk, newline):
    at = at % len(lines)
    raw = [json.dumps({"text": text}, ensure_ascii=False).encode() for text in lines]
    raw[at] = raw[at][:-2] + junk + raw[at][-2:]
    stdin = io.TextIOWrapper(io.BytesIO(newline.join(raw) + newline), encoding="utf-8")
    error = first_error(lambda: list(_rows(stdin, "<stdin>")))
    assert error is not None and (error.file, error.line) == ("<stdin>", at + 1), str(error)
    assert error.message.startswith("bytes that are not utf-8")


# --- Hugging Face class ids -1 / None ---------------------------------------------------------------------

NAMES = ["entailment", "not_entailment", "neutral"]
TAGS = ["O", "B-loc", "I-loc"]


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """Builder caches go to a folder of this module, not the user's."""
    import datasets

    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))
    yield
    patch.undo()


def _save(folder, values, tags):
    import datasets

    if tags:
        features = datasets.Features(
            {
                "tokens": datasets.Sequence(datasets.Value("string")),
                "label": datasets.Sequence(datasets.ClassLabel(names=TAGS)),
            }
        )
        columns = {"tokens": [["w"] * len(v) for v in values], "label": values}
    else:
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)})
        columns = {"text": [f"row {i}" for i in range(len(values))], "label": values}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder))
    return str(Path(folder) / "data-00000-of-00001.arrow")


def expected_outcome(splits, tags):
    """("error", split, line or None) for the first refused split, else ("ok", {split: labels})."""
    out = {}
    for split in ("train", "validation", "test"):
        values = splits[split]
        hidden = []
        for line, value in enumerate(values, start=1):
            ids = value if tags else [value]
            flags = [v is None or v == -1 for v in ids]
            if tags and any(flags) and not all(flags):
                return ("error", split, line)  # a partly hidden tag sequence
            hidden.append(all(flags))
        if any(hidden) and not all(hidden):
            return ("error", split, hidden.index(True) + 1)
        if all(hidden):
            if split != "test":
                return ("error", split, None)
            continue  # an unlabelled test split: left out
        out[split] = [tuple(TAGS[v] for v in value) if tags else NAMES[value] for value in values]
    return ("ok", out)


ids = st.sampled_from([-1, None, 0, 1, 2])


@SLOW_FUZZ
@given(
    tags=st.booleans(),
    data=st.data(),
)
def test_hidden_class_ids_are_never_read_as_a_class(hf_cache, tags, data):
    value = st.lists(ids, min_size=1, max_size=3) if tags else ids
    splits = {
        split: data.draw(
            st.one_of(
                st.lists(value, min_size=1, max_size=4),
                st.lists(st.just(-1 if not tags else [-1]), min_size=1, max_size=3),
            )
        )
        for split in ("train", "validation", "test")
    }
    with tempfile.TemporaryDirectory() as folder:
        files = {split: _save(Path(folder) / split, values, tags) for split, values in splits.items()}
        task = {
            "type": "token_classification" if tags else "classification",
            "source": {"format": "hf", "dataset": "arrow", "data_files": files},
            "labels": TAGS if tags else NAMES,
            **({"text_fields": ["tokens"]} if tags else {}),
        }
        config = validate_config({"model": {"backbone": "unused"}, "tasks": {"t": task}})
        loaded = {}
        error = first_error(lambda: loaded.update(load_tasks(config.tasks, seed=0)))
        expected = expected_outcome(splits, tags)
        if expected[0] == "error":
            _, split, line = expected
            assert error is not None and (error.file, error.line) == (f"arrow[{split}]", line), str(error)
            assert error.field == "label"
        else:
            assert error is None, str(error)
            got = {split: [e.label for e in rows] for split, rows in loaded["t"].splits.items()}
            assert got == expected[1]
            assert ("test" in got) != any("not scored" in note for note in loaded["t"].notes)


# --- through the command line ----------------------------------------------------------------------------


def _bad_sources(folder):
    """kind -> (task config, the file:line the error must name): one of each new kind."""
    folder = Path(folder)
    (folder / "train.csv").write_text("text,label\nbad,negative\ni loved it, really,positive\n", encoding="utf-8")
    (folder / "train.conll").write_text("John\tB-per\nParis\n", encoding="utf-8")
    (folder / "surrogate.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "\\ud800", "label": "y"}\n')
    (folder / "nested.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": ' + "[" * 9_000 + "]" * 9_000 + "}\n")
    (folder / "stars.jsonl").write_text("".join(json.dumps({"text": "a", "label": v}) + "\n" for v in (1, 0)))
    (folder / "huge.jsonl").write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": 1e308}\n')
    (folder / "bool.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": true}\n')
    classification = {"type": "classification"}
    return {
        "cells": ({**classification, "source": {"format": "csv", "train": str(folder / "train.csv")}}, "train.csv:3"),
        "conll": (
            {"type": "token_classification", "source": {"format": "conll", "train": str(folder / "train.conll")}},
            "train.conll:2",
        ),
        "surrogate": (
            {**classification, "source": {"format": "jsonl", "train": str(folder / "surrogate.jsonl")}},
            "surrogate.jsonl:2",
        ),
        "nested": (
            {**classification, "source": {"format": "jsonl", "train": str(folder / "nested.jsonl")}},
            "nested.jsonl:2",
        ),
        "digits": (
            {
                **classification,
                "source": {"format": "jsonl", "train": str(folder / "stars.jsonl")},
                "labels": ["1", "2"],
            },
            "stars.jsonl:2",
        ),
        "huge": (
            {"type": "regression", "source": {"format": "jsonl", "train": str(folder / "huge.jsonl")}},
            "huge.jsonl:2",
        ),
        "boolean": (
            {**classification, "source": {"format": "jsonl", "train": str(folder / "bool.jsonl")}},
            "bool.jsonl:2",
        ),
    }


@pytest.mark.parametrize("kind", ["cells", "conll", "surrogate", "nested", "digits", "huge", "boolean"])
def test_the_cli_exits_2_with_one_line_and_leaves_an_earlier_run_alone(tmp_path, capsys, kind):
    import yaml

    from multitune.cli import main

    task, where = _bad_sources(tmp_path)[kind]
    earlier = tmp_path / "runs" / "r"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text('{"earlier": true}', encoding="utf-8")
    config = {
        "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
        "model": {"backbone": str(tmp_path / "no-model")},
        "tasks": {"t": task},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("multitune:")]
    assert len(lines) == 1 and "Traceback" not in err and f"{tmp_path / where}: " in lines[0], err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]
    assert list(earlier.iterdir()) == [earlier / "metrics.json"]


_keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6)
_leaf = st.one_of(st.text(max_size=5), st.integers(-9, 9), st.booleans(), st.none())


@st.composite
def _object_text(draw, duplicate: bool) -> str:
    """A JSON object's text, nested up to three levels; with `duplicate`, one object somewhere repeats a key."""

    def render(depth: int, plant: bool) -> str:
        names = draw(st.lists(_keys, min_size=1 if plant else 0, max_size=4, unique=True))
        into = draw(st.integers(0, len(names))) if plant and depth < 3 else len(names)  # a child object, or here
        parts = []
        for i, name in enumerate(names):
            child = render(depth + 1, plant and i == into) if (i == into or draw(st.booleans())) and depth < 3 else None
            parts.append(f"{json.dumps(name)}: {child if child is not None else json.dumps(draw(_leaf))}")
        if plant and into == len(names):
            parts.append(f"{json.dumps(names[-1])}: {json.dumps(draw(_leaf))}")  # the key again, in this object
        return "{" + ", ".join(parts) + "}"

    return render(0, duplicate)


@FUZZ
@given(st.booleans(), st.data())
def test_a_key_repeated_in_any_object_of_a_json_row_is_refused_at_its_line(duplicate, data):
    row = data.draw(_object_text(duplicate))
    lines = ['{"ok": 1}', row]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        for read in (
            lambda: list(read_jsonl(str(path))),
            lambda: list(_rows(io.StringIO("\n".join(lines)), "<stdin>")),
        ):
            if duplicate:
                with pytest.raises(DataError, match=r":2: the key .* appears twice in one object$"):
                    read()
            else:
                assert read()[1].values == json.loads(row)
