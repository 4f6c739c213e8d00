import json
import re

import pytest

from multitune.data.readers import read_conll, read_delimited, read_hf, read_jsonl, read_unified
from multitune.errors import DataError


def test_jsonl_skips_blank_lines_and_numbers_rows(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x", "label": 1}\n\n   \n{"text": "y", "label": 0}\n', encoding="utf-8")
    rows = list(read_jsonl(str(path)))
    assert [r.line for r in rows] == [1, 4] and rows[1].get("text") == "y"


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        list(read_jsonl(str(path)))
    path.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: expected a JSON object, got list"):
        list(read_jsonl(str(path)))


def test_missing_field_and_missing_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    row = next(read_jsonl(str(path)))
    with pytest.raises(DataError, match=rf"^{path}:1: field 'label': missing field \(this row has: 'text'\)$"):
        row.get("label")
    with pytest.raises(DataError, match="file not found"):
        list(read_jsonl(str(tmp_path / "absent.jsonl")))


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: bytes that are not utf-8-sig"):
        list(read_jsonl(str(path)))
    assert [r.get("text") for r in read_jsonl(str(path), encoding="latin-1")] == ["ok", "café"]


def test_tsv_with_bom_header_and_raw_quotes(tmp_path):
    path = tmp_path / "mrpc.tsv"
    path.write_bytes('\ufeffQuality\t#1 String\t#2 String\n1\tHe said "hi\tShe said "hi"\n'.encode())
    rows = list(read_delimited(str(path), "\t", quoting="none"))
    assert rows[0].get("Quality") == "1" and rows[0].get("#1 String") == 'He said "hi'
    assert rows[0].line == 2


@pytest.mark.parametrize(("delimiter", "name"), [(",", "a.csv"), ("\t", "a.tsv")])
def test_a_quote_that_never_closes_is_reported_on_the_row_it_opened(tmp_path, delimiter, name):
    """The quote opens on line 3; the reader only finds out at the end of the file (line 7)."""
    path = tmp_path / name
    rows = ["text,label", "good,pos", '"open quote,pos', "more,neg", "and,pos", "more,neg", "end,pos"]
    path.write_text("\n".join(row.replace(",", delimiter) for row in rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{name}:3: .*a quoted field opened on this row never closes"):
        list(read_delimited(str(path), delimiter))


def test_csv_quoted_field_spanning_lines_reports_its_first_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,label\n"one\ntwo",a\nthree,b\n', encoding="utf-8")
    rows = list(read_delimited(str(path), ","))
    assert [(r.get("text"), r.line) for r in rows] == [("one\ntwo", 2), ("three", 4)]


def test_headerless_columns_by_index_and_by_given_names(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text("g\tf\t2012\t1\t4.5\tA cat.\tA dog.\textra\n", encoding="utf-8")
    row = next(read_delimited(str(path), "\t", quoting="none", header=False))
    assert (row.get(4), row.get(5), row.get(-1)) == ("4.5", "A cat.", "extra")
    with pytest.raises(DataError, match="row has 8 columns, no column 9"):
        row.get(9)
    names = ["genre", "file", "year", "id", "score", "s1", "s2", "source"]
    named = next(read_delimited(str(path), "\t", header=False, columns=names))
    assert named.get("score") == "4.5" and named.get("source") == "extra"
    for count in (5, 9):  # naming fewer columns than a row has would drop its last cells
        with pytest.raises(DataError, match=rf"^{path}:1: row has 8 cells, 'columns' names {count}$"):
            list(read_delimited(str(path), "\t", header=False, columns=[str(i) for i in range(count)]))


def test_conll_sentences_split_on_whitespace_only_lines(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- O\n\nEmpire\tB-loc\nState\tI-loc\n\t\nhi\tO\n \nx\tO\n", encoding="utf-8")
    rows = list(read_conll(str(path)))
    assert [r.values["tokens"] for r in rows] == [["Empire", "State"], ["hi"], ["x"]]
    assert [r.line for r in rows] == [3, 6, 8]
    path.write_text("lonely\n", encoding="utf-8")
    with pytest.raises(DataError, match=":1: line has 1 column, needs a token"):
        list(read_conll(str(path), token_column=0, tag_column=1))


def test_hf_datasets_local_files(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) + "\n" for i in range(4)), encoding="utf-8"
    )
    rows = list(read_hf("json", "train", data_files={"train": str(path)}))
    assert [r.get("sentence") for r in rows] == ["s0", "s1", "s2", "s3"] and rows[0].line == 1


def test_hf_class_labels_become_names(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=features).save_to_disk(
        str(tmp_path / "ds")
    )
    rows = list(read_hf("arrow", "train", data_files={"train": str(tmp_path / "ds" / "data-00000-of-00001.arrow")}))
    assert [r.get("label") for r in rows] == ["pos", "neg"]


def test_unified_records_need_a_task(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text('{"task": "a", "input": "x", "output": "y"}\n{"input": "x", "output": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: field 'task': missing field"):
        list(read_unified(str(path)))


@pytest.mark.parametrize(
    ("name", "delimiter", "quoting"),
    [("train.csv", ",", "minimal"), ("train.csv", ",", "none"), ("train.csv", ",", "all"), ("train.tsv", "\t", "none")],
)
def test_a_row_with_more_cells_than_the_header_is_refused(tmp_path, name, delimiter, quoting):
    path = tmp_path / name
    rows = ["text,label", '"i hated it",negative', "fine,positive", "i loved it, really,positive", "meh,sadly"]
    path.write_text("".join(r.replace(",", delimiter) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:4: row has 3 cells, the header has 2$"):
        list(read_delimited(str(path), delimiter, quoting=quoting))
    path.write_text("i hated it,negative\ni loved it, really,positive\n".replace(",", delimiter), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: row has 3 cells, 'columns' names 2$"):
        list(read_delimited(str(path), delimiter, quoting=quoting, header=False, columns=["text", "label"]))


def test_a_quoted_delimiter_stays_in_its_cell(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"i loved it, really",positive\n', encoding="utf-8")
    for quoting in ("minimal", "all"):
        assert [r.values for r in read_delimited(str(path), ",", quoting=quoting)] == [
            {"text": "i loved it, really", "label": "positive"}
        ]


def test_a_column_name_given_twice_is_refused(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label,text\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: column name 'text' appears twice$"):
        list(read_delimited(str(path), ","))
    with pytest.raises(DataError, match=rf"^{path}: field 'columns': column name 'x' appears twice$"):
        list(read_delimited(str(path), ",", header=False, columns=["x", "y", "x"]))


@pytest.mark.parametrize(
    ("line", "columns", "message"),
    [
        ("Paris", (0, -1), "line has 1 column, needs a token (column 0) and a tag (column -1) in different columns"),
        ("Paris  ", (0, -1), "line has 1 column, needs a token (column 0) and a tag (column -1) in different columns"),
        ("Paris\tB-loc", (1, -1), "line has 2 columns, needs a token (column 1) and a tag (column -1) in different"),
        ("Paris\tB-loc", (0, 2), "line has 2 columns, needs a token (column 0) and a tag (column 2) in different"),
        ("Paris\t", (0, -1), "empty tag (column -1)"),
        ("Paris\t \t", (0, -1), "empty tag (column -1)"),
        ("Paris\t\u3000\tNNP", (0, 1), "empty tag (column 1)"),
        ("\tNNP\tB-loc", (0, -1), "empty token (column 0)"),
    ],
)
def test_a_conll_line_without_a_tag_is_refused(tmp_path, line, columns, message):
    path = tmp_path / "train.conll"
    path.write_text(f"-DOCSTART- O\n\nThe\tDT\tO\n{line}\n\nok\tDT\tO\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: {re.escape(message)}"):
        list(read_conll(str(path), *columns))


def test_conll_token_and_tag_columns_must_differ(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("a\tO\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: field 'tag_column': token_column and tag_column are both 1$"):
        list(read_conll(str(path), 1, 1))
    assert [r.values for r in read_conll(str(path), 1, 0)] == [{"tokens": ["O"], "tags": ["a"]}]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ('{"text": "caf\\ud800", "label": "a"}', "text"),
        ('{"text": "ok", "label": "\\udfff"}', "label"),
        ('{"text": "ok", "label": "a", "\\ud83d": 1}', r"\\ud83d"),
        ('{"text": ["fine", {"deep": ["x\\udc80"]}], "label": "a"}', "text"),
    ],
)
def test_a_lone_surrogate_in_json_is_refused(tmp_path, record, field):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "\\ud83d\\ude00 is a pair", "label": "a"}\n' + record + "\n", encoding="utf-8")
    rows = read_jsonl(str(path))
    assert next(rows).get("text") == "\U0001f600 is a pair"
    with pytest.raises(DataError, match=rf"^{path}:2: field '{field}': not valid text: a lone surrogate U\+D[89A-F]"):
        next(rows)


@pytest.mark.parametrize("encoding", ["utf-7", "raw_unicode_escape"])
def test_a_lone_surrogate_from_a_decoder_is_refused_in_every_text_reader(tmp_path, encoding):
    from multitune.data.generative import read_parallel

    bad = {"utf-7": b"+2AA-", "raw_unicode_escape": b"\\ud800"}[encoding]

    def headerless_tsv(path):
        return read_delimited(path, "\t", header=False, encoding=encoding)

    files = {  # content, reader, the line and character of the surrogate
        "a.csv": (b"text,label\nok,a\nx" + bad + b",b\n", lambda p: read_delimited(p, ",", encoding=encoding), 3, 2),
        "a.tsv": (b"ok\ta\nx" + bad + b"\tb\n", headerless_tsv, 2, 2),
        "a.conll": (b"ok\tO\n\nx" + bad + b"\tO\n", lambda p: read_conll(p, encoding=encoding), 3, 2),
        "a.jsonl": (b'{"text": "ok"}\n{"text": "x' + bad + b'"}\n', lambda p: read_jsonl(p, encoding=encoding), 2, 12),
        "a.src": (b"ok\nx" + bad + b"\n", lambda p: read_parallel(p, str(tmp_path / "a.tgt"), encoding), 2, 2),
    }
    (tmp_path / "a.tgt").write_bytes(b"ja\nja\n")
    for name, (content, read, line, at) in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        message = rf"^{path}:{line}: not valid text: a lone surrogate U\+D800 at character {at}$"
        with pytest.raises(DataError, match=message):
            list(read(str(path)))


def test_json_nested_deeper_than_the_limit_is_refused(tmp_path):
    path = tmp_path / "a.jsonl"

    def nested(depth):  # the row object is level 1; each list inside adds one
        return '{"text": ' + "[" * (depth - 1) + '"x"' + "]" * (depth - 1) + ', "label": "a"}'

    path.write_text(nested(100) + "\n", encoding="utf-8")
    assert len(list(read_jsonl(str(path)))) == 1
    for depth in (101, 5_000, 200_000):
        path.write_text('{"text": "ok", "label": "a"}\n' + nested(depth) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"^{path}:2: (field 'text': )?JSON nested deeper than 100 levels$"):
            list(read_jsonl(str(path)))


def test_numbers_that_python_cannot_hold_are_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x", "label": 1' + "0" * 5_000 + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: invalid JSON: Exceeds the limit \(4300 digits\)"):
        list(read_jsonl(str(path)))


def test_prediction_input_from_stdin_is_checked_like_a_file():
    import io

    from multitune.runs.predict import _rows

    lines = '{"text": "ok"}\n{"text": "\\ud800"}\n'
    with pytest.raises(DataError, match=r"^<stdin>:2: field 'text': not valid text: a lone surrogate U\+D800"):
        list(_rows(io.StringIO(lines), "<stdin>"))
    deep = '{"text": ' + "[" * 50_000 + "]" * 50_000 + "}\n"
    with pytest.raises(DataError, match=r"^<stdin>:1: JSON nested deeper than 100 levels$"):
        list(_rows(io.StringIO(deep), "<stdin>"))
    stdin = io.TextIOWrapper(io.BytesIO(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), encoding="utf-8")
    with pytest.raises(DataError, match=r"^<stdin>:2: bytes that are not utf-8 \(invalid continuation byte\)$"):
        list(_rows(stdin, "<stdin>"))


def _class_label_dataset(folder, records, features=None):
    """An arrow file as `save_to_disk` writes it, with a ClassLabel `label` and a sequence-of-ClassLabel `tags`;
    ids outside the names are written past datasets' own check, as another tool could."""
    import datasets
    import pyarrow as pa

    features = features or datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["neg", "pos"]),
            "tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-x"])),
        }
    )
    table = pa.table(
        {
            "text": [r[0] for r in records],
            "label": pa.array([r[1] for r in records], pa.int64()),
            "tags": pa.array([r[2] for r in records], pa.list_(pa.int64())),
        }
    )
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).save_to_disk(str(folder))
    return str(folder / "data-00000-of-00001.arrow")


