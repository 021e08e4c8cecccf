"""Readers and writers: FlashRAG jsonl, Search-R1 parquet (both row shapes), wiki-18 corpora,
and error messages that name the file, the line / row and the field."""

from __future__ import annotations

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from searche1_ray.data.readers import (DataFormatError, read_corpus, read_qa, search_r1_rows,
                                       write_jsonl, write_parquet)
from searche1_ray.trajectory import question_text

FLASHRAG = [
    {"id": "train_0", "question": "who wrote the novel night of ash",
     "golden_answers": ["Varo Medlin", "Medlin"], "metadata": {"type": "single_hop"}},
    {"id": "train_1", "question": "In what year was Tarvo Pictures founded?",
     "golden_answers": ["1954"]},
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_flashrag_jsonl_round_trip(tmp_path):
    path = write_jsonl(FLASHRAG, tmp_path / "nq" / "train.jsonl")
    rows = read_qa(path)
    assert rows == [
        {"id": "train_0", "question": "who wrote the novel night of ash",
         "golden_answers": ["Varo Medlin", "Medlin"], "metadata": {"type": "single_hop"},
         "data_source": "nq"},
        {"id": "train_1", "question": "In what year was Tarvo Pictures founded?",
         "golden_answers": ["1954"], "metadata": {}, "data_source": "nq"},
    ]
    assert read_qa(path, data_source="mine")[0]["data_source"] == "mine"


def test_flashrag_int_ids_blank_lines_gzip_and_string_answers(tmp_path):
    lines = ['{"id": 7, "question": "Q one?", "golden_answers": "A", "data_source": "hotpotqa"}',
             "", '{"id": "8", "question": " Q two? ", "golden_answers": ["B", " "]}']
    path = tmp_path / "dev.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    rows = read_qa(path, data_source="x")
    assert [(r["id"], r["question"], r["golden_answers"], r["data_source"]) for r in rows] == [
        ("7", "Q one?", ["A"], "hotpotqa"), ("8", "Q two?", ["B"], "x")]


def _search_r1_full(rows):
    # what Search-R1's scripts/data_process/nq_search.py writes: the FlashRAG columns survive
    # the datasets.map next to the new ones
    return [{"id": r["id"], "question": r["question"], "golden_answers": r["golden_answers"],
             "data_source": "nq",
             "prompt": [{"role": "user", "content": question_text(r["question"])}],
             "ability": "fact-reasoning",
             "reward_model": {"style": "rule", "ground_truth": {"target": r["golden_answers"]}},
             "extra_info": {"split": "train", "index": i}} for i, r in enumerate(rows)]


def test_search_r1_parquet_with_flashrag_columns(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_search_r1_full(FLASHRAG)), path)
    rows = read_qa(path)
    assert [r["id"] for r in rows] == ["train_0", "train_1"]
    assert rows[0]["golden_answers"] == ["Varo Medlin", "Medlin"]
    assert rows[1]["question"] == "In what year was Tarvo Pictures founded?"
    assert all(r["data_source"] == "nq" for r in rows)
    assert rows[1]["metadata"]["extra_info"] == {"split": "train", "index": 1}


def test_search_r1_parquet_without_flashrag_columns(tmp_path):
    # the minimal shape: prompt + reward_model + extra_info only
    slim = [{k: v for k, v in r.items() if k not in ("id", "question", "golden_answers")}
            for r in _search_r1_full(FLASHRAG)]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(slim), path)
    rows = read_qa(path)
    assert [r["id"] for r in rows] == ["0", "1"]
    # Search-R1 adds the trailing "?" to questions when it builds the prompt
    assert [r["question"] for r in rows] == ["who wrote the novel night of ash?",
                                             "In what year was Tarvo Pictures founded?"]
    assert rows[0]["golden_answers"] == ["Varo Medlin", "Medlin"]


def test_our_search_r1_writer_round_trips(tmp_path):
    qa = read_qa(write_jsonl(FLASHRAG, tmp_path / "w" / "train.jsonl"))
    path = write_parquet(search_r1_rows(qa, "train"), tmp_path / "w" / "train.parquet")
    back = read_qa(path)
    assert [{k: r[k] for k in ("id", "question", "golden_answers", "data_source")} for r in back] \
        == [{k: r[k] for k in ("id", "question", "golden_answers", "data_source")} for r in qa]
    assert back[0]["metadata"]["type"] == "single_hop"
    table = pq.read_table(path)
    assert {"prompt", "reward_model", "extra_info", "data_source"} <= set(table.column_names)
    assert table.column("reward_model").to_pylist()[0]["ground_truth"]["target"] == \
        ["Varo Medlin", "Medlin"]


