import json

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
    with pytest.raises(DataError, match=rf"^{path}:1: field 'label': missing field$"):
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
    named = next(read_delimited(str(path), "\t", header=False, columns=["genre", "file", "year", "id", "score"]))
    assert named.get("score") == "4.5"
    with pytest.raises(DataError, match="header has 9"):
        list(read_delimited(str(path), "\t", header=False, columns=[str(i) for i in range(9)]))


def test_conll_sentences_split_on_whitespace_only_lines(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- O\n\nEmpire\tB-loc\nState\tI-loc\n\t\nhi\tO\n \nx\tO\n", encoding="utf-8")
    rows = list(read_conll(str(path)))
    assert [r.values["tokens"] for r in rows] == [["Empire", "State"], ["hi"], ["x"]]
    assert [r.line for r in rows] == [3, 6, 8]
    path.write_text("lonely\n", encoding="utf-8")
    with pytest.raises(DataError, match=":1: line has 1 columns"):
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
