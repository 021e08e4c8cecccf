"""Retriever throughput: the Ray Serve app vs Search-R1's server design, on one index, one machine.

Index: the synthetic world with ``data.world.num_questions=10000`` (20,000 passages), MiniLM,
Flat inner product, topk 3 — the corpus issue 21's Search-R1 figures were measured on. The
world and its index are generated and cached on first use (~2-3 min on 2 cores).

Client shapes ``clients x queries per request``: 1x1, 8x1, 32x1, 1x64, 4x64. Each client is an
asyncio task sending its next request as soon as the last one returns; every shape sends a fixed
number of requests (``--requests``) after a short warm-up. Per shape: queries/s, request
latency p50 / p99, errors (non-200 or exceptions), and the 1-minute load average at its end.

  serve-http     the Serve app over HTTP through Serve's proxy (Search-R1 JSON)
  serve-handle   the same app through its DeploymentHandle (what rollout workers call)
  searchr1-fp32  bench/searchr1_server.py: Search-R1's design (sync FastAPI endpoint on the
                 thread pool, one encode + one FAISS search per request), encoder in fp32
  searchr1-fp16  the same with the encoder in fp16 (``model.half()``), as the real server runs

The baselines run in their own process after Ray is shut down, so each has the machine to itself,
at nice 15 as Ray runs its workers (on a busy machine a nice-0 baseline would take the cores from
the Serve replica's nice-15 process).

Last three lines (Serve over HTTP against searchr1-fp32, the faster of the two baselines here):
  serve_vs_searchr1_qps_at_32=     q/s ratio at 32 single-query clients
  serve_vs_searchr1_qps_batched=   q/s ratio for 64-query requests: the lower of 1x64 and 4x64
  serve_vs_searchr1_p50_at_1=      p50 latency ratio at one single-query client (lower is better)

Measured 2026-12-07 05:49-06:00 UTC, NOT on a quiet machine (another engineer's Ray integration
tests and an ablation ran throughout; 1-min load 6-21 on 2 cores), 100/200/400/10/20 requests:

  server         1x1 q/s (p50 ms)  8x1   32x1 (p99 ms)  1x64   4x64   load
  serve-http     19.5 (48.6)       33.8  43.1 (1115)    89.6   98.4   6-7
  serve-handle   19.2 (44.0)       28.1  44.5 (1167)    77.8  110.1   7
  searchr1-fp32  24.8 (39.3)       28.5  29.8 (1442)   126.7  140.1   8-14
  searchr1-fp16   5.9 (79.5)       18.2  15.6 (3220)     4.2    7.3   10-21
  serve_vs_searchr1_qps_at_32=1.45  serve_vs_searchr1_qps_batched=0.70  serve_vs_searchr1_p50_at_1=1.23

An earlier run the same morning (load 12-26, baseline at nice 0) gave 2.14 / 2.03 / 1.21. Under
this load both servers ran 2-4x below their quiet figures (issue 21: Search-R1 fp32 89 / 98 / 78 /
353 / 319 q/s), so the baseline is not yet shown within +-25% of them and the targets are not yet
shown met: rerun on an idle machine. What the runs did show:
  * the continuous batcher (searche1_ray/retrieval/batcher.py) instead of @serve.batch: batches
    are cut only when the searcher is free, so 1 client pays no wait timer, and Ray's batch loop
    no longer cuts 10 ms batches while the previous one runs (run 2: 1,644 calls in 438 batches
    over all shapes; the mean batch per shape was not recorded);
  * retriever.num_threads=2 on a busy 2-core machine collapsed (serve-http 1x1 1.9 q/s, 32x1 13.9,
    4x64 25 q/s at load 10-16): with the other core taken, OpenMP waits for its second thread.
    The default stays ceil(num_cpus) = 1 thread for the 0.5-CPU replica; Search-R1's server runs
    torch's default 2 threads, which is why it leads at 64-query requests when the machine is idle
    enough to give it both cores;
  * fp16 (and bf16: no AMX / AVX512-BF16 here) encoders run 4-10x slower than fp32 on this AVX2
    EPYC; the replica keeps fp32 on CPU;
  * Arrow ``take`` for the passage lookup was slower than the row-by-row chunk lookup (~370 ms vs
    16 ms for 192 rows under load) and was not kept.

Measured again 2026-12-07 13:30-13:36 UTC with nothing else running (load 2.6-5.6 is the
servers' own threads), same requests; a slow day on this machine (every CI test ran 15-60 %
slower than the day before):

  server         1x1 q/s (p50 ms)  8x1   32x1 (p99 ms)  1x64   4x64
  serve-http     26.3 (37.2)       56.9  71.2 (519)     125.1  138.7
  serve-handle   36.2 (27.3)       83.3  105.5 (353)    147.9  147.8
  searchr1-fp32  31.2 (30.3)       36.4  30.0 (1382)    147.1  154.9
  searchr1-fp16  28.9 (34.2)       37.5  34.3 (1218)     36.1   40.8
  serve_vs_searchr1_qps_at_32=2.37  serve_vs_searchr1_qps_batched=0.85  serve_vs_searchr1_p50_at_1=1.23

The baseline again ran below issue 21's quiet figures (31 / 36 / 30 / 147 / 155 q/s against
89 / 98 / 78 / 353 / 319), so "within +-25 %" is still not shown on this machine; as ratios in one
run, the Serve app leads 2.4x at 32 single-query clients (3.5x through the handle), equals the
baseline on 64-query requests through the handle (0.99 / 0.95) and trails over HTTP (0.85: the
proxy hop), and pays ~7 ms more than the baseline per single request over HTTP (the handle is
3 ms faster). At 64 queries both servers are encode-bound (~430 ms per request for MiniLM on
one core here); the targets (3x, 1.5x, p50 ratio <= 1) are not met.

    python -m bench.retriever                                     # all servers, all shapes
    python -m bench.retriever --servers serve --requests 50,100,200,5,10   # a quick look
    python -m bench.retriever --set retriever.batch_wait_timeout_s=0.005
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs as `python bench/<name>.py` too
log = logging.getLogger("bench.retriever")

SHAPES = [(1, 1), (8, 1), (32, 1), (1, 64), (4, 64)]     # (clients, queries per request)
DEFAULT_REQUESTS = "200,400,800,20,40"
WORLD = ["data.world.num_questions=10000"]                 # 20,000 passages
TOPK = 3
# Ray starts its workers (the Serve replica and proxy among them) at nice 15; the baseline
# process gets the same niceness, so other work on the machine takes from both alike
RAY_WORKER_NICENESS = 15


async def run_shape(send, queries: list[str], clients: int, per_request: int, total: int) -> dict:
    """``total`` requests of ``per_request`` queries from ``clients`` concurrent tasks."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(total))

    async def worker():
        for i in counter:
            start = (i * per_request) % len(queries)
            batch = (queries[start:] + queries)[:per_request]
            t0 = time.perf_counter()
            try:
                await send(batch)
            except Exception as e:  # counted, and the first few shown
                errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies or [float("nan")]) * 1000
    row = {"shape": f"{clients}x{per_request}", "requests": len(latencies),
           "qps": len(latencies) * per_request / wall, "p50_ms": float(np.percentile(lat, 50)),
           "p99_ms": float(np.percentile(lat, 99)), "errors": len(errors),
           "load": os.getloadavg()[0]}
    for e in errors[:3]:
        log.warning("%s: %s", row["shape"], e)
    log.info("%-5s %4d requests: %6.1f q/s, p50 %6.1f ms, p99 %6.1f ms, %d errors, load %.1f",
             row["shape"], row["requests"], row["qps"], row["p50_ms"], row["p99_ms"],
             row["errors"], row["load"])
    return row


