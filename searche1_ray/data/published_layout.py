"""Write a synthetic world in the on-disk layouts the real data is published in, so the paper
recipe can be rehearsed on CPU with the readers, ids and file names a GPU run meets.

    <out>/wiki-18.jsonl                         the corpus, {"id", "contents": "\"Title\"\ntext"}
    <out>/nq_hotpotqa_train/train.parquet       Search-R1's merged training mix
    <out>/nq_hotpotqa_train/test.parquet        Search-R1's merged seven-benchmark test set
    <out>/flashrag/<benchmark>/test.jsonl       FlashRAG's per-dataset files, seven benchmark names

The parquet rows have exactly the columns of Search-R1's ``scripts/data_process/nq_search.py``
output (``datasets.map`` keeps FlashRAG's ``id``, ``question``, ``golden_answers`` beside the new
``data_source``, ``prompt``, ``ability``, ``reward_model.ground_truth.target``,
``extra_info.{split,index}``), and each source numbers its own rows (``train_0``… in NQ *and* in
HotpotQA), as the merged files do. The world's single-hop questions play the single-hop sources
(NQ in training; NQ, TriviaQA, PopQA in the test set), its multi-hop questions the multi-hop ones
(HotpotQA; HotpotQA, 2Wiki, Musique, Bamboogle), dealt round-robin in the world's order. FlashRAG
rows are ``{"id", "question", "golden_answers", "metadata": {}}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from searche1_ray.data.readers import write_jsonl, write_parquet
from searche1_ray.data.world import World
from searche1_ray.trajectory import question_text

SINGLE_HOP = ("nq", "triviaqa", "popqa")                             # the paper's seven benchmarks,
MULTI_HOP = ("hotpotqa", "2wikimultihopqa", "musique", "bamboogle")  # in its Table 1 order
TRAIN_SOURCES = ("nq", "hotpotqa")     # Search-R1's nq_hotpotqa_train


def _deal(questions: list[dict], single: tuple[str, ...], multi: tuple[str, ...]) -> dict[str, list[dict]]:
    """Questions per source name: single-hop ones round-robin over ``single``, the rest over ``multi``."""
    out: dict[str, list[dict]] = {name: [] for name in (*single, *multi)}
    counts = {"single": 0, "multi": 0}
    for q in questions:
        kind = "single" if (q.get("metadata") or {}).get("type") == "single_hop" else "multi"
        names = single if kind == "single" else multi
        out[names[counts[kind] % len(names)]].append(q)
        counts[kind] += 1
    return out


def _search_r1_row(q: dict, source: str, split: str, index: int) -> dict[str, Any]:
    return {"id": f"{split}_{index}", "question": q["question"], "golden_answers": list(q["golden_answers"]),
            "data_source": source,
            "prompt": [{"role": "user", "content": question_text(q["question"])}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": list(q["golden_answers"])}},
            "extra_info": {"split": split, "index": index}}


def write_published_layout(world: World, out: str | Path) -> dict[str, Path]:
    """Write ``world`` under ``out`` in the layout above; returns the paths by role
    (``corpus``, ``train``, ``test``, ``flashrag``)."""
    out = Path(out)
    paths = {"corpus": write_jsonl(world.corpus, out / "wiki-18.jsonl")}
    train = _deal(world.splits["train"], TRAIN_SOURCES[:1], TRAIN_SOURCES[1:])
    paths["train"] = write_parquet([_search_r1_row(q, src, "train", i) for src in TRAIN_SOURCES
                                    for i, q in enumerate(train[src])],
                                   out / "nq_hotpotqa_train" / "train.parquet")
    test = _deal(world.splits["test"], SINGLE_HOP, MULTI_HOP)
    paths["test"] = write_parquet([_search_r1_row(q, src, "test", i) for src in (*SINGLE_HOP, *MULTI_HOP)
                                   for i, q in enumerate(test[src])],
                                  out / "nq_hotpotqa_train" / "test.parquet")
    for src in (*SINGLE_HOP, *MULTI_HOP):
        write_jsonl([{"id": f"test_{i}", "question": q["question"], "golden_answers": list(q["golden_answers"]),
                      "metadata": {}}
                     for i, q in enumerate(test[src])], out / "flashrag" / src / "test.jsonl")
    paths["flashrag"] = out / "flashrag"
    return paths
