"""Streamed train splits (data/streaming.py): the shuffle buffer, positions and resume, sampling evaluation
rows in one pass, counting without parsing, the unified index; and a streamed run against the same run read
into memory."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from multitune.cli import main
from multitune.data.streaming import (
    ReadAheadRows,
    StreamedRows,
    StreamSource,
    UnifiedIndex,
    count_blocks,
    count_lines,
    reservoir,
    shuffled,
)
from multitune.data.streams import TaskStream
from multitune.errors import DataError
from tests.conftest import classification_rows, tiny_config, token_rows


def source(rows: list[Any], buffer: int) -> StreamSource:
    return StreamSource(lambda: iter(rows), len(rows), buffer, "rows")


def identity(rows: list[Any]) -> list[Any]:
    return rows


def test_a_split_that_fits_the_buffer_comes_in_the_in_memory_streams_permutation():
    rows = list(range(23))
    memory = TaskStream(rows, "7:task:stream")
    streamed = StreamedRows(source(rows, buffer=100), identity, "7:task:stream")
    for n in (5, 9, 20, 23, 1):  # across epoch boundaries
        assert streamed.take(n) == memory.take(n)
    assert streamed.state_dict() == memory.state_dict()


def test_a_buffer_smaller_than_the_split_still_draws_every_row_once_an_epoch_in_a_seeded_order():
    rows = list(range(100))
    first = list(shuffled(iter(rows), 10, random.Random("s:0")))
    assert sorted(first) == rows and first != rows
    assert first == list(shuffled(iter(rows), 10, random.Random("s:0")))
    assert first != list(shuffled(iter(rows), 10, random.Random("s:1")))
    # a row can only leave the buffer after it entered: row i is drawn at position >= i - 10
    assert all(position >= row - 10 for position, row in enumerate(first))
    stream = StreamedRows(source(rows, buffer=10), identity, "s")
    epoch = stream.take(100)
    assert sorted(epoch) == rows and stream.state_dict() == {"epoch": 0, "offset": 100}
    assert sorted(stream.take(100)) == rows and stream.state_dict() == {"epoch": 1, "offset": 100}


def test_a_stream_resumes_exactly_where_it_stopped():
    rows = list(range(37))
    original = StreamedRows(source(rows, buffer=8), identity, "r")
    original.take(50)  # into the second epoch
    state = original.state_dict()
    assert state == {"epoch": 1, "offset": 13}
    resumed = StreamedRows(source(rows, buffer=8), identity, "r")
    resumed.load_state_dict(state)
    assert resumed.take(40) == original.take(40)
    shorter = StreamedRows(source(rows[:10], buffer=8), identity, "r")
    with pytest.raises(DataError, match="fewer rows than the checkpoint's position"):
        shorter.load_state_dict(state)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_reading_ahead_hands_out_the_rows_and_positions_of_reading_in_the_loop(chunk):
    from concurrent.futures import ThreadPoolExecutor

    rows = list(range(37))
    worker = ThreadPoolExecutor(1)
    encode = lambda xs: [x * 10 for x in xs]  # noqa: E731
    loop = StreamedRows(source(rows, buffer=5), encode, "s")
    ahead = ReadAheadRows(source(rows, buffer=5), encode, "s", worker, chunk)
    for n in (4, 0, 9, 30, 1, 37, 2):  # across epoch boundaries
        assert ahead.take(n) == loop.take(n)
        assert ahead.state_dict() == loop.state_dict()
    saved = ahead.state_dict()
    later = ahead.take(11)
    resumed = ReadAheadRows(source(rows, buffer=5), encode, "s", worker, chunk)
    resumed.load_state_dict(saved)
    assert resumed.take(11) == later
    ahead.load_state_dict(saved)  # moved back while rows were read ahead: they are dropped
    assert ahead.take(11) == later


def bad_at(position: int, rows: list[int]) -> StreamSource:
    def read() -> Any:
        for row in rows:
            if row == position:
                raise DataError("bad row", file="data.jsonl", line=position + 1)
            yield row

    return StreamSource(read, len(rows), 1, "data.jsonl")


@pytest.mark.parametrize("where", ["reading", "encoding"])
def test_reading_ahead_raises_a_bad_row_when_the_loop_reaches_it_not_before(where):
    from concurrent.futures import ThreadPoolExecutor

    rows = list(range(20))

    def encode(xs: list[int]) -> list[int]:
        if where == "encoding" and 13 in xs:
            raise DataError("does not encode", file="data.jsonl", line=14)
        return xs

    def made() -> StreamSource:
        return bad_at(13, rows) if where == "reading" else source(rows, buffer=1)

    def outcomes(stream: Any) -> list[Any]:
        out: list[Any] = []
        for n in (5, 7, 1, 1, 1):
            try:
                out.append((stream.take(n), stream.state_dict()))
            except DataError as error:
                out.append(str(error))
                break
        return out

    loop = outcomes(StreamedRows(made(), encode, "s"))
    first, second = (list(range(5)), {"epoch": 0, "offset": 5}), (list(range(5, 12)), {"epoch": 0, "offset": 12})
    if where == "reading":  # the reader holds one row in its buffer of 1: reading row 13 fails as row 12 is drawn
        assert loop == [first, second, "data.jsonl:14: bad row"]
    else:
        assert loop == [first, second, ([12], {"epoch": 0, "offset": 13}), "data.jsonl:14: does not encode"]
    assert outcomes(ReadAheadRows(made(), encode, "s", ThreadPoolExecutor(1), chunk=8)) == loop


def test_a_reservoir_sample_is_seeded_uniform_and_keeps_the_data_order():
    rows = list(range(1000))
    sample = reservoir(iter(rows), 50, "seed")
    assert len(sample) == 50 and sample == sorted(sample) and sample == reservoir(iter(rows), 50, "seed")
    assert reservoir(iter(rows[:30]), 50, "seed") == rows[:30]
    # uniform: over many seeds every row is kept about k/n of the time (here 5%: 500 draws of 20 of 200)
    counts = [0] * 200
    for seed in range(500):
        for row in reservoir(iter(range(200)), 20, str(seed)):
            counts[row] += 1
    assert sum(counts) == 500 * 20 and min(counts) > 20 and max(counts) < 90  # mean 50


def test_rows_are_counted_without_parsing(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"x": 1}\n\n{"x": 2}\nnot json at all\n', encoding="utf-8")
    assert count_lines(str(jsonl), "utf-8") == 3  # blank lines are not rows; nothing is parsed
    conll = tmp_path / "a.conll"
    conll.write_text("a O\nb O\n\n\nc O\n\nd O\ne O\n", encoding="utf-8")
    assert count_blocks(str(conll), "utf-8") == 3


def test_a_unified_index_reads_each_tasks_records_in_file_order(tmp_path):
    path = tmp_path / "mix.jsonl"
    records = [{"task": "ab"[i % 3 == 0], "input": f"text {i}", "output": str(i)} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    index = UnifiedIndex(str(path), "utf-8", {"a", "b"})
    assert index.count("b") == 4 and index.count("a") == 6
    got = [(row.line, row.values["output"]) for row in index.rows("b")]
    assert got == [(1, "0"), (4, "3"), (7, "6"), (10, "9")]
    path.write_text(path.read_text() + json.dumps({"task": "c", "input": "x", "output": "y"}) + "\n")
    with pytest.raises(DataError, match="no configured task 'c'") as caught:
        UnifiedIndex(str(path), "utf-8", {"a", "b"})
    assert caught.value.line == 12


# --- runs ------------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def streamed_config(tiny_backbone: Path, tmp_path: Path, streaming: bool, rows: int = 40, **training: Any) -> Path:
    """Two tasks with a validation file each, streamed or read into memory."""
    a = write_rows(tmp_path / "a.jsonl", classification_rows(rows))
    a_val = write_rows(tmp_path / "a_val.jsonl", classification_rows(12, seed=1))
    b = write_rows(tmp_path / "b.jsonl", token_rows(30))
    b_val = write_rows(tmp_path / "b_val.jsonl", token_rows(10, seed=1))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", **training)
    config["tasks"]["sentiment"]["source"].update(validation=str(a_val), streaming=streaming)
    config["tasks"]["ner"]["source"].update(validation=str(b_val), streaming=streaming)
    path = tmp_path / f"streamed-{streaming}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_a_streamed_run_trains_on_the_same_batches_as_the_same_data_in_memory(tiny_backbone, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from multitune.data.workers import TokenizerPool

    pooled: list[str] = []  # the tasks whose rows the worker processes encoded
    plain = TokenizerPool.encoder
    monkeypatch.setattr(TokenizerPool, "encoder", lambda self, name: pooled.append(name) or plain(self, name))

    for streaming in (False, True):
        path = streamed_config(tiny_backbone, tmp_path, streaming, log_every=1)
        assert main(["train", str(path), f"run.name=s{streaming}"]) == 0
    assert main(["train", str(path), "run.name=in_loop", "training.read_ahead=0"]) == 0  # no reader thread
    assert not pooled
    assert main(["train", str(path), "run.name=workers", "training.tokenize_workers=2"]) == 0  # two processes
    assert set(pooled) == {"sentiment", "ner"}
    memory, streamed = tmp_path / "runs" / "sFalse", tmp_path / "runs" / "sTrue"

    def timeless(run: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in h.items() if "second" not in k and "time" not in k} for h in history(run)]

    assert len(timeless(memory)) > 6 and timeless(memory) == timeless(streamed)  # every step's losses
    assert timeless(tmp_path / "runs" / "in_loop") == timeless(streamed)
    assert timeless(tmp_path / "runs" / "workers") == timeless(streamed)
    a, b = load_file(str(memory / "model.safetensors")), load_file(str(streamed / "model.safetensors"))
    c = load_file(str(tmp_path / "runs" / "in_loop" / "model.safetensors"))
    d = load_file(str(tmp_path / "runs" / "workers" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) and torch.equal(a[k], d[k]) for k in a)
    manifest = json.loads((streamed / "tasks.json").read_text())
    assert manifest["sentiment"]["rows"] == {"train": 40, "validation": 12}
    assert "a.jsonl (streamed), a_val.jsonl" in (streamed / "report.html").read_text()
    assert any("streamed, 40 rows (counted)" in note for note in manifest["sentiment"]["notes"])


def test_a_bad_row_found_late_in_a_stream_is_a_one_line_error_and_the_checkpoint_survives(
    tiny_backbone, tmp_path, capsys
):
    rows = classification_rows(40)
    text = (
        "".join(json.dumps(r) + "\n" for r in rows[:30])
        + '{"text": "cut short\n'
        + "".join(json.dumps(r) + "\n" for r in rows[30:])
    )
    (tmp_path / "late.jsonl").write_text(text, encoding="utf-8")
    val = write_rows(tmp_path / "val.jsonl", classification_rows(8, seed=1))
    config = tiny_config(tiny_backbone, tmp_path / "late.jsonl", write_rows(tmp_path / "b.jsonl", token_rows(20)),
                         tmp_path / "runs", steps=30, checkpoint_every=2, eval_every=30)  # fmt: skip
    config["tasks"]["sentiment"]["source"].update(
        validation=str(val), streaming=True, num_rows=41, shuffle_buffer=1
    )  # declared rows and labels: nothing reads the file before training, the bad line is met when drawn
    config["tasks"]["sentiment"]["labels"] = ["neg", "pos"]
    config["sampling"] = {"name": "manual", "probabilities": {"sentiment": 0.999, "ner": 0.001}}
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    kept = {}
    # read in the loop, ahead on the reader thread, or tokenized by worker processes: the same stop
    for ahead, workers in ((0, 0), (8, 0), (8, 2)):
        name = f"ahead{ahead}-{workers}"
        overrides = [f"run.name={name}", f"training.read_ahead={ahead}", f"training.tokenize_workers={workers}"]
        assert main(["train", str(path), *overrides]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("multitune: error: ") and "late.jsonl:31" in error and "invalid JSON" in error
        kept[name] = sorted(p.name for p in (tmp_path / "runs" / name / "checkpoints").iterdir())
    assert kept["ahead0-0"], "the checkpoints written before the bad row are kept"
    assert kept["ahead8-0"] == kept["ahead0-0"] == kept["ahead8-2"]


def test_a_label_a_worker_process_cannot_encode_is_a_one_line_error_at_its_row(tiny_backbone, tmp_path, capsys):
    """A row that parses but does not encode (a label its task does not know), met late in a stream whose rows
    the worker processes tokenize: the error raised in the worker reaches the user as one line naming the
    file, line and field, at the step reading in the loop stops at, the checkpoints before it kept."""
    rows = classification_rows(40)
    rows[30] = {**rows[30], "label": "maybe"}
    write_rows(tmp_path / "late.jsonl", rows)
    val = write_rows(tmp_path / "val.jsonl", classification_rows(8, seed=1))
    config = tiny_config(tiny_backbone, tmp_path / "late.jsonl", write_rows(tmp_path / "b.jsonl", token_rows(20)),
                         tmp_path / "runs", steps=30, checkpoint_every=2, eval_every=30)  # fmt: skip
    config["tasks"]["sentiment"]["source"].update(validation=str(val), streaming=True, num_rows=40, shuffle_buffer=1)
    config["tasks"]["sentiment"]["labels"] = ["neg", "pos"]
    config["sampling"] = {"name": "manual", "probabilities": {"sentiment": 0.999, "ner": 0.001}}
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    steps = {}
    for workers, ahead in ((0, 0), (2, 8)):
        assert main(["train", str(path), f"run.name=w{workers}", f"training.tokenize_workers={workers}",
                     f"training.read_ahead={ahead}"]) == 2  # fmt: skip
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("multitune: error: ") and "late.jsonl:31: field 'label': unknown label 'maybe'" in error
        steps[workers] = max(
            int(p.name.split("-")[-1]) for p in (tmp_path / "runs" / f"w{workers}" / "checkpoints").iterdir()
        )
    assert steps[0] > 0 and steps[2] == steps[0]


def test_tokenizing_in_processes_needs_rows_read_ahead(tiny_backbone, tmp_path, capsys):
    path = streamed_config(tiny_backbone, tmp_path, True)
    assert main(["train", str(path), "training.read_ahead=0", "training.tokenize_workers=2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "field 'training.tokenize_workers'" in error and "training.read_ahead above 0" in error


def test_streaming_refuses_what_would_read_the_whole_split(tiny_backbone, tmp_path, capsys):
    path = streamed_config(tiny_backbone, tmp_path, True)
    for override, words in (
        ("tasks.sentiment.max_rows.train=10", "a streamed train split is read whole"),
        ("training.group_by_length=true", "cannot be grouped by length"),
        ("tasks.sentiment.source.validation=null", "give it a validation split"),
    ):
        assert main(["train", str(path), override]) == 2
        assert words in capsys.readouterr().err


# --- every streamed reader, against the same data read into memory ----------------------------------------


def formats(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """One small classification or tagging task per source format, each with a validation split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, val = classification_rows(30), classification_rows(8, seed=1)
    write_rows(tmp_path / "t.jsonl", train)
    write_rows(tmp_path / "v.jsonl", val)
    for name, rows in (("t", train), ("v", val)):
        (tmp_path / f"{name}.csv").write_text(
            "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows), encoding="utf-8"
        )
        (tmp_path / f"{name}.tsv").write_text(
            "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows), encoding="utf-8"
        )
        # parallel text: line i of .src pairs with line i of .tgt (blank lines between pairs are skipped)
        (tmp_path / f"{name}.src").write_text("".join(f"{r['text']}\n\n" for r in rows), encoding="utf-8")
        (tmp_path / f"{name}.tgt").write_text("".join(f"{r['label']}\n\n" for r in rows), encoding="utf-8")
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet", row_group_size=7)
        tags = token_rows(20 if name == "t" else 6, seed=len(name))
        (tmp_path / f"{name}.conll").write_text(
            "".join("".join(f"{w} {t}\n" for w, t in zip(r["tokens"], r["tags"], strict=True)) + "\n" for r in tags)
        )
    unified = [{"task": "u", "input": r["text"], "output": r["label"]} for r in train]
    unified += [{"task": "other", "input": r["text"], "output": r["label"]} for r in val]
    write_rows(tmp_path / "mix.jsonl", unified)
    write_rows(tmp_path / "mix_val.jsonl", [{"task": "u", "input": r["text"], "output": r["label"]} for r in val])

    def task(fmt: str, suffix: str, **extra: Any) -> dict[str, Any]:
        return {
            "type": "classification",
            "source": {
                "format": fmt,
                "train": str(tmp_path / f"t.{suffix}"),
                "validation": str(tmp_path / f"v.{suffix}"),
            },
            **extra,
        }

    return {
        "jsonl": task("jsonl", "jsonl"),
        "csv": task("csv", "csv"),
        "tsv": task("tsv", "tsv"),
        "parallel": {
            "type": "generation",
            "source": {
                "format": "parallel",
                "train": [str(tmp_path / "t.src"), str(tmp_path / "t.tgt")],
                "validation": [str(tmp_path / "v.src"), str(tmp_path / "v.tgt")],
            },
        },
        "parquet": task("parquet", "parquet"),
        "conll": {**task("conll", "conll"), "type": "token_classification"},
        "hf": {
            "type": "classification",
            "source": {
                "format": "hf",
                "dataset": "json",
                "data_files": {"train": str(tmp_path / "t.jsonl"), "validation": str(tmp_path / "v.jsonl")},
            },
        },
        "unified": {
            "type": "classification",
            "source": {
                "format": "unified",
                "train": str(tmp_path / "mix.jsonl"),
                "validation": str(tmp_path / "mix_val.jsonl"),
                "task_key": "u",
            },
        },
    }


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet", "conll", "parallel", "hf", "unified"])
def test_each_reader_streams_the_rows_it_reads_into_memory(tmp_path, fmt):
    from multitune.config import TaskConfig
    from multitune.data.tasks import UnifiedFiles, load_task

    entry = formats(tmp_path)[fmt]
    memory = load_task(
        "t", TaskConfig.model_validate(entry), 3, UnifiedFiles({str(tmp_path / "mix.jsonl"): {"u", "other"}})
    )
    entry["source"]["streaming"] = True
    streamed_config = TaskConfig.model_validate(entry)
    unified = UnifiedFiles({str(tmp_path / "mix.jsonl"): {"u", "other"}})
    streamed = load_task("t", streamed_config, 3, unified)
    assert streamed.stream is not None and "train" not in streamed.splits
    rows = list(streamed.stream.open())
    assert streamed.stream.num_rows == len(rows) == len(memory.splits["train"])  # counted without parsing
    assert [(e.texts, e.label) for e in rows] == [(e.texts, e.label) for e in memory.splits["train"]]
    assert streamed.labels == memory.labels
    assert [(e.texts, e.label) for e in streamed.splits["validation"]] == [
        (e.texts, e.label) for e in memory.splits["validation"]
    ]


