"""Paired comparison of two policies on the same questions: EM per question type, wrong→right /
right→wrong counts and the exact two-sided sign test on them.

A learning claim here is paired: both policies answer the same held-out questions greedily, so
what differs is the policy, not the draw of questions. For one comparison (before → after):

    up   = #{q : EM_before(q) = 0, EM_after(q) = 1}      down = #{q : EM_before(q) = 1, EM_after(q) = 0}
    p    = P(min(U, n − U) ≤ min(up, down)) for U ~ Binomial(n = up + down, 1/2)   (two-sided)

Questions answered alike by both carry no information about which policy is better and are left
out, as the sign test does. Rows are per-question dicts with ``question_id`` and ``em`` (the
evaluation Parquet of ``searche1_ray.evaluation``); a question's type is ``metadata.type`` of the
question (the synthetic world's single_hop / two_hop / bridge / comparison), else "all".
Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence


def sign_test(up: int, down: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | each change is a fair coin)."""
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(up, down) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def question_types(questions: Iterable[Mapping[str, Any]], default: str = "all") -> dict[str, str]:
    """question id → its type (``metadata.type``; ``default`` when a question has none)."""
    return {str(q["id"]): str((q.get("metadata") or {}).get("type") or default) for q in questions}


def _em_by_id(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    return {str(r["question_id"]): float(r["em"]) for r in rows}


def em_by_type(rows: Iterable[Mapping[str, Any]], types: Mapping[str, str]) -> dict[str, float]:
    """Mean EM per question type, plus ``avg`` = the unweighted mean over the types (the paper's
    Avg. over datasets) and ``overall`` = the mean over all questions."""
    by: dict[str, list[float]] = {}
    allv: list[float] = []
    for qid, em in _em_by_id(rows).items():
        by.setdefault(types.get(qid, "all"), []).append(em)
        allv.append(em)
    out = {k: sum(v) / len(v) for k, v in sorted(by.items())}
    if out:
        out["avg"] = sum(out.values()) / len(out)
    out["overall"] = sum(allv) / len(allv) if allv else float("nan")
    return out


def paired_changes(before: Iterable[Mapping[str, Any]], after: Iterable[Mapping[str, Any]],
                   types: Mapping[str, str] | None = None) -> dict[str, Any]:
    """wrong→right (``up``) and right→wrong (``down``) over the questions both evaluated, their
    sign test ``p``, ``n`` = shared questions, and the same counts per type (``by_type``)."""
    b, a = _em_by_id(before), _em_by_id(after)
    shared = sorted(set(b) & set(a))
    types = types or {}
    by_type: dict[str, dict[str, int]] = {}
    up = down = 0
    for qid in shared:
        t = by_type.setdefault(types.get(qid, "all"), {"up": 0, "down": 0, "n": 0})
        t["n"] += 1
        if b[qid] < 0.5 <= a[qid]:
            up += 1
            t["up"] += 1
        elif a[qid] < 0.5 <= b[qid]:
            down += 1
            t["down"] += 1
    return {"up": up, "down": down, "n": len(shared), "p": sign_test(up, down),
            "by_type": dict(sorted(by_type.items()))}


def pooled(changes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several draws' ``paired_changes`` summed into one count, with the sign test of the sum."""
    up = sum(int(c["up"]) for c in changes)
    down = sum(int(c["down"]) for c in changes)
    return {"up": up, "down": down, "n": sum(int(c["n"]) for c in changes), "p": sign_test(up, down),
            "draws": len(changes)}
