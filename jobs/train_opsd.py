"""Run one OPSD round (LoRA self-distillation, Search-E1 stage 2) from a given policy folder.

    python -m jobs.train_opsd --policy runs/smoke/checkpoints/grpo0-step0004
    python -m jobs.train_opsd --set opsd.questions_per_round=32 --set opsd.steps=6 --out runs/opsd-try
    python -m jobs.train_opsd --policy smollm2-135m-instruct --dev-limit 20

K = opsd.samples_per_question rollouts per training question (opsd.questions_per_round of them;
0 = all) through the rollout pool and retriever → pairs mined on Ray Data → opsd.steps LoRA steps
on Ray Train (teacher = adapter off + reference in the prompt) → dev EM every opsd.eval_every
steps with the merged weights → the best checkpoint, merged, in <out>/policy. Writes to --out:
rollouts.parquet, pairs.parquet, eval/step*.parquet, metrics.json, policy/ (when a trained
checkpoint beat the starting policy's dev EM). The full self-evolution loop is jobs.train.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from jobs._cli import (add_address_arg, add_config_args, init_ray_unless_running, job_parser, load_cli_config,
                       setup_logging, shutdown_ray)

log = logging.getLogger("searche1.train_opsd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser("jobs.train_opsd", __doc__)
    add_config_args(p, example="opsd.steps=12")
    p.add_argument("--policy", help="HF folder of the policy to distil (default: model.name, resolved)")
    p.add_argument("--out", help="output folder (default: <run.output_dir>/<run.name>/opsd/manual)")
    p.add_argument("--dev-limit", type=int,
                   help="dev questions per validation (default: the first eval.limit of each data source, at most "
                        "data.max_eval_questions in all; 0 = all)")
    p.add_argument("--version", type=int, default=1, help="policy version tag for the new weights (default 1)")
    add_address_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging(show_logger=True)
    args = parse_args(argv)
    cfg = load_cli_config(args)
    from actors.retriever import default_index_dir, start_retriever
    from actors.rollout_worker import RolloutPool
    from searche1_ray.data.prepare import prepare_data, read_splits
    from searche1_ray.data.sampling import eval_questions
    from searche1_ray.model_store import resolve_model
    from searche1_ray.training.opsd_round import run_opsd_round

    policy = resolve_model(args.policy or cfg.model.name, cfg.model.cache_dir, cfg.model.dtype)
    out = Path(args.out).expanduser() if args.out else cfg.run_dir / "opsd" / "manual"
    data = prepare_data(cfg)
    splits = read_splits(cfg, data)
    train = splits["train"]
    if cfg.data.max_train_questions:
        train = train[: cfg.data.max_train_questions]
    dev = splits.get("dev", [])
    if args.dev_limit is not None:
        dev = dev[: args.dev_limit or None]
    else:  # eval.limit: the first N of each data source; data.max_eval_questions: in all
        dev = eval_questions(dev, cfg.eval.limit, cfg.data.max_eval_questions)
    log.info("OPSD round from %s: %d training questions (%s sampled), %d dev questions -> %s", policy,
             len(train), cfg.opsd.questions_per_round or "all", len(dev), out)

    started_ray = init_ray_unless_running(cfg, args.address)
    pool = None
    t0 = time.time()
    try:
        retriever, url = start_retriever(cfg, str(data.corpus), str(default_index_dir(cfg, data.corpus.parent)))
        log.info("retriever at %s", url)
        pool = RolloutPool(cfg, policy, retriever)
        folder, metrics = run_opsd_round(cfg, pool, policy, train, dev, out, args.version,
                                         progress=not args.quiet)
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            shutdown_ray()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"policy_in": policy, "policy_out": folder, **metrics},
                                                 indent=2, default=str))
    evals = ", ".join(f"step {e['step']}: {e['em']:.3f}" for e in metrics.get("opsd/evals", []))
    print(f"OPSD round done in {time.time() - t0:.0f} s: {metrics.get('opsd/pairs', 0)} pairs "
          f"({metrics.get('opsd/dropped', 0)} questions dropped), KL {metrics.get('opsd/kl_first', float('nan')):.4f}"
          f" -> {metrics.get('opsd/kl_last', float('nan')):.4f}; dev EM {evals}")
    print(f"next policy: {folder}" + ("  (unchanged: no trained checkpoint beat it)" if folder == policy else ""))
    print(f"metrics: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