def test_a_streamed_regression_tasks_scaling_and_range_come_from_its_pass(tmp_path):
    from multitune.config import TaskConfig
    from multitune.data.tasks import UnifiedFiles, load_task

    targets = [0.5, 2.0, 4.5, 1.0, 3.0]
    write_rows(tmp_path / "r.jsonl", [{"text": f"row {i}", "label": t} for i, t in enumerate(targets)])
    write_rows(tmp_path / "rv.jsonl", [{"text": "v", "label": 1.5}])
    entry = {"type": "regression", "source": {"format": "jsonl", "train": str(tmp_path / "r.jsonl"),
                                              "validation": str(tmp_path / "rv.jsonl"), "streaming": True}}  # fmt: skip
    task = load_task("r", TaskConfig.model_validate(entry), 3, UnifiedFiles({}))
    mean = sum(targets) / 5
    std = (sum((t - mean) ** 2 for t in targets) / 5) ** 0.5
    assert task.target_mean == pytest.approx(mean) and task.target_std == pytest.approx(std)
    assert task.target_range == (0.5, 4.5)


def test_a_discovered_mixture_streams_each_task_from_the_unified_files_index(tiny_backbone, tmp_path):
    records = []
    for i, row in enumerate(classification_rows(60)):
        records.append({"task": ("a", "b", "c")[i % 3], "input": row["text"], "output": row["label"]})
    write_rows(tmp_path / "mix.jsonl", records[:45])
    write_rows(tmp_path / "mix_val.jsonl", records[45:])
    config = {
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "run": {"name": "mix", "output_dir": str(tmp_path / "runs"), "seed": 3},
        "training": {"steps": 4, "batch_size": 6, "eval_every": 4, "progress": False, "mixed_batches": True},
        "discover": {
            "source": {"format": "unified", "train": "mix.jsonl", "validation": "mix_val.jsonl", "streaming": True},
            "type": "classification",
        },
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(tmp_path / "mix.yaml")]) == 0
    manifest = json.loads((tmp_path / "runs" / "mix" / "tasks.json").read_text())
    assert {name: entry["rows"]["train"] for name, entry in manifest.items()} == {"a": 15, "b": 15, "c": 15}


