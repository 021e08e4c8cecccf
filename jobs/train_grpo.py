"""One GRPO round end to end: data → retriever → rollout pool → N steps of rollout / update / sync.

    python -m jobs.train_grpo --config configs/smoke.yaml
    python -m jobs.train_grpo --config configs/smoke.yaml --set grpo.steps_per_round=2 --model runs/x/checkpoints/warmstart
    python -m jobs.train_grpo --warmstart            # SFT on oracle trajectories first (CPU testbed)

Each step (searche1_ray/grpo_round.py): G = rollout.group_size trajectories for
grpo.questions_per_step train questions (vLLM + the retriever Serve app), group-normalised EM
advantages with Ray Data, a PPO-clip + KL update on the long-lived Ray Train runner (DeepSpeed
ZeRO-2 on CPU), the new weights pushed into the rollout engines. Rollouts go to
<run>/rollouts/grpo/stepNNNN.parquet, metrics to <run>/grpo_metrics.jsonl and TensorBoard
(<run>/tb), checkpoints (HF folders) to <run>/checkpoints/ every grpo.checkpoint_every steps.
With --eval N it also reports greedy EM on N dev questions before and after the round.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from jobs._cli import (add_address_arg, add_config_args, init_ray, job_parser, load_cli_config, setup_logging,
                       shutdown_ray)

log = logging.getLogger("searche1.train_grpo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser("jobs.train_grpo", __doc__)
    add_config_args(p, example="grpo.lr=1e-6")
    p.add_argument("--name", help="run name (= run.name)")
    p.add_argument("--model", help="starting policy: HF folder or id (default: model.name)")
    p.add_argument("--warmstart", action="store_true",
                   help="run the warm-start SFT (warmstart.*) on the starting policy first")
    p.add_argument("--steps", type=int, help="GRPO steps (default: grpo.steps_per_round)")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="greedy EM on the first N dev questions before and after the round (default 0: off)")
    p.add_argument("--drop-zero-advantage", action="store_true", default=None,
                   help="leave groups with equal rewards (A = 0) out of the update (faster on CPU; "
                        "default: grpo.skip_zero_advantage)")
    add_address_arg(p)
    return p.parse_args(argv)


def run_round(cfg, model_path: str, steps: int, eval_n: int = 0, warmstart: bool = False,
              drop_zero_advantage: bool | None = None) -> dict:
    """Set up the parts, run ``steps`` GRPO steps, tear down; returns a summary dict."""
    from torch.utils.tensorboard import SummaryWriter

    from actors.retriever import default_index_dir, start_retriever
    from actors.rollout_worker import RolloutPool
    from searche1_ray.data.prepare import prepare_data, read_splits
    from searche1_ray.data.sampling import step_questions, strata
    from searche1_ray.durable import atomic_write
    from searche1_ray.evaluation import evaluate_split
    from searche1_ray.grpo_round import grpo_step
    from searche1_ray.training.runner import TrainRunner
    from searche1_ray.training.tasks import GRPOTask

    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", cfg.to_yaml())
    data = prepare_data(cfg)
    splits = read_splits(cfg, data)
    train = splits["train"]
    if cfg.data.max_train_questions:
        train = train[: cfg.data.max_train_questions]
    if cfg.grpo.stratify_by:
        strata(train, cfg.grpo.stratify_by)  # a missing field fails now, not after the warm start
    dev = splits.get("dev", [])[:eval_n] if eval_n else []
    summary: dict = {"run_dir": str(run_dir)}
    tb = SummaryWriter(str(run_dir / "tb"))
    retriever, url = start_retriever(cfg, str(data.corpus), str(default_index_dir(cfg, data.dir)))
    log.info("retriever at %s", url)
    pool = RolloutPool(cfg, model_path, retriever)
    runner = None
    try:
        if warmstart:
            from searche1_ray.training.warmstart import run_warmstart

            model_path, ws = run_warmstart(cfg, model_path, str(run_dir / "checkpoints" / "warmstart"), data,
                                           pool=pool, eval_questions=dev or None)
            summary.update(ws)
            log.info("warm start: %s", {k: round(v, 4) for k, v in ws.items()})
        if dev:
            before = evaluate_split(pool, dev, run_dir / "eval" / "before.parquet", temperature=cfg.eval.temperature)
            summary["em_before"] = before["em"]
            log.info("dev EM before GRPO: %.3f (%d questions, answered %.2f)", before["em"], before["n"], before["answered"])
        runner = TrainRunner(cfg, model_path, GRPOTask(cfg), run_dir / "train" / "grpo")
        summary["perf/trainer_start_s"] = runner.start_s
        history = []
        with open(run_dir / "grpo_metrics.jsonl", "a") as fh:
            for step in range(steps):
                questions = step_questions(train, cfg.grpo.questions_per_step, f"{cfg.run.seed}-grpo-{step}",
                                           cfg.grpo.stratify_by)
                m = grpo_step(cfg, pool, runner, None, questions,
                              run_dir / "rollouts" / "grpo" / f"step{step:04d}.parquet", version=step + 1,
                              drop_zero_advantage=drop_zero_advantage)
                m["step"] = step + 1
                history.append(m)
                fh.write(json.dumps(m) + "\n")
                fh.flush()
                for k, v in m.items():
                    if "/" in k:
                        tb.add_scalar(k, v, step + 1)
                log.info("GRPO step %d/%d: reward %.3f, searches %.2f, loss %.4f, kl %.2e, gap %.3f | "
                         "step %.0f s = rollout %.0f (retrieval %.1f) + data %.1f + train %.0f + sync %.1f", step + 1, steps,
                         m.get("rollout/reward_mean", 0), m.get("rollout/num_searches", 0), m.get("grpo/loss", 0),
                         m.get("grpo/kl", 0), m.get("grpo/logprob_gap", 0), m["perf/step_s"], m["perf/rollout_s"],
                         m.get("perf/retrieval_s", 0.0), m["perf/pipeline_s"], m["perf/train_s"], m["perf/sync_s"])
                if (step + 1) % cfg.grpo.checkpoint_every == 0 or step + 1 == steps:
                    folder = runner.save_checkpoint(str(run_dir / "checkpoints" / f"grpo-step{step + 1:04d}"))
                    summary["policy"] = folder
        summary["history"] = history
        if dev:
            after = evaluate_split(pool, dev, run_dir / "eval" / "after.parquet", temperature=cfg.eval.temperature)
            summary["em_after"] = after["em"]
            log.info("dev EM after GRPO: %.3f", after["em"])
    finally:
        tb.close()
        if runner is not None:
            runner.stop()
        pool.shutdown()
    return summary


def main(argv: list[str] | None = None) -> int:
    setup_logging(show_logger=True)
    args = parse_args(argv)
    cfg = load_cli_config(args, [f"run.name={args.name}"] if args.name else [])
    from searche1_ray.model_store import resolve_model

    model_path = resolve_model(args.model or cfg.model.name, cfg.model.cache_dir, cfg.model.dtype)
    steps = cfg.grpo.steps_per_round if args.steps is None else args.steps
    init_ray(cfg, args.address)
    t0 = time.time()
    try:
        summary = run_round(cfg, model_path, steps, eval_n=args.eval, warmstart=args.warmstart,
                            drop_zero_advantage=args.drop_zero_advantage)
    finally:
        shutdown_ray()
    hist = summary.get("history", [])
    if hist:
        keys = ("perf/step_s", "perf/rollout_s", "perf/retrieval_s", "perf/pipeline_s", "perf/train_s", "perf/sync_s")
        mean = {k: sum(h.get(k, 0.0) for h in hist) / len(hist) for k in keys}
        print("mean step time: " + ", ".join(f"{k.split('/')[1]} {v:.1f}" for k, v in mean.items()))
        print("reward by step: " + " ".join(f"{h.get('rollout/reward_mean', 0):.2f}" for h in hist))
    for k in ("em_before", "em_after"):
        if k in summary:
            print(f"{k}={summary[k]:.3f}")
    print(f"GRPO round of {len(hist)} steps done in {time.time() - t0:.0f} s; run dir {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