async def run_shapes(send, queries, plan) -> list[dict]:
    for clients, per_request, _ in plan:            # warm-up: every shape, a few requests
        await run_shape(send, queries, clients, per_request, clients * 2)
    return [await run_shape(send, queries, c, q, n) for c, q, n in plan]


async def bench_http(url: str, queries: list[str], plan) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def send(batch):
            async with session.post(url, json={"queries": batch, "topk": TOPK,
                                               "return_scores": True}) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                body = await r.json()
                if len(body["result"]) != len(batch) or len(body["result"][0]) != TOPK:
                    raise RuntimeError("wrong number of hits")
        return await run_shapes(send, queries, plan)


async def bench_handle(handle, queries: list[str], plan) -> list[dict]:
    async def send(batch):
        hits = await handle.retrieve.remote(batch, TOPK)
        if len(hits) != len(batch) or len(hits[0]) != TOPK:
            raise RuntimeError("wrong number of hits")
    return await run_shapes(send, queries, plan)


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


def bench_serve(cfg, corpus, index_dir, queries, plan, results) -> None:
    import ray
    from ray import serve

    from actors.retriever import start_retriever

    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    ray.init(address="local", num_cpus=4, _temp_dir=tmp, include_dashboard=False,
             log_to_driver=False)
    try:
        t0 = time.perf_counter()
        handle, url = start_retriever(cfg, corpus, index_dir)
        log.info("serve app up in %.1fs at %s", time.perf_counter() - t0, url)
        log.info("serve-http")
        results["serve-http"] = asyncio.run(bench_http(url, queries, plan))
        log.info("serve-handle")
        results["serve-handle"] = asyncio.run(bench_handle(handle, queries, plan))
        stats = handle.stats.remote().result()
        log.info("replica: %d batches, %.1f s searching", stats["batches"], stats["search_seconds"])
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_searchr1(index_dir, queries, plan, fp16: bool) -> list[dict]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.searchr1_server", "--index-dir",
                             str(index_dir), "--port", str(port), "--topk", str(TOPK),
                             *(["--fp16"] if fp16 else [])], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=lambda: os.nice(RAY_WORKER_NICENESS))
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc)
        return asyncio.run(bench_http(f"http://127.0.0.1:{port}/retrieve", queries, plan))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.retriever", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides (after the bench's own data.world.num_questions=10000)")
    p.add_argument("--requests", default=DEFAULT_REQUESTS,
                   help=f"requests per shape 1x1,8x1,32x1,1x64,4x64 (default {DEFAULT_REQUESTS})")
    p.add_argument("--servers", default="serve,searchr1-fp32,searchr1-fp16",
                   help="which to run: serve (HTTP and handle), searchr1-fp32, searchr1-fp16")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from actors.retriever import retriever_paths
    from searche1_ray.config import load_config
    from searche1_ray.data.readers import read_qa
    from searche1_ray.retrieval.index import ensure_index

    cfg = load_config(args.config, ["retriever.port=0", "retriever.app_name=retriever-bench",
                                    *WORLD, *args.overrides])
    counts = [int(x) for x in args.requests.split(",")]
    if len(counts) != len(SHAPES):
        p.error(f"--requests needs {len(SHAPES)} numbers, one per shape {SHAPES}")
    plan = [(c, q, n) for (c, q), n in zip(SHAPES, counts)]
    servers = args.servers.split(",")
    corpus, index_dir = retriever_paths(cfg)
    meta = ensure_index(corpus, index_dir, cfg.retriever, use_ray=False)
    queries = [q["question"] for split in ("test", "dev", "train")
               for q in read_qa(corpus.parent / f"{split}.jsonl")]
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())

    results: dict[str, list[dict]] = {}
    if "serve" in servers:
        bench_serve(cfg, corpus, index_dir, queries, plan, results)
    for name in ("searchr1-fp32", "searchr1-fp16"):
        if name in servers:
            log.info("%s", name)
            results[name] = bench_searchr1(index_dir, queries, plan, fp16=name.endswith("fp16"))

    r = cfg.retriever
    print(f"\nretriever bench: {meta['count']} passages, {r.encoder}, {meta['index']['type']}, "
          f"topk {TOPK}; serve replica num_cpus={r.num_cpus}, max_batch_size={r.max_batch_size}, "
          f"batch_wait_timeout_s={r.batch_wait_timeout_s}; load average before: {load0}")
    print(f"{'server':<15}{'shape':>7}{'requests':>10}{'q/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}{'load':>6}")
    for name, rows in results.items():
        for row in rows:
            print(f"{name:<15}{row['shape']:>7}{row['requests']:>10}{row['qps']:>9.1f}"
                  f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['errors']:>8}{row['load']:>6.1f}")
    at = {name: {row["shape"]: row for row in rows} for name, rows in results.items()}
    if "serve-http" in at and "searchr1-fp32" in at:
        serve, base = at["serve-http"], at["searchr1-fp32"]
        batched = min(serve[s]["qps"] / base[s]["qps"] for s in ("1x64", "4x64"))
        print(f"serve_vs_searchr1_qps_at_32={serve['32x1']['qps'] / base['32x1']['qps']:.2f}")
        print(f"serve_vs_searchr1_qps_batched={batched:.2f}")
        print(f"serve_vs_searchr1_p50_at_1={serve['1x1']['p50_ms'] / base['1x1']['p50_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