def test_counting_reads_bytes_but_decodes_encodings_whose_line_breaks_are_wider(tmp_path):
    path = tmp_path / "u16.jsonl"
    path.write_text('{"x": 1}\n\n{"x": 2}\n', encoding="utf-16")
    assert count_lines(str(path), "utf-16") == 2
    with pytest.raises(DataError, match="unknown encoding"):
        count_lines(str(path), "no-such-codec")


def test_csv_records_with_quoted_line_breaks_and_conll_docstart_count_as_rows(tmp_path):
    from multitune.config import TaskConfig
    from multitune.data.tasks import UnifiedFiles, counted_rows

    csv_path = tmp_path / "t.csv"
    csv_path.write_text('text,label\n"two\nlines",a\nplain,b\n"three\n\nlines",a\n', encoding="utf-8")
    conll = tmp_path / "t.conll"
    conll.write_text("-DOCSTART- O\n\na B-x\nb O\n\nc O\n", encoding="utf-8")
    for path, fmt, want in ((csv_path, "csv", 3), (conll, "conll", 2)):
        task = TaskConfig.model_validate(
            {"type": "token_classification" if fmt == "conll" else "classification",
             "source": {"format": fmt, "train": str(path), "validation": str(path), "streaming": True}}
        )  # fmt: skip
        assert counted_rows("t", task, UnifiedFiles({})) == want


