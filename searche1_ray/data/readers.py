"""Readers and writers for QA data (FlashRAG jsonl, Search-R1 parquet) and wiki-18 corpora.

Every QA reader returns rows of one shape:
    {"id": str, "question": str, "golden_answers": [str, ...], "metadata": dict,
     "data_source": str}
``id`` is the question's key everywhere downstream (rollout rows' ``question_id``, pairs, eval):
unique per (data_source, id), qualified as ``<data_source>/<id>`` (raw id in ``source_id``) when
a file mixes sources whose ids repeat, as Search-R1's merged files do.
Search-R1 parquet rows (``scripts/data_process/nq_search.py``) keep the FlashRAG columns
(``id``, ``question``, ``golden_answers``) next to ``data_source``, ``prompt``,
``reward_model.ground_truth.target`` and ``extra_info.index``; rows that lack the FlashRAG
columns are read from the latter. A malformed row raises ``DataFormatError`` naming the file,
the line (jsonl, 1-based) or row (parquet, 0-based), the field, and what was expected.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

_QUESTION_MARK = "Question:"


class DataFormatError(ValueError):
    """A data file row that does not have the expected shape."""


def _where(path: Path, line: int | None = None, row: int | None = None) -> str:
    if line is not None:
        return f"{path}:{line}"
    if row is not None:
        return f"{path}:row {row}"
    return str(path)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, gzipped when its name ends in .gz. Bytes that are not
    UTF-8, a truncated gzip stream or a .gz name on a plain file are errors naming the file and line."""
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFormatError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} "
                                          f"of the line: 0x{raw[e.start]:02x}); data files must be UTF-8") from None
    except EOFError:
        raise DataFormatError(f"{path}: the gzip stream ends early (after {lineno} complete line(s)): the file is "
                              "truncated; download or copy it again") from None
    except gzip.BadGzipFile:
        raise DataFormatError(f"{path}: not a gzip file, although its name ends in .gz") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; bad JSON or a non-object is an error."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{lineno}: invalid JSON ({e.msg} at column "
                                  f"{e.colno}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got "
                                  f"{_type_name(obj)}")
        yield lineno, obj


def _answers(value: Any, where: str, field: str) -> list[str]:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays
        value = value.tolist()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataFormatError(f"{where}: field '{field}' must be a list of strings, got "
                              f"{_type_name(value)}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise DataFormatError(f"{where}: field '{field}' must be a list of strings, got an "
                              f"element of type {_type_name(bad[0])} ({bad[0]!r})")
    answers = [v.strip() for v in value if v.strip()]
    if not answers:
        raise DataFormatError(f"{where}: field '{field}' must hold at least one non-empty answer")
    return answers


def _qa_row(obj: dict, where: str, data_source: str, id_fallback: Any = None,
            id_fields: str = "'id'") -> dict:
    raw_id = obj.get("id")
    if raw_id is None:
        raw_id = id_fallback
    if raw_id is None:
        raise DataFormatError(f"{where}: field {id_fields} is missing; every QA row needs a "
                              f"unique id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise DataFormatError(f"{where}: field 'id' must be a string or an integer, got "
                              f"{_type_name(raw_id)}")
    qid = str(raw_id).strip()
    if not qid:
        raise DataFormatError(f"{where}: field 'id' is empty")
    question = obj.get("question")
    if not isinstance(question, str):
        raise DataFormatError(f"{where}: field 'question' must be a string, got "
                              f"{_type_name(question)}")
    if not question.strip():
        raise DataFormatError(f"{where}: field 'question' is empty")
    if "golden_answers" not in obj:
        raise DataFormatError(f"{where}: field 'golden_answers' is missing")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise DataFormatError(f"{where}: field 'metadata' must be an object, got "
                              f"{_type_name(metadata)}")
    source = obj.get("data_source") or data_source
    if not isinstance(source, str):
        raise DataFormatError(f"{where}: field 'data_source' must be a string, got "
                              f"{_type_name(source)}")
    return {"id": qid, "question": question.strip(),
            "golden_answers": _answers(obj["golden_answers"], where, "golden_answers"),
            "metadata": metadata, "data_source": source}


def _key_questions(rows: list[dict], wheres: list[str]) -> None:
    """Make ``id`` the question's key: unique per (data_source, id).

    A repeat inside one source is an error naming both rows. Search-R1's merged files
    (``nq_hotpotqa_train``, the merged test set) keep each source's own FlashRAG id, so ``train_0``
    appears once per source: when ids repeat across sources, every row of the file gets the key
    ``<data_source>/<id>`` and keeps its own id in ``source_id`` (single-source files keep plain ids)."""
    first: dict[tuple[str, str], str] = {}
    ids: set[str] = set()
    across = False
    for row, where in zip(rows, wheres):
        key = (row["data_source"], row["id"])
        if key in first:
            raise DataFormatError(f"{where}: field 'id' value {row['id']!r} repeats "
                                  f"{first[key]} (data_source {row['data_source']!r}); ids must be "
                                  f"unique within a data_source")
        first[key] = where
        across = across or row["id"] in ids
        ids.add(row["id"])
    if across:
        for row in rows:
            row["source_id"] = row["id"]
            row["id"] = f"{row['data_source']}/{row['id']}"


