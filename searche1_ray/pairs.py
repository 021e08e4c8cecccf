"""OPSD pair mining as a Ray Data pipeline: rollout rows → groupby(question_id) → mine_pair → pairs.

For each question's K sibling rollouts ``searche1_ray.opsd.mine_references`` picks the reference
(correct, fewest searches, shortest) and the student (the incorrect rollout farthest in character
edit distance from it, else the farthest other correct one — the "correct fallback"). Mining
compares the *policy text* of each rollout: its response without the retrieved
``<information>`` blocks (those are the retriever's words, not the policy's).

One output row per question (``PAIR_SCHEMA``): ``status`` = ``pair`` or ``dropped``
(``drop_reason`` = ``no_correct`` / ``no_student``); a pair row carries the student rollout's
token ids and loss mask (what the loss trains on) and the references, whole and as policy text
(what the teacher reads, ``opsd.teacher_reference``). ``mine_group`` is the pure per-question function; ``mine_pairs`` runs it on Ray
Data and returns the pair rows plus counts. Ray is imported only inside ``mine_pairs``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from rapidfuzz.distance import Levenshtein

from searche1_ray.opsd import mine_references
from searche1_ray.trajectory import strip_information

log = logging.getLogger(__name__)

# rollout-row columns the mining reads (the rollout contract has more; they are not needed)
ROLLOUT_COLUMNS = ("question_id", "sample_idx", "question", "golden_answers", "response", "prompt_ids",
                   "response_ids", "loss_mask", "num_searches", "reward")

PAIR_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("question", pa.string()),
    ("golden_answers", pa.list_(pa.string())),
    ("status", pa.string()),                 # pair | dropped
    ("drop_reason", pa.string()),            # "" | no_correct | no_student
    ("student_kind", pa.string()),           # "" | incorrect | correct_fallback
    ("num_rollouts", pa.int64()),
    ("num_correct", pa.int64()),
    ("student_sample_idx", pa.int64()),
    ("student_reward", pa.float64()),
    ("student_num_searches", pa.int64()),
    ("student_text", pa.string()),
    ("edit_distance", pa.int64()),           # Lev(student policy text, reference policy text)
    ("prompt_ids", pa.list_(pa.int64())),    # the student rollout's prompt (= P_S)
    ("response_ids", pa.list_(pa.int64())),
    ("loss_mask", pa.list_(pa.int64())),
    ("reference_sample_idxs", pa.list_(pa.int64())),
    ("reference_num_searches", pa.list_(pa.int64())),
    ("reference_texts", pa.list_(pa.string())),      # policy text (no <information>)
    ("reference_responses", pa.list_(pa.string())),  # the whole responses (Eq. 4's teacher context)
])


def policy_text(response: str) -> str:
    """A rollout's response without retrieved ``<information>`` blocks: what mining compares and
    what the teacher is shown of a reference."""
    return strip_information(response or "").strip()


def _empty_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    first = rows[0]
    return {"question_id": str(first["question_id"]), "question": str(first["question"]),
            "golden_answers": [str(a) for a in first.get("golden_answers") or []],
            "status": "dropped", "drop_reason": "", "student_kind": "", "num_rollouts": len(rows),
            "num_correct": sum(1 for r in rows if float(r["reward"]) > 0.5),
            "student_sample_idx": -1, "student_reward": 0.0, "student_num_searches": 0,
            "student_text": "", "edit_distance": 0, "prompt_ids": [], "response_ids": [],
            "loss_mask": [], "reference_sample_idxs": [], "reference_num_searches": [],
            "reference_texts": [], "reference_responses": []}


def mine_group(rows: Sequence[dict[str, Any]], num_references: int = 1) -> dict[str, Any]:
    """The pair row (``PAIR_SCHEMA``) for one question's sibling rollouts (rollout-row dicts)."""
    if not rows:
        raise ValueError("pair mining: a question group with no rollouts")
    rows = sorted(rows, key=lambda r: int(r.get("sample_idx", 0)))
    out = _empty_row(rows)
    cands = [{"text": policy_text(r["response"]), "reward": float(r["reward"]),
              "num_searches": int(r["num_searches"]), "row": r} for r in rows]
    mined = mine_references(cands, num_references)
    if mined is None:
        out["drop_reason"] = "no_correct" if out["num_correct"] == 0 else "no_student"
        return out
    refs, student = mined
    s = student["row"]
    out.update({
        "status": "pair",
        "student_kind": "correct_fallback" if student["reward"] > 0.5 else "incorrect",
        "student_sample_idx": int(s.get("sample_idx", 0)), "student_reward": float(s["reward"]),
        "student_num_searches": int(s["num_searches"]), "student_text": student["text"],
        "edit_distance": int(Levenshtein.distance(student["text"], refs[0]["text"])),
        "prompt_ids": [int(t) for t in s["prompt_ids"]],
        "response_ids": [int(t) for t in s["response_ids"]],
        "loss_mask": [int(m) for m in s["loss_mask"]],
        "reference_sample_idxs": [int(r["row"].get("sample_idx", 0)) for r in refs],
        "reference_num_searches": [int(r["num_searches"]) for r in refs],
        "reference_texts": [r["text"] for r in refs],
        "reference_responses": [str(r["row"]["response"]).strip() for r in refs],
    })
    return out