def test_streaming_options_on_a_source_that_does_not_stream_are_refused(tiny_backbone, tmp_path, capsys):
    path = streamed_config(tiny_backbone, tmp_path, False)
    for key in ("shuffle_buffer", "num_rows"):
        assert main(["train", str(path), f"tasks.sentiment.source.{key}=5"]) == 2
        assert f"only a streamed source (streaming: true) takes {key}" in capsys.readouterr().err


def test_mixing_by_tokens_and_task_relations_read_a_streamed_split_as_the_in_memory_run_does(tiny_backbone, tmp_path):
    for streaming in (False, True):
        # 300 rows: more than a sample of the split's first rows would hold, all inside the shuffle buffer
        path = streamed_config(tiny_backbone, tmp_path, streaming, rows=300, log_every=1, mix_by="tokens")
        assert main(["train", str(path), f"run.name=t{streaming}", "analysis.task_affinity=true"]) == 0
    memory, streamed = (history(tmp_path / "runs" / f"t{flag}") for flag in (False, True))
    keep = ("loss", "losses", "token_shares", "probabilities", "affinity", "gradient_cosine")
    assert [{k: h.get(k) for k in keep} for h in memory] == [{k: h.get(k) for k in keep} for h in streamed]


def test_resume_refuses_a_streamed_split_whose_rows_changed_and_evaluate_keeps_to_stored_splits(
    tiny_backbone, tmp_path, capsys
):
    path = streamed_config(tiny_backbone, tmp_path, True, steps=4, checkpoint_every=2)
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    assert main(["evaluate", str(run), "--split", "train"]) == 2
    assert "streams its train split" in capsys.readouterr().err
    with open(tmp_path / "a.jsonl", "a", encoding="utf-8") as out:  # three rows appended
        out.write("".join(json.dumps(r) + "\n" for r in classification_rows(3, seed=9)))
    (run / "metrics.json").unlink()  # as if it had stopped after its step-4 checkpoint
    assert main(["resume", str(run)]) == 2
    error = capsys.readouterr().err
    assert "has 43 rows, the run being resumed started with 40" in error and "\n" not in error.strip()


