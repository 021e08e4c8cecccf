"""One GRPO step of a round: rollout → Ray Data advantages → Ray Train update → weight sync.

    rows    = pool.generate(questions, n=G)               G trajectories per question (vLLM + retriever)
    samples = pipelines.grpo_batch(rows)                   groupby(question) → A_i; Parquet of the rows
    metrics = runner.step(samples)                         PPO-clip + k3 KL, DeepSpeed (tasks.GRPOTask)
    pool.update_weights(runner.get_weights_ref(), version) new policy into the engines, in place

The driver (actors/driver.py) and ``jobs/train_grpo.py`` call ``grpo_step`` once per step; a
round is N of them against one long-lived TrainRunner.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from searche1_ray.config import Config

log = logging.getLogger(__name__)


def rollout_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """``rollout/…`` means over the trajectories of a step."""
    n = len(rows)
    if n == 0:
        return {}
    answered = sum(r.get("answer") is not None for r in rows)
    policy_tokens = sum(sum(r["loss_mask"]) for r in rows)
    by_q: dict[str, list[float]] = {}
    for r in rows:
        by_q.setdefault(str(r["question_id"]), []).append(float(r["reward"]))
    mixed = sum(1 for v in by_q.values() if min(v) != max(v))
    return {
        "rollout/reward_mean": sum(float(r["reward"]) for r in rows) / n,
        "rollout/num_searches": sum(int(r["num_searches"]) for r in rows) / n,
        "rollout/response_len": sum(len(r["response_ids"]) for r in rows) / n,
        "rollout/policy_tokens": policy_tokens / n,
        "rollout/answered": answered / n,
        "rollout/groups_with_signal": mixed / max(1, len(by_q)),
        "rollout/trajectories": float(n),
    }


def grpo_step(cfg: Config, pool: Any, runner: Any, tokenizer: Any, questions: Sequence[dict],
              parquet_path: str | Path | None, version: int, drop_zero_advantage: bool | None = None,
              seed: int | None = None) -> dict[str, float]:
    """Run one GRPO step and return its metrics (rollout/, grpo/, perf/). ``questions`` are
    ``{id, question, golden_answers}`` dicts; the new weights are in ``pool`` as ``version``
    when this returns. ``tokenizer`` is unused (rows carry token ids) and kept for the caller's
    signature; ``seed`` makes the step's sampling reproducible. ``drop_zero_advantage`` (None =
    ``grpo.skip_zero_advantage``) leaves groups with equal rewards out of the update."""
    from searche1_ray.pipelines import grpo_batch

    if drop_zero_advantage is None:
        drop_zero_advantage = cfg.grpo.skip_zero_advantage
    t_step = time.time()
    qs = [{"id": str(q["id"]), "question": q["question"], "golden_answers": list(q["golden_answers"])}
          for q in questions]
    t0 = time.time()
    rows = pool.generate(qs, n=cfg.rollout.group_size, temperature=cfg.rollout.temperature, seed=seed)
    rollout_s = time.time() - t0
    metrics = rollout_metrics(rows)
    metrics["perf/rollout_s"] = rollout_s
    # the part of rollout_s spent waiting on the retriever / in the engine (summed over workers)
    stats = getattr(pool, "last_stats", None) or {}
    metrics["perf/retrieval_s"] = float(stats.get("engine_retrieve_s", 0.0))
    metrics["perf/generate_s"] = float(stats.get("engine_generate_s", 0.0))
    t0 = time.time()
    samples, _ = grpo_batch(rows, cfg.train.max_seq_len, parquet_path, drop_zero_advantage=drop_zero_advantage)
    metrics["perf/pipeline_s"] = time.time() - t0
    if samples:
        metrics.update(runner.step(samples))
    else:  # every group had equal rewards and was dropped: nothing to learn from
        log.info("GRPO step: no group with a reward signal; skipping the update")
        metrics["perf/train_s"] = 0.0
    t0 = time.time()
    if samples:
        pool.update_weights(runner.get_weights_ref(), version)
    metrics["perf/sync_s"] = time.time() - t0
    metrics["perf/step_s"] = time.time() - t_step
    total_tokens = sum(len(r["response_ids"]) for r in rows)
    metrics["perf/tokens_per_s"] = total_tokens / rollout_s if rollout_s > 0 else 0.0
    return metrics
