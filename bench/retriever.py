"""Retriever throughput: the batched Ray Serve app vs a Search-R1-style single-process server.

Same index (the smoke world's corpus, MiniLM, Flat IP), same machine, one run. Clients send
one-question requests (``topk`` 3) from ``c`` concurrent asyncio workers, ``c`` in 1 / 8 / 32,
a bounded number of requests per level, after a warm-up. Measured: queries/s and p50 / p99
latency for

  serve-http    the Serve app over HTTP (Search-R1 JSON), ``@serve.batch`` across requests
  serve-handle  the same app through its DeploymentHandle (what rollout actors use)
  baseline      FastAPI + uvicorn in one process, encoding and searching each request on its own
                (Search-R1's retrieval_server.py design: a sync endpoint, one request at a time
                per thread), run after Ray is shut down so it has the machine to itself
  baseline-serial  the same server with an async endpoint: requests run one after another
                (no thread pile-up; the strongest single-process variant)

Each level stops issuing requests after 60 s (the table shows how many completed) and records
the 1-minute load average, since other work on the machine skews everything.

Last line: ``serve_vs_baseline_qps_at_32=<serve-http q/s / baseline q/s at 32 clients>``; the line
before it gives the same ratio against baseline-serial.

    python -m bench.retriever                                  # configs/smoke.yaml
    python -m bench.retriever --set retriever.num_cpus=1 --requests 200,400,800
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs as `python bench/<name>.py` too
log = logging.getLogger("bench.retriever")


# --- the baseline server (runs in its own process) ----------------------------------------

class QueryRequest(BaseModel):          # Search-R1's request model
    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


def baseline_server(index_dir: str, port: int, encoder: str, serial: bool = False) -> None:
    import uvicorn
    from fastapi import FastAPI

    from searche1_ray.config import RetrieverConfig
    from searche1_ray.retrieval.search import Searcher

    searcher = Searcher(index_dir, RetrieverConfig(encoder=encoder))
    app = FastAPI()

    def answer(request: QueryRequest) -> dict:
        hits = searcher.search(request.queries, request.topk or 3)
        if request.return_scores:
            return {"result": hits}
        return {"result": [[h["document"] for h in per] for per in hits]}

    if serial:   # async endpoint that blocks the loop: one request at a time, no thread pile-up
        @app.post("/retrieve")
        async def retrieve_serial(request: QueryRequest):
            return answer(request)
    else:        # sync, like Search-R1: FastAPI's thread pool, one encode per request
        @app.post("/retrieve")
        def retrieve(request: QueryRequest):
            return answer(request)

    @app.get("/health")
    def health():
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- clients ------------------------------------------------------------------------------

MAX_SECONDS_PER_LEVEL = 60.0


async def _run_level(send, queries: list[str], clients: int, total: int,
                     batches=None) -> dict:
    """``total`` requests from ``clients`` concurrent workers (no new request after
    ``MAX_SECONDS_PER_LEVEL``); ``batches`` (sync, optional) reads the server's batch counter,
    giving the mean number of requests per batch."""
    latencies: list[float] = []
    counter = iter(range(total))
    deadline = time.perf_counter() + MAX_SECONDS_PER_LEVEL

    async def worker():
        for i in counter:
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            await send(queries[i % len(queries)])
            latencies.append(time.perf_counter() - t0)

    before = await asyncio.to_thread(batches) if batches else 0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    after = await asyncio.to_thread(batches) if batches else 0
    lat = np.array(latencies) * 1000
    done = len(latencies)
    row = {"clients": clients, "requests": done, "qps": done / wall, "load": os.getloadavg()[0],
           "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
           "per_batch": done / (after - before) if batches and after > before else float("nan")}
    log.info("%d clients: %.1f q/s, p50 %.1f ms, p99 %.1f ms, %.1f requests per batch", clients,
             row["qps"], row["p50_ms"], row["p99_ms"], row["per_batch"])
    return row


async def bench_http(url: str, queries: list[str], levels: list[tuple[int, int]],
                     batches=None) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        async def send(q):
            async with session.post(url, json={"queries": [q], "topk": 3, "return_scores": True}) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
                body = await r.json()
                assert len(body["result"][0]) == 3
        await _run_level(send, queries, 4, 40)                      # warm-up
        return [await _run_level(send, queries, c, n, batches) for c, n in levels]


async def bench_handle(handle, queries: list[str], levels: list[tuple[int, int]],
                       batches=None) -> list[dict]:
    async def send(q):
        hits = await handle.retrieve.remote([q], 3)
        assert len(hits[0]) == 3
    await _run_level(send, queries, 4, 40)
    return [await _run_level(send, queries, c, n, batches) for c, n in levels]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, deadline_s: float = 180) -> None:
    import requests
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"baseline server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"baseline server not up at {url} after {deadline_s}s")


# --- main ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.retriever", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    p.add_argument("--requests", default="100,400,800", help="requests per level")
    p.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--index-dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--encoder", default="minilm", help=argparse.SUPPRESS)
    p.add_argument("--serial", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline_server:
        baseline_server(args.index_dir, args.port, args.encoder, args.serial)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    from ray import serve

    from actors.retriever import retriever_paths, start_retriever
    from searche1_ray.config import load_config
    from searche1_ray.data.readers import read_qa

    cfg = load_config(args.config, ["retriever.port=0", "retriever.app_name=retriever-bench",
                                    *args.overrides])
    clients = [int(x) for x in args.clients.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    levels = list(zip(clients, counts))
    corpus, index_dir = retriever_paths(cfg)
    queries = [q["question"] for split in ("test", "dev", "train")
               for q in read_qa(corpus.parent / f"{split}.jsonl")]

    results: dict[str, list[dict]] = {}
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    ray.init(address="local", num_cpus=4, _temp_dir=tmp, include_dashboard=False,
             log_to_driver=False)
    try:
        t0 = time.perf_counter()
        handle, url = start_retriever(cfg, corpus, index_dir)
        meta = json.loads((Path(index_dir) / "meta.json").read_text())
        log.info("app up in %.1fs; index: %d passages, built in %.1fs", time.perf_counter() - t0,
                 meta["count"], meta["build_seconds"])

        def batches():
            return handle.stats.remote().result()["batches"]
        results["serve-http"] = asyncio.run(bench_http(url, queries, levels, batches))
        results["serve-handle"] = asyncio.run(bench_handle(handle, queries, levels, batches))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    for name, extra in (("baseline", []), ("baseline-serial", ["--serial"])):
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "bench.retriever", "--baseline-server",
                                 "--index-dir", str(index_dir), "--port", str(port),
                                 "--encoder", cfg.retriever.encoder, *extra], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            _wait_http(f"http://127.0.0.1:{port}/health", proc)
            log.info("%s", name)
            results[name] = asyncio.run(bench_http(f"http://127.0.0.1:{port}/retrieve",
                                                   queries, levels))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\nretriever bench: {meta['count']} passages, {cfg.retriever.encoder}, "
          f"{meta['index']['type']}; serve replica num_cpus={cfg.retriever.num_cpus}, "
          f"max_batch_size={cfg.retriever.max_batch_size}; load average before: {load0}")
    print(f"{'server':<16}{'clients':>8}{'requests':>10}{'q/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'req/batch':>11}{'load':>7}")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:<16}{r['clients']:>8}{r['requests']:>10}{r['qps']:>10.1f}"
                  f"{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['per_batch']:>11.1f}{r['load']:>7.1f}")
    at = {name: {r["clients"]: r["qps"] for r in rows} for name, rows in results.items()}
    top = max(clients)
    print(f"serve_vs_serial_baseline_qps_at_{top}="
          f"{at['serve-http'][top] / at['baseline-serial'][top]:.2f}")
    print(f"serve_vs_baseline_qps_at_{top}={at['serve-http'][top] / at['baseline'][top]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