def test_scoring_a_finished_streamed_run_never_reads_its_train_split(tiny_backbone, tmp_path):
    path = streamed_config(tiny_backbone, tmp_path, True, steps=4)
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    assert main(["evaluate", str(run), "--split", "validation"]) == 0
    before = json.loads((run / "evaluation_validation.json").read_text())
    # the train files are gone (a mixture too large to keep beside the run): the labels and target scaling
    # come from the run's tasks.json, so scoring the stored splits does not need them
    (tmp_path / "a.jsonl").unlink()
    (tmp_path / "b.jsonl").write_text("not json\n", encoding="utf-8")
    assert main(["evaluate", str(run), "--split", "validation"]) == 0
    assert json.loads((run / "evaluation_validation.json").read_text()) == before


def test_the_tokenizer_pool_encodes_in_other_processes_as_encode_does(tiny_backbone, tmp_path):
    from transformers import AutoTokenizer

    from multitune.config import Config
    from multitune.data.encoding import encode
    from multitune.data.tasks import load_tasks
    from multitune.data.workers import TokenizerPool

    a = write_rows(tmp_path / "a.jsonl", classification_rows(30))
    b = write_rows(tmp_path / "b.jsonl", token_rows(20))
    tasks = load_tasks(Config.model_validate(tiny_config(tiny_backbone, a, b, tmp_path / "runs")).tasks, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone))
    pool = TokenizerPool(3, {name: (data, tokenizer, 16, False) for name, data in tasks.items()})
    try:
        for name, data in tasks.items():
            examples = data.splits["train"][:10]  # 10 rows over 3 processes: parts of 4, 4 and 2, in order
            assert pool.encoder(name)(examples) == encode(examples, data, tokenizer, 16)
            assert pool.encoder(name)([]) == []
        pids = {pool.pool.submit(os.getpid).result() for _ in range(12)}
        assert pids and os.getpid() not in pids
    finally:
        pool.close()
    with pytest.raises(ValueError, match="at least one worker"):
        TokenizerPool(0, {})


