"""The retriever as a Ray Serve app: batched encode + FAISS search behind a handle and HTTP.

Rollout actors call ``handle.retrieve.remote(queries, topk)`` (one call per batch of queries);
outside tools call ``POST <route_prefix>`` with Search-R1's JSON (searche1_ray/retrieval/api.py).
Both paths feed one continuous batcher (searche1_ray/retrieval/batcher.py): the calls that
arrive while a batch is encoded and searched go together as the next batch, so concurrent
callers share one encode and one search, and a lone caller waits for no timer. A call whose
search fails (say, text the tokenizer refuses) fails alone, not the callers batched with it.
Replicas autoscale between ``retriever.min_replicas`` and ``max_replicas``.
A bad request gets a JSON error (400 / 413 / 422); nothing a caller sends can kill a replica.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import time
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from searche1_ray.config import Config, RetrieverConfig
from searche1_ray.retrieval.api import RequestError, check_queries, check_topk, format_response, \
    parse_request
from searche1_ray.retrieval.search import search_calls

log = logging.getLogger("searche1.retriever")


@serve.deployment(name="Retriever")
class Retriever:
    """One replica: the encoder, the FAISS index and the memory-mapped passages."""

    def __init__(self, index_dir: str, rcfg: dict[str, Any]):
        import torch

        from searche1_ray.retrieval.batcher import ContinuousBatcher
        from searche1_ray.retrieval.search import Searcher

        self.rcfg = RetrieverConfig(**rcfg)
        self.index_dir = str(Path(index_dir).expanduser().resolve())
        threads = self.rcfg.num_threads or max(1, math.ceil(self.rcfg.num_cpus))
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        # the encoder runs on the replica's GPU when it has one; the index moves there only
        # with retriever.faiss_gpu (wiki-18's flat index is ~60 GB in fp32)
        self.searcher = Searcher(index_dir, self.rcfg, use_gpu=self.rcfg.num_gpus > 0,
                                 faiss_threads=threads,
                                 faiss_gpu=self.rcfg.faiss_gpu and self.rcfg.num_gpus > 0)
        self.count = len(self.searcher)
        self.batcher = ContinuousBatcher(self._search_batch, self.rcfg.max_batch_size,
                                         self.rcfg.batch_wait_timeout_s)
        self.search_seconds = 0.0
        log.info("retriever replica ready: %d passages, encoder %s, %d threads, %.1fs", self.count,
                 self.searcher.meta["encoder"]["name"], threads, time.perf_counter() - t0)

    def _search_batch(self, calls: list[tuple[list[str], int]]) -> list[list[list[dict]] | Exception]:
        """All queries of all calls in the batch: one encode and one search with the largest
        top-k, then each call gets its own queries cut to its own top-k (a worker thread). A call
        whose search fails gets its exception (``search_calls``); the others batched with it their hits."""
        t0 = time.perf_counter()
        out = search_calls(self.searcher.search, calls)
        self.search_seconds += time.perf_counter() - t0
        return out

    async def _search(self, queries: list[str], topk: int) -> list[list[dict]]:
        """This call's hits from the shared batch; its own failure raised here."""
        hits = await self.batcher.submit(queries, topk)
        if isinstance(hits, Exception):
            raise hits
        return hits

    async def retrieve(self, queries: list[str], topk: int | None = None) -> list[list[dict]]:
        """Hits ``{"document": {"id", "contents"}, "score"}`` per query, best first. A blank query
        gets no hits; a malformed call raises ``ValueError`` naming the problem."""
        queries = check_queries(queries, self.rcfg.max_queries_per_request, allow_blank=True)
        topk = self.rcfg.topk if topk is None else check_topk(topk)
        return await self._search(queries, topk)

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method != "POST":
            return JSONResponse({"error": f"use POST {self.rcfg.route_prefix} with a JSON body "
                                          "{\"queries\": [...], \"topk\": 3}"}, status_code=405)
        try:
            declared = request.headers.get("content-length", "")
            # refused before the body is read when declared; chunked uploads are measured after
            self._check_size(int(declared) if declared.isdigit() else 0)
            body = await request.body()
            self._check_size(len(body))
            req = parse_request(body, self.rcfg.max_queries_per_request,
                                self.rcfg.topk)
            hits = await self._search(req.queries, req.topk)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Exception as e:  # a bug must not take the replica down with it
            log.exception("retrieve failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"},
                                status_code=500)
        return JSONResponse(format_response(hits, req.return_scores))

    def _check_size(self, nbytes: int) -> None:
        limit = self.rcfg.max_request_bytes
        if nbytes > limit:
            raise RequestError(413, f"request body of {nbytes} bytes is over the limit of {limit} "
                                    "(retriever.max_request_bytes); send fewer or shorter queries "
                                    "per request")

    def stats(self) -> dict:
        import ray
        return {"passages": self.count, "batches": self.batcher.batches, "index_dir": self.index_dir,
                "built_at": self.searcher.meta.get("built_at"),
                "search_seconds": round(self.search_seconds, 3),
                "replica": ray.get_runtime_context().get_actor_id()}

    def check_health(self) -> None:
        if self.searcher is None or len(self.searcher) != self.count or self.count == 0:
            raise RuntimeError("retriever replica lost its index")


def default_index_dir(cfg: Config, data_dir: str | Path) -> Path:
    """``retriever.index_dir``, else ``<data dir>/index-<encoder>-<index type>``."""
    if cfg.retriever.index_dir:
        return Path(cfg.retriever.index_dir).expanduser()
    enc = cfg.retriever.encoder.replace("/", "_")
    return Path(data_dir) / f"index-{enc}-{cfg.retriever.index_type}"


