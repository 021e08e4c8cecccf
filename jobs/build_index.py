"""Build the retriever's index: Ray Data encodes the corpus on an actor pool, FAISS indexes it.

    python -m jobs.build_index --config configs/smoke.yaml [--set retriever.index_type=hnsw]
    python -m jobs.build_index --config configs/smoke.yaml --force     # rebuild even if current

The corpus is the synthetic world (generated if needed) or ``data.corpus_path`` (wiki-18 jsonl);
the index goes to ``retriever.index_dir`` (default: ``<data dir>/index-<encoder>-<type>``). An
index whose meta.json matches the corpus file and the retriever settings is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from jobs._cli import (add_address_arg, add_config_args, init_ray, job_parser, load_cli_config, setup_logging,
                       shutdown_ray)

log = logging.getLogger("searche1.build_index")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser("jobs.build_index", __doc__)
    add_config_args(p, example="retriever.index_type=hnsw")
    p.add_argument("--force", action="store_true", help="rebuild even if the index is current")
    add_address_arg(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    cfg = load_cli_config(args)
    from actors.retriever import retriever_paths
    from searche1_ray.retrieval.index import ensure_index

    corpus, index_dir = retriever_paths(cfg)
    init_ray(cfg, args.address)
    try:
        t0 = time.perf_counter()
        meta = ensure_index(corpus, index_dir, cfg.retriever, force=args.force)
        log.info("index ready in %.1fs: %s", time.perf_counter() - t0, index_dir)
        print(json.dumps({"index_dir": str(index_dir), "count": meta["count"], "dim": meta["dim"],
                          "index": meta["index"], "build_seconds": meta["build_seconds"]}))
    finally:
        shutdown_ray(serve=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