def test_hf_hidden_class_ids_are_marked_not_named(tmp_path):
    records = [("a", -1, [-1, -1]), ("b", None, [None]), ("c", 1, [0, 1]), ("d", 0, [])]
    path = _class_label_dataset(tmp_path / "ds", records)
    rows = list(read_hf("arrow", "test", data_files={"test": path}))
    assert [(r.get("label"), r.get("tags"), sorted(r.hidden)) for r in rows] == [
        (None, None, ["label", "tags"]),
        (None, None, ["label", "tags"]),
        ("pos", ["O", "B-x"], []),
        ("neg", [], []),
    ]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (("a", 0, [0, -1, 1]), r"field 'tags': class id -1 \(no label\) at position 2 of 3, beside given labels"),
        (("a", 0, [None, 1]), r"field 'tags': class id None \(no label\) at position 1 of 2, beside given labels"),
        (("a", 2, [0]), r"field 'label': class id 2 is outside the dataset's class names \(0-1\)"),
        (("a", -2, [0]), r"field 'label': class id -2 is outside the dataset's class names \(0-1\)"),
        (("a", 0, [7]), r"field 'tags': class id 7 is outside the dataset's class names \(0-1\)"),
    ],
)
def test_hf_bad_class_ids_name_the_row(tmp_path, record, message):
    path = _class_label_dataset(tmp_path / "ds", [("ok", 1, [0]), record])
    with pytest.raises(DataError, match=rf"^arrow\[train\]:2: {message}$"):
        list(read_hf("arrow", "train", data_files={"train": path}))