def ignores_sigint(pid: int) -> bool:
    """Whether process `pid` ignores SIGINT (Linux: the SigIgn mask of /proc/PID/status)."""
    import signal

    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc (Linux)")
def test_tokenizer_workers_outlive_ctrl_c_and_a_dead_one_is_a_one_line_error(tiny_backbone, tmp_path):
    """Ctrl-C reaches every process of the group: the workers ignore it, so the training process can finish
    its step and checkpoint. A worker killed outright is a MultitunError naming the setting, not a bad row."""
    import signal

    from transformers import AutoTokenizer

    from multitune.config import Config
    from multitune.data.tasks import load_tasks
    from multitune.data.workers import TokenizerPool
    from multitune.errors import MultitunError

    a = write_rows(tmp_path / "a.jsonl", classification_rows(30))
    b = write_rows(tmp_path / "b.jsonl", token_rows(20))
    tasks = load_tasks(Config.model_validate(tiny_config(tiny_backbone, a, b, tmp_path / "runs")).tasks, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone))
    pool = TokenizerPool(2, {name: (data, tokenizer, 16, False) for name, data in tasks.items()})
    examples = tasks["sentiment"].splits["train"][:8]
    try:
        first = pool.encoder("sentiment")(examples)
        pids = list(pool.pool._processes)  # started by the first call
        deadline = time.monotonic() + 60  # a worker still starting up has not yet set SIGINT aside
        while not all(ignores_sigint(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        assert pool.encoder("sentiment")(examples) == first
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(MultitunError, match="tokenizing worker process ended") as raised:
            for _ in range(20):  # the pool notices the death at its next call
                pool.encoder("sentiment")(examples)
        assert raised.value.field == "training.tokenize_workers"
    finally:
        pool.close()
