"""Which training questions a GRPO step rolls out: a seeded sample, optionally stratified.

``step_questions(train, n, seed, stratify_by="")`` draws ``n`` distinct questions.
``hold_out(rows, n, seed)`` splits a validation set off the training questions (``data.dev_from_train``).

- With ``stratify_by`` empty (the paper): a uniform sample without replacement.
- With a dotted field such as ``metadata.type`` (the synthetic world's question types) or
  ``data_source`` (Search-R1's NQ / HotpotQA mix): the same number of questions from every stratum
  (``n // k`` each for ``k`` strata). The ``n mod k`` left over go to strata drawn at random, and a
  stratum with too few questions hands its share to the others. Every step then sees every kind of
  question, so an update cannot follow whichever kind the step happened to draw most of.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class StratifyError(ValueError):
    """A training row lacks the field that ``grpo.stratify_by`` names."""


def field_value(row: dict, dotted: str):
    """``row["a"]["b"]`` for ``dotted="a.b"``; KeyError if any part is missing."""
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def strata(rows: Sequence[dict], dotted: str) -> dict[str, list[int]]:
    """Row indices by the value of ``dotted``, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        try:
            key = field_value(row, dotted)
        except KeyError:
            raise StratifyError(f"grpo.stratify_by={dotted!r}: training row {i} (id {row.get('id')!r}) has no "
                                f"such field; set grpo.stratify_by to a field every row has, or to '' "
                                f"for a uniform sample") from None
        out.setdefault(str(key), []).append(i)
    return out


def step_questions(train: Sequence[dict], n: int, seed: str | int, stratify_by: str = "") -> list[dict]:
    """``min(n, len(train))`` distinct rows of ``train``, reproducible from ``seed``."""
    rng = random.Random(seed)
    n = min(n, len(train))
    if not stratify_by:
        return rng.sample(list(train), n)
    groups = strata(train, stratify_by)
    names = sorted(groups)
    # shuffle within each stratum once; a stratum's draw is a prefix of its shuffled list
    order = {k: rng.sample(groups[k], len(groups[k])) for k in names}
    take = dict.fromkeys(names, 0)
    left = n
    while left:
        open_ = [k for k in names if take[k] < len(order[k])]
        share, extra = divmod(left, len(open_))
        lucky = set(rng.sample(open_, extra))
        for k in open_:
            got = min(share + (k in lucky), len(order[k]) - take[k])
            take[k] += got
            left -= got
    picked = [i for k in names for i in order[k][: take[k]]]
    rng.shuffle(picked)
    return [train[i] for i in picked]


def hold_out(rows: Sequence[dict], n: int, seed: str | int) -> tuple[list[dict], list[dict]]:
    """(train, dev): ``n`` rows drawn with ``seed`` form dev, the rest stay for training; both keep
    the file's order. Seeded by ``seed`` alone, so a resumed run holds out the same questions."""
    if not 0 < n < len(rows):
        raise ValueError(f"data.dev_from_train={n}: must be between 1 and the number of training "
                         f"questions - 1 ({len(rows) - 1})")
    dev = set(random.Random(f"dev-{seed}").sample(range(len(rows)), n))
    return ([r for i, r in enumerate(rows) if i not in dev], [r for i, r in enumerate(rows) if i in dev])


def first_per_source(rows: Sequence[dict], limit: int) -> list[dict]:
    """The first ``limit`` rows of each ``data_source``, in the file's order (``limit`` 0 = all).
    ``eval.limit`` means this everywhere: on Search-R1's merged test parquet (NQ's rows first,
    then TriviaQA's, …) a plain ``rows[:limit]`` would score NQ alone; a split of one source
    keeps its first ``limit`` rows, as before."""
    if not limit:
        return list(rows)
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        src = str(r.get("data_source") or "")
        if seen.get(src, 0) < limit:
            seen[src] = seen.get(src, 0) + 1
            out.append(r)
    return out


def eval_questions(rows: Sequence[dict], limit: int, max_total: int = 0) -> list[dict]:
    """The questions an evaluation or a validation scores: the first ``limit`` of each data
    source (``eval.limit``), then at most ``max_total`` in all (``data.max_eval_questions``);
    0 = no bound."""
    return first_per_source(rows, limit)[: max_total or None]