def test_hf_builders_refuse_wide_rows_surrogates_and_nesting_in_one_line(tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_text("text,label\na,x\ni loved it, really,positive\n", encoding="utf-8")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "a\\ud800", "label": "x"}\n', encoding="utf-8")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 5_000 + '"a"' + "]" * 5_000 + "}\n", encoding="utf-8")
    cases = [
        ("csv", wide, r"ParserError: .*Expected 2 fields in line 3, saw 3"),
        ("json", surrogate, r"ArrowInvalid: JSON parse error: The surrogate pair in string is invalid"),
        ("json", deep, r"RecursionError"),
    ]
    for builder, path, message in cases:
        with pytest.raises(DataError, match=rf"^{builder}\[train\]: cannot load dataset: {message}"):
            list(read_hf(builder, "train", data_files={"train": str(path)}))


def test_a_header_that_is_data_says_what_it_found_and_how_to_read_it(tmp_path):
    # CoLA's TSV files have no header: read with the default header: true, its first row becomes the names.
    path = tmp_path / "cola.tsv"
    path.write_text(
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t1\t\tOne more pseudo generalization and I'm giving up.\n",
        encoding="utf-8",
    )
    row = next(read_delimited(str(path), "\t", quoting="none"))
    with pytest.raises(DataError) as caught:
        row.get("sentence")
    assert str(caught.value) == (
        f"{path}:2: field 'sentence': missing field (this row has: 'gj04', '1', '', "
        "\"Our friends won't buy this analysis, ...\"); if the file's first line is data, not a header, set "
        "header: false and name the columns with columns: [...] or use column indexes"
    )
    named = next(
        read_delimited(str(path), "\t", quoting="none", header=False, columns=["source", "label", "x", "text"])
    )
    with pytest.raises(DataError, match=r"missing field \(this row has: 'source', 'label', 'x', 'text'\)$"):
        named.get("sentence")


def test_a_key_written_twice_in_a_json_object_is_refused_in_every_json_reader(tmp_path):
    """json keeps the last of two equal keys: {"label": "pos", "label": "neg"} trained as neg, silently."""
    import io

    from multitune.runs.predict import _rows

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "good", "label": "pos", "label": "neg"}\n', "utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: the key 'label' appears twice in one object$"):
        list(read_jsonl(str(path)))
    unified = tmp_path / "all.jsonl"
    unified.write_text('{"task": "a", "input": {"x": "1", "x": "2"}, "output": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{unified}:1: the key 'x' appears twice in one object$"):
        list(read_unified(str(unified)))
    with pytest.raises(DataError, match=r"^<stdin>:1: the key 'text' appears twice in one object$"):
        list(_rows(io.StringIO('{"text": "a", "text": "b"}\n'), "<stdin>"))