def _read_flashrag(path: Path, data_source: str) -> list[dict]:
    rows, wheres = [], []
    for lineno, obj in _iter_jsonl(path):
        where = _where(path, line=lineno)
        rows.append(_qa_row(obj, where, data_source))
        wheres.append(where)
    _key_questions(rows, wheres)
    return rows


def _question_from_prompt(prompt: Any) -> str | None:
    # Search-R1 prompts end with "... Question: {question}\n"
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    if isinstance(prompt, str) and _QUESTION_MARK in prompt:
        return prompt.rsplit(_QUESTION_MARK, 1)[1].strip()
    return None


def _dig(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]... or None when a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def _read_search_r1(path: Path, data_source: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on non-parquet bytes
        raise DataFormatError(f"{path}: not a readable parquet file ({e})") from None
    rows, wheres, index = [], [], 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            where = _where(path, row=index)
            index += 1
            extra = _dig(obj, "extra_info") or {}
            flat = dict(obj)
            if flat.get("question") is None:
                flat["question"] = extra.get("question") or _question_from_prompt(obj.get("prompt"))
            if flat.get("metadata") is None and isinstance(obj.get("metadata_json"), str):
                try:
                    flat["metadata"] = json.loads(obj["metadata_json"])
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{where}: field 'metadata_json' is not valid JSON "
                                          f"({e.msg})") from None
            if flat.get("golden_answers") is None:
                target = _dig(obj, "reward_model", "ground_truth", "target")
                if target is None:
                    raise DataFormatError(f"{where}: field 'golden_answers' (or "
                                          f"'reward_model.ground_truth.target') is missing")
                flat["golden_answers"] = _answers(target, where, "reward_model.ground_truth.target")
            row = _qa_row(flat, where, data_source, id_fallback=extra.get("index"),
                          id_fields="'id' (or 'extra_info.index')")
            if extra and "extra_info" not in row["metadata"]:
                row["metadata"] = {**row["metadata"], "extra_info": extra}
            rows.append(row)
            wheres.append(where)
    _key_questions(rows, wheres)
    return rows


def read_qa(path: str | os.PathLike, data_source: str | None = None) -> list[dict]:
    """QA rows from FlashRAG jsonl (``.jsonl``, ``.jsonl.gz``) or Search-R1 ``.parquet``.

    ``data_source`` fills rows that carry none (default: the file's folder name, as in
    FlashRAG's ``<dataset>/<split>.jsonl`` layout)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such QA file")
    source = data_source or p.resolve().parent.name or "unknown"
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_flashrag(p, source)
    if name.endswith(".parquet"):
        return _read_search_r1(p, source)
    raise DataFormatError(f"{p}: unsupported QA file type; use FlashRAG .jsonl or Search-R1 "
                          f".parquet")


def read_corpus(path: str | os.PathLike, limit: int | None = None) -> Iterator[dict]:
    """Stream wiki-18 passages ``{"id": str, "contents": "\\"Title\\"\\ntext"}`` from a
    ``.jsonl`` / ``.jsonl.gz`` file, one line at a time. Rows with ``title`` and ``text``
    instead of ``contents`` are converted. ``limit`` stops after that many passages."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such corpus file")
    if limit is not None and limit <= 0:
        return
    count = 0
    for lineno, obj in _iter_jsonl(p):
        where = _where(p, line=lineno)
        pid = obj.get("id")
        if pid is None or isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataFormatError(f"{where}: field 'id' must be a string or an integer, got "
                                  f"{_type_name(pid)}")
        contents = obj.get("contents")
        if contents is None and isinstance(obj.get("text"), str):
            contents = f'"{obj.get("title") or ""}"\n{obj["text"]}'
        if not isinstance(contents, str):
            raise DataFormatError(f"{where}: field 'contents' must be a string "
                                  f"('\"Title\"\\ntext'), got {_type_name(contents)}")
        yield {"id": str(pid), "contents": contents}
        count += 1
        if limit is not None and count >= limit:
            return


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """One JSON object per line (UTF-8, keys in row order), written atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
    return p


def write_parquet(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Rows as a parquet table (columns inferred by pyarrow), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows))
    tmp = p.with_name(p.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, p)
    return p


def search_r1_rows(rows: Iterable[dict], split: str, data_source: str | None = None) -> list[dict]:
    """QA rows in Search-R1's training-parquet shape (prompt = the Search-R1 instruction +
    question, reward_model.ground_truth.target = gold answers), FlashRAG columns kept."""
    from searche1_ray.trajectory import question_text

    out = []
    for i, r in enumerate(rows):
        out.append({
            "id": r["id"], "question": r["question"], "golden_answers": list(r["golden_answers"]),
            "data_source": data_source or r.get("data_source") or "synthetic",
            "prompt": [{"role": "user", "content": question_text(r["question"])}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": list(r["golden_answers"])}},
            "extra_info": {"split": split, "index": i},
            # parquet cannot store an empty struct: metadata travels as JSON text
            "metadata_json": json.dumps(r.get("metadata") or {}, ensure_ascii=False),
        })
    return out
