"""Questions are keyed by (data_source, id) end to end (issue 19): Search-R1's merged files keep
each source's own FlashRAG id, so ``train_0`` appears in NQ and in HotpotQA. Fixtures reproduce
the published schemas: ``scripts/data_process/nq_search.py``'s parquet (FlashRAG columns kept
beside ``data_source``, ``prompt``, ``ability``, ``reward_model.ground_truth.target``,
``extra_info.{split,index}``) and FlashRAG's per-dataset jsonl."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from searche1_ray.data.readers import DataFormatError, read_qa
from searche1_ray.evaluation import _trajectory_row, _write_trajectories, discover_datasets
from searche1_ray.paired import em_by_type, question_types
from searche1_ray.pairs import mine_group, rollouts_table

INSTRUCTION = ("Answer the given question. You must conduct reasoning inside <think> and </think> "
               "first every time you get new information. ... Question: ")


def search_r1_rows(source: str, split: str, questions: list[tuple[str, str]], flashrag=True):
    """Rows as Search-R1's nq_search.py writes them (``datasets.map`` keeps FlashRAG's columns)."""
    rows = []
    for i, (q, a) in enumerate(questions):
        row = {"data_source": source,
               "prompt": [{"role": "user", "content": f"{INSTRUCTION}{q}?\n"}],
               "ability": "fact-reasoning",
               "reward_model": {"style": "rule", "ground_truth": {"target": [a]}},
               "extra_info": {"split": split, "index": i}}
        if flashrag:
            row = {"id": f"{split}_{i}", "question": q, "golden_answers": [a], **row}
        rows.append(row)
    return rows


NQ = [("who wrote hamlet", "Shakespeare"), ("capital of france", "Paris")]
HOTPOT = [("which river flows through the city where hamlet was written", "Thames"),
          ("who is older, ann or bob", "Ann")]


@pytest.fixture
def merged_train(tmp_path):
    path = tmp_path / "nq_hotpotqa_train" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(search_r1_rows("nq", "train", NQ)
                                        + search_r1_rows("hotpotqa", "train", HOTPOT)), path)
    return path


def test_merged_search_r1_train_keys_repeated_ids_by_source(merged_train):
    rows = read_qa(merged_train)
    assert [r["id"] for r in rows] == ["nq/train_0", "nq/train_1", "hotpotqa/train_0", "hotpotqa/train_1"]
    assert [r["source_id"] for r in rows] == ["train_0", "train_1", "train_0", "train_1"]
    assert [r["data_source"] for r in rows] == ["nq", "nq", "hotpotqa", "hotpotqa"]
    assert rows[2]["golden_answers"] == ["Thames"] and rows[2]["question"] == HOTPOT[0][0]


def test_merged_parquet_without_flashrag_columns_keys_extra_info_index(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(search_r1_rows("nq", "train", NQ, flashrag=False)
                                        + search_r1_rows("hotpotqa", "train", HOTPOT, flashrag=False)), path)
    rows = read_qa(path)
    assert [r["id"] for r in rows] == ["nq/0", "nq/1", "hotpotqa/0", "hotpotqa/1"]
    assert rows[3]["question"] == "who is older, ann or bob?"   # from the prompt, after "Question:"


def test_single_source_files_keep_plain_ids(tmp_path):
    path = tmp_path / "nq" / "test.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"id": f"test_{i}", "question": q, "golden_answers": [a]}) + "\n"
                            for i, (q, a) in enumerate(NQ)))
    rows = read_qa(path)
    assert [r["id"] for r in rows] == ["test_0", "test_1"] and "source_id" not in rows[0]
    assert {r["data_source"] for r in rows} == {"nq"}


def test_a_repeat_within_one_source_is_still_an_error(tmp_path):
    path = tmp_path / "train.parquet"
    rows = search_r1_rows("nq", "train", NQ) + search_r1_rows("hotpotqa", "train", HOTPOT)
    rows[1]["id"] = "train_0"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:row 1: field 'id' value 'train_0' "
                                                        f"repeats {path}:row 0 (data_source 'nq')")):
        read_qa(path)


def test_two_sources_with_one_id_stay_two_questions_end_to_end(merged_train, tmp_path):
    """read_qa → rollout rows (the search loop) → rollout Parquet → pairs → evaluation rows."""
    from transformers import AutoTokenizer

    from searche1_ray.engine.search_loop import LoopSettings, make_tasks, run_search_loop
    from searche1_ray.model_store import resolve_model
    from tests.unit.test_search_loop import Retriever, Scripted

    tok = AutoTokenizer.from_pretrained(resolve_model())
    questions = read_qa(merged_train)
    answers = {"nq/train_0": "Shakespeare", "nq/train_1": "Lyon", "hotpotqa/train_0": "Thames",
               "hotpotqa/train_1": "Bob"}
    scripts = {q["id"]: ["<search>x</search>", f"<answer>{answers[q['id']]}</answer>"] for q in questions}
    gen = Scripted(tok, scripts, questions)
    rows, _ = run_search_loop(make_tasks(questions, 2, tok), gen, Retriever(), tok,
                              LoopSettings(max_searches=4, max_turn_tokens=64, max_response_tokens=512,
                                           max_information_tokens=200, topk=2))
    keys = [(r["question_id"], r["sample_idx"]) for r in rows]
    assert len(set(keys)) == len(keys) == 8
    assert {r["question_id"] for r in rows} == set(answers)
    assert [r["reward"] for r in rows[::2]] == [1.0, 0.0, 1.0, 0.0]

    # the rollout Parquet keeps the keys apart
    path = tmp_path / "rollouts.parquet"
    pq.write_table(rollouts_table(rows), path)
    back = pq.read_table(path).to_pylist()
    groups: dict[str, list[dict]] = {}
    for r in back:
        groups.setdefault(r["question_id"], []).append(r)
    assert sorted(groups) == sorted(answers) and all(len(g) == 2 for g in groups.values())

    # pairs: one mined row per (source, id); the wrong sibling of a correct one makes a pair
    for g in groups.values():   # give each question one different, wrong sibling
        g[1] = {**g[1], "reward": 0.0, "response": g[1]["response"] + " no"}
    mined = {g[0]["question_id"]: mine_group(g) for g in groups.values()}
    assert {k: m["question_id"] for k, m in mined.items()} == {k: k for k in answers}
    assert mined["nq/train_0"]["status"] == mined["hotpotqa/train_0"]["status"] == "pair"
    assert mined["nq/train_1"]["drop_reason"] == "no_correct"

    # evaluation rows and the per-source EM
    first = [r for r in rows if r["sample_idx"] == 0]
    by_key = {q["id"]: q for q in questions}
    out = [_trajectory_row(r, by_key[r["question_id"]], by_key[r["question_id"]]["data_source"])
           for r in first]
    _write_trajectories(out, tmp_path / "eval.parquet")
    ev = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    assert [(r["question_id"], r["dataset"], r["em"]) for r in ev] == [
        ("nq/train_0", "nq", 1.0), ("nq/train_1", "nq", 0.0),
        ("hotpotqa/train_0", "hotpotqa", 1.0), ("hotpotqa/train_1", "hotpotqa", 0.0)]
    types = {q["id"]: q["data_source"] for q in questions}
    assert em_by_type(ev, types)["overall"] == 0.5
    assert len(question_types(questions)) == 4


def test_merged_test_parquet_splits_by_source_with_keyed_ids(tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(search_r1_rows("nq", "test", NQ)
                                        + search_r1_rows("hotpotqa", "test", HOTPOT)), path)
    found = discover_datasets(path)
    assert list(found) == ["nq", "hotpotqa"]
    assert [q["id"] for q in found["hotpotqa"].questions] == ["hotpotqa/test_0", "hotpotqa/test_1"]


class AnsweringPool:
    """A stand-in for RolloutPool.generate (the real pool runs in tests/integration): answers
    from a table, one row per question, as the pool's rows carry them."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, questions, n=1, temperature=0.0):
        return [{"question_id": q["id"], "sample_idx": 0, "answer": self.answers[q["id"]], "reward": 0.0,
                 "num_searches": 1, "queries": ["q"], "response": "", "response_ids": [1, 2],
                 "finish_reason": "stop", "policy_version": 0} for q in questions]


