"""Serve the retriever: build the index if missing, start the Ray Serve app, print its URL.

    python -m jobs.serve_retriever --config configs/smoke.yaml [--set retriever.port=8001]

Then, from anything that speaks Search-R1's API:

    curl -s http://127.0.0.1:8000/retrieve -H 'content-type: application/json' \
         -d '{"queries": ["Who founded Zefoo Motors?"], "topk": 3, "return_scores": true}'

It stays up until Ctrl-C (or SIGTERM), then deletes the app (and, on its private Ray, Serve).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from jobs._cli import add_address_arg, add_config_args, init_ray, job_parser, load_cli_config, setup_logging

log = logging.getLogger("searche1.serve_retriever")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser("jobs.serve_retriever", __doc__)
    add_config_args(p, example="retriever.port=8001")
    add_address_arg(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    cfg = load_cli_config(args)
    import ray
    from ray import serve

    from actors.retriever import retriever_paths, start_retriever

    corpus, index_dir = retriever_paths(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C / `kill -INT` must stop it even when it was started in the background of a script
    # (`… &`), which starts it with SIGINT ignored and Python then leaves it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    attached = bool(init_ray(cfg, args.address))
    try:
        _, url = start_retriever(cfg, corpus, index_dir)
        print(f"RETRIEVER_URL={url}", flush=True)
        print("serving until Ctrl-C", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        log.info("shutting the retriever down")
        try:
            serve.delete(cfg.retriever.app_name)
            if not attached:   # our private Ray: stop Serve too; on a shared cluster leave it
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