def retriever_paths(cfg: Config) -> tuple[Path, Path]:
    """(corpus jsonl, index dir) for ``cfg``: the synthetic world (generated if needed) or
    ``data.corpus_path``."""
    from searche1_ray.data.prepare import prepare_data

    data = prepare_data(cfg)
    if data.corpus is None:
        raise ValueError("config: data.corpus_path is required to build or serve the retriever")
    return data.corpus, default_index_dir(cfg, data.dir)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def retriever_app(rcfg: RetrieverConfig, index_dir: str | Path):
    """The bound Serve application for ``index_dir`` (index already built)."""
    from searche1_ray.plan import retriever_deployment_options

    # the same options `jobs.evaluate --dry-run` prints; max_ongoing_requests is 2 x the batch
    # size because a batch can only take the calls a replica has been allowed to hold
    return Retriever.options(
        **retriever_deployment_options(rcfg), health_check_period_s=10, health_check_timeout_s=30,
    ).bind(str(index_dir), dataclasses.asdict(rcfg))


def _app_url(rcfg: RetrieverConfig):
    """(URL of the app's HTTP route, Serve's HTTP config) on the running Serve instance."""
    http = serve.context._get_global_client().http_config
    return f"http://{http.host}:{http.port}{rcfg.route_prefix}", http


_DEPLOYED: set[str] = set()   # app names this process deployed (``stop_retriever`` deletes only those)


class RetrieverAppConflict(RuntimeError):
    """A Serve app of the configured name is running over another index."""


def attach_retriever(rcfg: RetrieverConfig, index_dir: str | Path, built_at: Any = None):
    """``(handle, url)`` of an app named ``retriever.app_name`` that is already running on this
    Ray cluster over the same index build (a previous job's, or one ``jobs.serve_retriever``
    started), else None (then ``serve.run`` deploys or redeploys it). An app of that name over the
    same folder but an older build is stale and is replaced; over another index folder it is
    refused with ``RetrieverAppConflict`` unless ``retriever.replace_app`` is set: another run's
    rollout workers may be searching it, and they would silently search this corpus instead."""
    try:
        status = serve.status().applications.get(rcfg.app_name)
    except Exception:  # Serve not started on this cluster
        return None
    if status is None or str(getattr(status.status, "value", status.status)) != "RUNNING":
        return None
    handle = serve.get_app_handle(rcfg.app_name)
    try:
        stats = handle.stats.remote().result(timeout_s=60)
    except Exception as e:
        log.info("retriever app '%s' is running but did not answer (%s); redeploying", rcfg.app_name, e)
        return None
    ours = str(Path(index_dir).expanduser().resolve())
    if stats.get("index_dir") != ours:
        if not rcfg.replace_app:
            raise RetrieverAppConflict(
                f"a retriever app named '{rcfg.app_name}' is already running on this Ray cluster over "
                f"another index ({stats.get('index_dir')}, {stats.get('passages', '?')} passages), not "
                f"{ours}; another run may be searching it. Give this run its own app "
                f"(--set retriever.app_name=<name> and a free retriever.port), stop the other one "
                f"(`serve delete {rcfg.app_name}`), or replace it (--set retriever.replace_app=true)")
        log.warning("retriever app '%s' serves %s, not %s; replacing it (retriever.replace_app)",
                    rcfg.app_name, stats.get("index_dir"), ours)
        return None
    if built_at is not None and stats.get("built_at") != built_at:
        log.info("retriever app '%s' serves an older build of %s (built %s, now %s); redeploying",
                 rcfg.app_name, ours, stats.get("built_at"), built_at)
        return None
    url = _app_url(rcfg)[0]
    log.info("attached to the running retriever app '%s' at %s (%d passages)", rcfg.app_name, url,
             stats.get("passages", 0))
    return handle, url


def start_retriever(cfg: Config, corpus_path: str | Path, index_dir: str | Path | None = None):
    """Build the index if missing or stale; attach to a running app over the same index (see
    ``attach_retriever``), or start Serve's HTTP proxy on ``retriever.host:port`` (port 0 = a free
    one) and run the app. Returns ``(DeploymentHandle, url)``. Ray must be initialised."""
    from searche1_ray.retrieval.index import ensure_index

    rcfg = cfg.retriever
    if index_dir is None:
        index_dir = default_index_dir(cfg, Path(corpus_path).parent)
    t0 = time.perf_counter()
    meta = ensure_index(corpus_path, index_dir, rcfg)
    attached = attach_retriever(rcfg, index_dir, meta.get("built_at"))
    if attached is not None:
        return attached
    port = rcfg.port or free_port(rcfg.host)
    serve.start(http_options={"host": rcfg.host, "port": port})
    url, http = _app_url(rcfg)
    if (http.host, http.port) != (rcfg.host, port):
        log.warning("Serve was already running with HTTP on %s:%s; the retriever is served there",
                    http.host, http.port)
    handle = serve.run(retriever_app(rcfg, index_dir), name=rcfg.app_name,
                       route_prefix=rcfg.route_prefix)
    _DEPLOYED.add(rcfg.app_name)
    log.info("retriever app '%s' up at %s (%d passages, %s) in %.1fs", rcfg.app_name, url,
             meta["count"], meta["index"]["type"], time.perf_counter() - t0)
    return handle, url


def stop_retriever(rcfg: RetrieverConfig) -> bool:
    """Delete the app ``retriever.app_name`` if this process deployed it (a finished run's
    driver does, so the next run on the cluster is not refused for a stale app); an app this
    process attached to (``jobs.serve_retriever``'s, another job's) is left running. True if deleted."""
    if rcfg.app_name not in _DEPLOYED:
        return False
    serve.delete(rcfg.app_name)
    _DEPLOYED.discard(rcfg.app_name)
    log.info("retriever app '%s' deleted", rcfg.app_name)
    return True
