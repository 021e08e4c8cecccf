"""Evaluate a policy on the seven QA benchmarks (or the synthetic world) as in the paper's Table 1.

    python -m jobs.evaluate --config configs/smoke.yaml --limit 20          # synthetic world, by type
    python -m jobs.evaluate --config configs/paper_qwen2.5_3b.yaml --model runs/x/checkpoints/opsd2 \\
        --data /data/flashrag                     # FlashRAG: <name>/test.jsonl, else dev.jsonl
    python -m jobs.evaluate --config configs/paper_qwen2.5_3b.yaml --data /data/search-r1/nq_hotpotqa_train/test.parquet
    python -m jobs.evaluate --config configs/paper_qwen2.5_7b.yaml --dry-run   # the Ray resource plan only

Greedy rollouts (eval.temperature, 0 = greedy) through the rollout pool + retriever; writes to
--out: datasets/<name>.json per finished dataset (a rerun skips those), trajectories/<name>.parquet,
eval.json, table.md (Table 1 layout, the paper's Search-E1 row beside ours) and em.png.
The retriever serves the data folder's corpus.jsonl (synthetic world) or data.corpus_path.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from jobs._cli import (add_address_arg, add_config_args, init_ray_unless_running, job_parser, load_cli_config,
                       setup_logging, shutdown_ray)

log = logging.getLogger("searche1.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser("jobs.evaluate", __doc__)
    add_config_args(p)
    p.add_argument("--model", help="HF folder, HF id or 'smollm2-135m-instruct' (default: model.name)")
    p.add_argument("--data", help="FlashRAG folder, Search-R1 test parquet, or synthetic world folder "
                                  "(default: the config's synthetic world / data.test_path)")
    p.add_argument("--datasets", help="comma-separated subset, e.g. nq,hotpotqa (default: all found)")
    p.add_argument("--limit", type=int, help="first N questions per dataset (default: eval.limit; 0 = all)")
    p.add_argument("--out", help="output folder (default: <run.output_dir>/eval/<model>__<data>)")
    add_address_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print the Ray resource plan and exit; start nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def data_path(cfg, arg: str | None) -> Path:
    """--data, else the config's own test data: the synthetic world folder or data.test_path."""
    if arg:
        return Path(arg).expanduser()
    if cfg.data.source == "synthetic":
        from searche1_ray.data.prepare import prepare_data

        return prepare_data(cfg).dir
    if not cfg.data.test_path:
        raise SystemExit("evaluate: give --data DIR (or set data.test_path in the config)")
    return Path(cfg.data.test_path).expanduser()


def corpus_path(cfg, data: Path) -> Path:
    """The passages the retriever serves: the world's corpus.jsonl next to the data, else
    data.corpus_path."""
    folder = data if data.is_dir() else data.parent
    if (folder / "corpus.jsonl").is_file():
        return folder / "corpus.jsonl"
    if cfg.data.corpus_path:
        return Path(cfg.data.corpus_path).expanduser()
    raise SystemExit(f"evaluate: no corpus.jsonl in {folder}; set data.corpus_path "
                     "(e.g. --set data.corpus_path=/data/search-r1/wiki-18.jsonl)")


def out_dir(cfg, args, model: str, data: Path) -> Path:
    if args.out:
        return Path(args.out).expanduser()
    from searche1_ray.run_folder import resolve_output_dir

    name = data.name if data.is_dir() else f"{data.parent.name}-{data.stem}"
    return resolve_output_dir(cfg.run.output_dir) / "eval" / f"{_slug(Path(model).name)}__{_slug(name)}"


def dry_run(cfg, args) -> int:
    from searche1_ray.plan import fit_problems, resource_plan

    plan = resource_plan(cfg)
    print(plan.to_text())
    model = args.model or cfg.model.name
    data = Path(args.data).expanduser() if args.data else (
        Path(cfg.data.test_path) if cfg.data.source == "files" else Path("<synthetic world of the config>"))
    print("")
    print(f"would evaluate: model {model}")
    print(f"                data  {data}" + ("" if data.exists() else "  (not on this machine)"))
    corpus = cfg.data.corpus_path or "<corpus.jsonl of the data folder>"
    print(f"                retriever corpus {corpus}, index {cfg.retriever.faiss_index_path or cfg.retriever.index_dir or '<built next to the corpus>'}")
    print(f"                limit {args.limit if args.limit is not None else cfg.eval.limit} per dataset "
          f"(0 = all), temperature {cfg.eval.temperature}")
    from jobs._cli import run_plan_lines

    print("\nthe training run of this config (python -m jobs.train --dry-run):")
    print("\n".join("  " + line for line in run_plan_lines(cfg)))
    print("nothing was started (--dry-run)")
    return 1 if fit_problems(plan) else 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    cfg = load_cli_config(args)
    if args.dry_run:
        return dry_run(cfg, args)

    from searche1_ray.evaluation import discover_datasets, evaluate, markdown_table, pending

    model = args.model or cfg.model.name
    data = data_path(cfg, args.data)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else None
    datasets = discover_datasets(data, names)
    limit = cfg.eval.limit if args.limit is None else args.limit
    out = out_dir(cfg, args, model, data)
    log.info("evaluating %s on %s: %s -> %s", model, data,
             ", ".join(f"{n} ({len(d.questions)})" for n, d in datasets.items()), out)

    todo = pending(datasets, out, limit, model)
    pool = retriever = None
    started_ray = False
    t0 = time.time()
    try:
        if todo:
            from actors.retriever import default_index_dir, start_retriever
            from actors.rollout_worker import RolloutPool
            from searche1_ray.model_store import resolve_model

            model_path = resolve_model(model, cfg.model.cache_dir, cfg.model.dtype)
            corpus = corpus_path(cfg, data)
            started_ray = init_ray_unless_running(cfg, args.address)
            retriever, url = start_retriever(cfg, str(corpus), str(default_index_dir(cfg, corpus.parent)))
            log.info("retriever at %s", url)
            pool = RolloutPool(cfg, model_path, retriever)
        else:
            log.info("every dataset is already done in %s; rewriting the report only", out)
        summary = evaluate(cfg, pool, datasets, out, limit=limit, model=model, progress=not args.quiet)
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            shutdown_ray()
    print(markdown_table(summary))
    print(f"{summary['questions']} questions in {time.time() - t0:.0f} s "
          f"({summary['questions_per_s'] or 0:.2f} questions/s of rollout)")
    print(f"results: {out}/eval.json, {out}/table.md, {out}/em.png, {out}/trajectories/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