@pytest.mark.faults("bad data files (error names file:line)")
@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "question": "Q?", "golden_answers": 3}',
     "field 'golden_answers' must be a list of strings, got int"),
    ('{"id": "a", "question": "Q?", "golden_answers": ["x", 1990]}',
     "field 'golden_answers' must be a list of strings, got an element of type int"),
    ('{"id": "a", "question": "Q?", "golden_answers": []}',
     "field 'golden_answers' must hold at least one non-empty answer"),
    ('{"id": "a", "question": "Q?"}', "field 'golden_answers' is missing"),
    ('{"id": "a", "question": "  ", "golden_answers": ["x"]}', "field 'question' is empty"),
    ('{"id": "a", "question": null, "golden_answers": ["x"]}',
     "field 'question' must be a string, got null"),
    ('{"question": "Q?", "golden_answers": ["x"]}', "field 'id' is missing"),
    ('{"id": [1], "question": "Q?", "golden_answers": ["x"]}',
     "field 'id' must be a string or an integer, got list"),
    ('{"id": "a", "question": "Q?", "golden_answers": ["x"], "metadata": "m"}',
     "field 'metadata' must be an object, got str"),
    ('{"id": "a", "question": "Q?", "golden_answers": ["x"]', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object, got list"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, message):
    good = json.dumps({"id": "ok", "question": "Fine?", "golden_answers": ["yes"]})
    path = write_lines(tmp_path / "train.jsonl", [good, "", line])
    with pytest.raises(DataFormatError) as err:
        read_qa(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.faults("bad data files (error names file:line)")
def test_undecodable_and_truncated_files_are_named_not_a_bare_error(tmp_path):
    import gzip

    good = json.dumps({"id": "1", "question": "Q?", "golden_answers": ["x"]}).encode() + b"\n"
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(good + b'{"id": "2", "question": "caf\xe9?", "golden_answers": ["x"]}\n')
    with pytest.raises(DataFormatError, match=re.escape(f"{latin}:2: not UTF-8 text") + ".*0xe9"):
        read_qa(latin)
    whole = gzip.compress(good * 500)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFormatError, match=re.escape(f"{cut}: the gzip stream ends early") + ".*truncated"):
        read_qa(cut)
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(good)
    with pytest.raises(DataFormatError, match=re.escape(f"{plain}: not a gzip file")):
        read_qa(plain)
    ok = tmp_path / "ok.jsonl.gz"
    ok.write_bytes(gzip.compress(good))
    assert [r["id"] for r in read_qa(ok)] == ["1"]


def test_duplicate_ids_name_both_lines(tmp_path):
    row = json.dumps({"id": "a", "question": "Q?", "golden_answers": ["x"]})
    path = write_lines(tmp_path / "train.jsonl", [row, row])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: field 'id' value 'a' "
                                                        f"repeats {path}:1")):
        read_qa(path)


@pytest.mark.faults("bad data files (error names file:line)")
def test_parquet_errors_name_the_row_and_field(tmp_path):
    rows = _search_r1_full(FLASHRAG)
    for r in rows:
        del r["golden_answers"]
    rows[1]["reward_model"] = {"style": "rule", "ground_truth": {"target": 1954}}
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([rows[0]]), tmp_path / "ok.parquet")
    assert read_qa(tmp_path / "ok.parquet")[0]["golden_answers"] == ["Varo Medlin", "Medlin"]
    pq.write_table(pa.Table.from_pylist([{**r, "reward_model": json.dumps(r["reward_model"])}
                                         for r in rows[:1]]), path)
    with pytest.raises(DataFormatError, match=re.escape(
            f"{path}:row 0: field 'golden_answers' (or 'reward_model.ground_truth.target') "
            f"is missing")):
        read_qa(path)
    path2 = tmp_path / "bad_target.parquet"
    pq.write_table(pa.Table.from_pylist([{"data_source": "nq", "prompt": r["prompt"],
                                          "extra_info": r["extra_info"],
                                          "reward_model": {"ground_truth": {"target": t}}}
                                         for r, t in zip(rows, ["x", "1954"])]), path2)
    assert [r["golden_answers"] for r in read_qa(path2)] == [["x"], ["1954"]]
    path3 = tmp_path / "int_target.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "question": "Q?",
                                          "reward_model": {"ground_truth": {"target": [1954]}}}]),
                   path3)
    with pytest.raises(DataFormatError, match=re.escape(
            f"{path3}:row 0: field 'reward_model.ground_truth.target' must be a list of strings, "
            f"got an element of type int")):
        read_qa(path3)
    path4 = tmp_path / "no_id.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Q?", "golden_answers": ["x"]}]), path4)
    with pytest.raises(DataFormatError, match=re.escape(f"{path4}:row 0: field 'id' (or "
                                                        f"'extra_info.index') is missing")):
        read_qa(path4)


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "q.csv").write_text("id,question\n")
    with pytest.raises(DataFormatError, match="unsupported QA file type"):
        read_qa(tmp_path / "q.csv")
    with pytest.raises(FileNotFoundError, match="no such QA file"):
        read_qa(tmp_path / "missing.jsonl")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFormatError, match="not a readable parquet file"):
        read_qa(tmp_path / "junk.parquet")


def test_read_corpus_streams_with_limit_and_converts_title_text(tmp_path):
    lines = [json.dumps({"id": "0", "contents": '"Quessa"\nQuessa is a city in Velmoria.'}),
             json.dumps({"id": 1, "title": "Velmoria", "text": "Velmoria is a country."}),
             "{broken"]
    path = write_lines(tmp_path / "wiki-18.jsonl", lines)
    assert list(read_corpus(path, limit=2)) == [
        {"id": "0", "contents": '"Quessa"\nQuessa is a city in Velmoria.'},
        {"id": "1", "contents": '"Velmoria"\nVelmoria is a country.'}]
    it = read_corpus(path)
    assert next(it)["id"] == "0"  # lazy: nothing past line 1 is read yet
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:3: invalid JSON")):
        list(it)
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"id": "0", "contents": 5})])
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}:1: field 'contents' must be a "
                                                        f"string")):
        list(read_corpus(bad))
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(lines[0] + "\n")
    assert [r["id"] for r in read_corpus(gz)] == ["0"]


def test_write_jsonl_is_utf8_one_object_per_line(tmp_path):
    rows = [{"id": "0", "contents": '"Évora"\nÉvora is a city.'}, {"id": "1", "contents": "x"}]
    path = write_jsonl(rows, tmp_path / "sub" / "c.jsonl")
    raw = path.read_bytes().decode("utf-8")
    assert raw.count("\n") == 2 and "Évora" in raw
    assert list(read_corpus(path)) == rows
    assert not list(tmp_path.glob("sub/*.tmp"))