def test_in_run_evaluation_of_a_merged_test_set_reports_the_unweighted_dataset_average(tmp_path):
    from searche1_ray.evaluation import evaluate_split

    path = tmp_path / "test.parquet"
    hotpot4 = HOTPOT + [("third hotpot question", "C"), ("fourth hotpot question", "D")]
    pq.write_table(pa.Table.from_pylist(search_r1_rows("nq", "test", NQ)
                                        + search_r1_rows("hotpotqa", "test", hotpot4)), path)
    questions = read_qa(path)
    answers = {"nq/test_0": "Shakespeare", "nq/test_1": "Paris", "hotpotqa/test_0": "Thames",
               "hotpotqa/test_1": "x", "hotpotqa/test_2": "y", "hotpotqa/test_3": "z"}
    r = evaluate_split(AnsweringPool(answers), questions, tmp_path / "eval.parquet", progress=False)
    assert r["n"] == 6 and r["em"] == pytest.approx(3 / 6)                 # pooled over questions
    assert r["by_type"] == {"hotpotqa": 0.25, "nq": 1.0}
    assert r["avg"] == pytest.approx((1.0 + 0.25) / 2)                     # the paper's Avg.
    ev = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    assert [row["type"] for row in ev] == ["nq"] * 2 + ["hotpotqa"] * 4
    # one source: no per-dataset split, the pooled EM is the whole story
    one = evaluate_split(AnsweringPool(answers), questions[:2], None, progress=False)
    assert one["em"] == 1.0 and "avg" not in one


def test_published_layout_reads_back_as_the_real_files_do(tmp_path):
    from searche1_ray.data.published_layout import MULTI_HOP, SINGLE_HOP, write_published_layout
    from searche1_ray.data.readers import read_corpus
    from searche1_ray.data.world import generate_world

    world = generate_world(seed=1, num_questions=120)
    paths = write_published_layout(world, tmp_path)
    table = pq.read_table(paths["train"])
    assert set(table.column_names) == {"id", "question", "golden_answers", "data_source", "prompt", "ability",
                                       "reward_model", "extra_info"}          # nq_search.py's columns, no more
    train = read_qa(paths["train"])
    assert len(train) == len(world.splits["train"])
    assert {r["data_source"] for r in train} == {"nq", "hotpotqa"}
    assert {r["source_id"] for r in train if r["data_source"] == "nq"} & {
        r["source_id"] for r in train if r["data_source"] == "hotpotqa"}     # ids repeat across sources
    assert len({r["id"] for r in train}) == len(train)
    gold = {q["question"]: q["golden_answers"] for q in world.splits["train"]}
    assert all(gold[r["question"]] == r["golden_answers"] for r in train)
    found = discover_datasets(paths["test"])
    assert list(found) == [*SINGLE_HOP, *MULTI_HOP]
    assert sum(len(d.questions) for d in found.values()) == len(world.splits["test"])
    per_folder = discover_datasets(paths["flashrag"])
    assert {k: len(v.questions) for k, v in per_folder.items()} == {k: len(v.questions) for k, v in found.items()}
    assert sum(1 for _ in read_corpus(paths["corpus"])) == len(world.corpus)
