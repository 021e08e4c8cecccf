"""jobs.evaluate end to end on a small synthetic world: the real retriever (Serve), the real rollout
pool (vLLM on SmolLM2), greedy rollouts, the report files; a rerun of a finished evaluation
starts no engine and rewrites the same report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import ray_fixture, world_fixture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 2


ray_local = ray_fixture("re", num_cpus=4, repo_on_pythonpath=True, log_to_driver=False, stop_serve=True,
                        remove_tmp=True)
world = world_fixture(num_questions=100)   # 200 passages, 20 test questions


def _args(world: Path, out: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "smoke.yaml"), "--data", str(world), "--limit", str(LIMIT),
            "--out", str(out), "--quiet", "--set", "retriever.port=0", "--set", "retriever.app_name=retriever-evaltest",
            "--set", "rollout.max_turn_tokens=48", "--set", "rollout.max_response_tokens=160"]


def test_evaluate_end_to_end_and_resume(ray_local, world, tmp_path, capsys, monkeypatch):
    from jobs.evaluate import main
    from searche1_ray.rewards import exact_match

    test_rows = [json.loads(l) for l in (world / "test.jsonl").read_text().splitlines()]
    types = sorted({r["metadata"]["type"] for r in test_rows})
    out = tmp_path / "eval"
    assert main(_args(world, out)) == 0
    printed = capsys.readouterr().out
    assert "| Method |" in printed and "questions/s" in printed

    summary = json.loads((out / "eval.json").read_text())
    assert sorted(summary["datasets"]) == types
    by_id = {r["id"]: r for r in test_rows}
    for name, r in summary["datasets"].items():
        expected_n = min(LIMIT, sum(1 for q in test_rows if q["metadata"]["type"] == name))
        assert r["n"] == expected_n and 0.0 <= r["em"] <= 1.0 and r["questions_per_s"] > 0
        traj = pq.read_table(out / "trajectories" / f"{name}.parquet").to_pylist()
        assert len(traj) == expected_n
        for t in traj:
            q = by_id[t["question_id"]]
            assert q["metadata"]["type"] == name and t["golden_answers"] == q["golden_answers"]
            assert t["em"] == exact_match(t["answer"], q["golden_answers"])     # EM recomputed from the answer
            assert 0 <= t["num_searches"] <= 4 and t["response"] and t["response_tokens"] > 0
        assert r["em"] == pytest.approx(sum(t["em"] for t in traj) / len(traj))
        assert r["num_searches"] == pytest.approx(sum(t["num_searches"] for t in traj) / len(traj))
    assert summary["average"] == pytest.approx(sum(r["em"] for r in summary["datasets"].values()) / len(types))
    table = (out / "table.md").read_text()
    assert "| Method | " + " | ".join(t for t in ("single_hop", "two_hop", "comparison", "bridge") if t in types) in table
    assert (out / "em.png").stat().st_size > 1000

    # resume: every dataset is done, so a rerun starts no engine and rewrites the same report
    # (a partly done folder reruns only what is missing: tests/unit/test_eval_report.py)
    import actors.rollout_worker

    def no_engine(*a, **k):
        raise AssertionError("a rerun of a finished evaluation started a rollout pool")

    monkeypatch.setattr(actors.rollout_worker, "RolloutPool", no_engine)
    stamps = {t: os.stat(out / "trajectories" / f"{t}.parquet").st_mtime_ns for t in types}
    (out / "table.md").unlink()
    assert main(_args(world, out)) == 0
    assert "| Method |" in capsys.readouterr().out
    for t in types:
        assert os.stat(out / "trajectories" / f"{t}.parquet").st_mtime_ns == stamps[t], t
    assert json.loads((out / "eval.json").read_text())["datasets"] == summary["datasets"]
    assert (out / "table.md").read_text() == table