STUDENT_SEARCH_RULES = ("any", "at_most_reference")


def filter_by_searches(pairs: Sequence[dict[str, Any]], rule: str = "any") -> list[dict[str, Any]]:
    """The pairs ``opsd.student_searches`` trains on. "any" = every mined pair (the paper).
    "at_most_reference" = only pairs whose student searched no more often than its reference
    (``reference_num_searches[0]``): the reference is the correct rollout with the *fewest*
    searches, so a student that searched more learns above all to search less — which a small
    policy then applies to multi-hop questions that need the searches (bench/ablation.py,
    2026-12-08: single-hop pairs with one-search references were 46 % of a round's pairs and
    test searches fell 1.88 -> 1.69 on every question type)."""
    if rule not in STUDENT_SEARCH_RULES:
        raise ValueError(f"opsd.student_searches must be one of {STUDENT_SEARCH_RULES}, got {rule!r}")
    if rule == "any":
        return list(pairs)
    return [p for p in pairs if int(p["student_num_searches"]) <= int(p["reference_num_searches"][0])]


def pair_counts(mined: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Counts over mined rows: questions, pairs, dropped (+ by reason), student kinds."""
    c = {"questions": 0, "pairs": 0, "dropped": 0, "dropped_no_correct": 0, "dropped_no_student": 0,
         "incorrect_student": 0, "correct_fallback": 0}
    for r in mined:
        c["questions"] += 1
        if r["status"] == "pair":
            c["pairs"] += 1
            c["incorrect_student" if r["student_kind"] == "incorrect" else "correct_fallback"] += 1
        else:
            c["dropped"] += 1
            c[f"dropped_{r['drop_reason']}"] += 1
    return c


def _mine_table(group: pa.Table, num_references: int) -> pa.Table:
    return pa.Table.from_pylist([mine_group(group.to_pylist(), num_references)], schema=PAIR_SCHEMA)


def rollouts_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rollout rows as an Arrow table of the columns mining needs (named errors if one is missing)."""
    if not rows:
        raise ValueError("pair mining: no rollout rows")
    missing = [c for c in ROLLOUT_COLUMNS if c not in rows[0]]
    if missing:
        raise KeyError(f"pair mining: rollout rows lack column(s) {missing}; see the rollout-row "
                       "contract in /work/shared/DESIGN.md")
    return pa.Table.from_pylist([{c: r[c] for c in ROLLOUT_COLUMNS} for r in rows])


def mine_pairs(rollouts: Sequence[dict[str, Any]] | pa.Table | Any, num_references: int = 1,
               out_path: str | Path | None = None, num_partitions: int = 2
               ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Run pair mining on Ray Data (``groupby(question_id).map_groups(mine_group)``).

    ``rollouts`` is a list of rollout rows, an Arrow table or a ``ray.data.Dataset``. Returns
    ``(pairs, counts)``: the ``status == "pair"`` rows sorted by question id, and
    ``pair_counts`` over all questions. With ``out_path`` every mined row (dropped ones too) is
    written there as one Parquet file.
    """
    import ray.data

    if isinstance(rollouts, ray.data.Dataset):
        ds = rollouts.select_columns(list(ROLLOUT_COLUMNS))
    else:
        table = rollouts if isinstance(rollouts, pa.Table) else rollouts_table(rollouts)
        ds = ray.data.from_arrow(table)
    mined_ds = ds.groupby("question_id", num_partitions=num_partitions).map_groups(
        _mine_table, batch_format="pyarrow", fn_kwargs={"num_references": num_references})
    blocks = [b for b in (ray.get(ref) for ref in mined_ds.to_arrow_refs()) if b.num_rows]
    table = pa.concat_tables(blocks, promote_options="default") if blocks else PAIR_SCHEMA.empty_table()
    table = table.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA).sort_by("question_id")
    if out_path is not None:
        from searche1_ray.durable import atomic_write_with

        atomic_write_with(out_path, lambda tmp: pq.write_table(table, str(tmp)))
    mined = table.to_pylist()
    counts = pair_counts(mined)
    log.info("pair mining: %d questions -> %d pairs (%d incorrect students, %d correct fallbacks), "
             "%d dropped (%d with no correct rollout)", counts["questions"], counts["pairs"],
             counts["incorrect_student"], counts["correct_fallback"], counts["dropped"],
             counts["dropped_no_correct"])
    return [r for r in mined if r["status"] == "pair"], counts
