"""Rollout workers: Ray actors running a vLLM engine and the multi-turn search loop, and the
elastic pool that spreads question batches over them.

``RolloutWorker`` (one vLLM engine per actor): ``generate`` rolls out a batch of questions ×
``n`` samples with the retriever (searche1_ray/engine/search_loop.py), ``update_weights`` swaps
the weights in place (no restart), ``health`` / ``version`` report its state.

``RolloutPool`` (a plain object in the driver) owns the workers:
- a question batch is ``rollout.questions_per_batch`` questions with all their samples (a GRPO
  group stays on one engine and shares its prompt's prefix cache); batches are handed to
  whichever worker is free, one at a time per worker;
- ``scale(n)`` adds or removes workers at any time, also while ``generate`` runs in another
  thread: new workers get the pool's current weights before their first batch, removed ones
  finish the batch they hold and then stop;
- a worker that dies mid-batch is replaced and its batch goes to another worker; rows are keyed
  by (question_id, sample_idx), so every trajectory comes back exactly once;
- weights: ``update_weights(state_dict | ObjectRef | safetensors path, version)`` (the object
  store path on CPU) or ``open_broadcast_group`` + ``receive_broadcast`` (NCCL on GPUs, gloo on
  CPU: trainer rank 0 broadcasts, engines are ranks 1..N, see engine/weight_sync.py);
- ``last_stats``: throughput of the last ``generate`` (tokens/s, trajectories/s, batches,
  resubmissions, batches per worker).
On CPU each engine is pinned to its own share of the node's cores (re-balanced on scaling), so
two engines on one node do not fight over core 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, \
    RayError, RayTaskError

from searche1_ray.config import Config, config_from_dict

log = logging.getLogger("searche1.rollout")

_MAX_TASK_RETRIES = 2           # a batch whose task *raised* (not a dead worker) is retried
_MAX_REPLACEMENTS = 8           # dead workers replaced per pool before giving up
_REPLICA_RETRIES = 3            # a search re-sent after its retriever replica died mid-call
SCHEDULE_SETTINGS = ("loop", "max_inflight")   # per-call overrides beside LoopSettings' fields


def _retrieve_fn(retriever: Any, timeout_s: float | None = None):
    """``retrieve(queries, topk)`` for a Serve handle, the name of a Serve app (its handle is
    looked up at the first search, so the pool can start before the app is up), an actor
    handle or a plain callable. A handle's call that gets no answer within ``timeout_s``
    (``retriever.call_timeout_s``) is cancelled and raises ``TimeoutError`` naming the retriever:
    a hung replica fails the batch (which the pool retries) instead of hanging the round."""
    if isinstance(retriever, str):
        app, resolved = retriever, []

        def by_name(queries, topk):
            if not resolved:
                from ray import serve
                try:
                    resolved.append(_retrieve_fn(serve.get_app_handle(app), timeout_s))
                except Exception as e:
                    raise RuntimeError(f"rollout: no Serve app named {app!r} to search with "
                                       f"(retriever.app_name): {e}") from e
            return resolved[0](queries, topk)
        return by_name
    if retriever is None:
        def none(queries, topk):
            raise RuntimeError("rollout: the policy searched but the pool has no retriever; "
                               "pass the handle from actors.retriever.start_retriever")
        return none
    method = getattr(retriever, "retrieve", None)
    if method is not None and hasattr(method, "remote"):
        def remote(queries, topk):
            for attempt in range(_REPLICA_RETRIES + 1):
                resp = method.remote(list(queries), int(topk))
                try:
                    if hasattr(resp, "result"):          # a Serve DeploymentResponse
                        return resp.result(timeout_s=timeout_s)
                    return ray.get(resp, timeout=timeout_s)
                except (TimeoutError, GetTimeoutError) as e:
                    if hasattr(resp, "cancel"):
                        resp.cancel()
                    raise TimeoutError(f"rollout: the retriever did not answer a search of "
                                       f"{len(queries)} queries within {timeout_s:g}s "
                                       f"(retriever.call_timeout_s)") from e
                except (RayActorError, ActorUnavailableError) as e:
                    # the replica died (or is restarting) with the call in flight: Serve starts
                    # a new one, and a re-sent call waits for it; a search is idempotent
                    if attempt == _REPLICA_RETRIES:
                        raise RuntimeError(f"rollout: the retriever's replica died {attempt + 1} times "
                                           f"during one search: {type(e).__name__}") from e
                    log.warning("retriever replica lost during a search (%s); sending it again",
                                type(e).__name__)
                    time.sleep(min(5.0, 0.5 * 2 ** attempt))
        return remote
    if callable(retriever):
        return retriever
    raise TypeError(f"rollout: cannot call retriever of type {type(retriever).__name__}")


class RolloutWorker:
    """One vLLM engine + the search loop. Not thread-safe: Ray runs one call at a time."""

    def __init__(self, cfg: dict, model_path: str, retriever: Any = None,
                 cpus: Sequence[int] | None = None, engine_options: dict | None = None,
                 version: int = 0):
        self.cfg: Config = config_from_dict(cfg)
        r = self.cfg.rollout
        from searche1_ray.engine import vllm_engine as ve

        self.node_cores = sorted(os.sched_getaffinity(0))
        self.cpus: list[int] = []
        if ve.is_cpu_build() and cpus:
            self._bind(cpus)
        self.model_path = model_path
        from searche1_ray.hardware import resolve_dtype

        self.llm = ve.build_llm(r, model_path, dtype=resolve_dtype(self.cfg.model.dtype, r.num_gpus_per_worker > 0),
                                seed=self.cfg.run.seed,
                                extra=engine_options)
        self.tokenizer = self.llm.get_tokenizer()
        self._generate = ve.vllm_generate_fn(self.llm)
        self._retrieve = _retrieve_fn(retriever, self.cfg.retriever.call_timeout_s)
        self._version = int(version)    # the policy version of the weights in model_path
        self.batches = 0
        self.started = time.time()

    def _bind(self, cpus: Sequence[int]) -> None:
        import torch

        from searche1_ray.engine.vllm_engine import bind_cpu_threads
        cpus = sorted(set(int(c) for c in cpus))
        if cpus == self.cpus:
            return
        if self.cpus:  # after vLLM start-up torch.set_num_threads is disabled; use the C call
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(tid), cpus)
                except OSError:
                    pass
            log.info("rollout worker re-bound to cores %s", cpus)
        else:
            bind_cpu_threads(cpus)
        self.cpus = cpus
        self._threads_here()

    def _threads_here(self) -> None:
        # OpenMP's thread count is per calling thread: set it in the thread that runs the engine
        if self.cpus:
            import torch
            torch._C.set_num_threads(len(self.cpus))

    # ---- API ---------------------------------------------------------------------------
    def generate(self, questions: list[dict], n: int, temperature: float | None = None,
                 seed: int | None = None, overrides: dict | None = None) -> dict:
        """Roll out ``n`` samples of each question; returns ``{"rows": [...], "stats": {...}}``.
        ``overrides`` replaces loop settings for this call (e.g. ``{"max_searches": 1}``), and
        may name the schedule (``loop``: async | rounds, ``max_inflight``)."""
        import dataclasses

        from searche1_ray.engine.search_loop import (LoopSettings, make_tasks, run_search_loop,
                                                     run_search_loop_async)
        from searche1_ray.engine.vllm_engine import VllmTurnStream

        self._threads_here()
        t0 = time.perf_counter()
        tasks = make_tasks(questions, n, self.tokenizer, self.cfg.model.use_chat_template)
        settings = LoopSettings.from_config(self.cfg.rollout, self.cfg.retriever.topk,
                                            temperature, seed)
        overrides = dict(overrides or {})
        loop = overrides.pop("loop", self.cfg.rollout.loop)
        max_inflight = int(overrides.pop("max_inflight", self.cfg.rollout.max_inflight))
        if overrides:
            settings = dataclasses.replace(settings, **overrides)
        if loop == "async":
            rows, stats = run_search_loop_async(tasks, VllmTurnStream(self.llm), self._retrieve,
                                                self.tokenizer, settings, self._version,
                                                max_inflight=max_inflight)
        else:
            rows, stats = run_search_loop(tasks, self._generate, self._retrieve, self.tokenizer,
                                          settings, self._version)
        self.batches += 1
        stats["wall_s"] = time.perf_counter() - t0
        stats["trajectories"] = len(rows)
        return {"rows": rows, "stats": stats}

    def update_weights(self, weights: Any, version: int) -> float:
        """Load new weights in place: a dict of HF-named tensors (an ObjectRef argument arrives
        resolved; one wrapped in a list is fetched here), or a safetensors file / folder.
        Returns the seconds it took."""
        from searche1_ray.engine.vllm_engine import load_state_into

        self._threads_here()
        t0 = time.perf_counter()
        if isinstance(weights, list) and len(weights) == 1 and isinstance(weights[0], ray.ObjectRef):
            weights = ray.get(weights[0])
        load_state_into(self.llm, weights, self.cfg.rollout.in_process)
        self._version = int(version)
        return time.perf_counter() - t0

    def init_broadcast_group(self, master_address: str, master_port: int, rank_offset: int,
                             world_size: int, backend: str) -> list[int]:
        """Every engine rank joins the weight-sync group (ranks rank_offset … + tp - 1)."""
        return self.llm.collective_rpc("init_weight_broadcast_group",
                                       args=(master_address, master_port, rank_offset,
                                             world_size, backend))

    def receive_broadcast(self, metas: list, version: int) -> float:
        self._threads_here()
        t0 = time.perf_counter()
        self.llm.collective_rpc("receive_weight_broadcast", args=(metas,))
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return time.perf_counter() - t0

    @ray.method(concurrency_group="control")
    def bind(self, cpus: Sequence[int]) -> list[int]:
        from searche1_ray.engine.vllm_engine import is_cpu_build
        if is_cpu_build() and cpus:
            self._bind(cpus)
        return self.cpus

    def weight_fingerprint(self) -> float:
        return float(self.llm.collective_rpc("weight_fingerprint")[0])

    @ray.method(concurrency_group="control")
    def version(self) -> int:
        return self._version

    @ray.method(concurrency_group="control")
    def health(self) -> dict:
        rss = 0.0
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) / 2**20
        except OSError:  # pragma: no cover
            pass
        return {"ok": True, "version": self._version, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "node_cores": self.node_cores,
                "cpus": self.cpus, "batches": self.batches, "rss_gib": round(rss, 2),
                "uptime_s": round(time.time() - self.started, 1)}


# engine calls run one at a time in order; health / version / bind answer even mid-batch
RolloutWorkerActor = ray.remote(concurrency_groups={"control": 1})(RolloutWorker)


@dataclass
class _Worker:
    wid: int
    handle: Any
    ready: Any                    # ObjectRef of the first health() (the engine is up)
    version: int = -1             # weights it holds once `pending_sync` resolves
    pending_sync: Any = None
    is_ready: bool = False
    retiring: bool = False
    busy: Any = None              # ObjectRef of the batch it is running
    node_id: str = ""
    node_cores: list[int] = field(default_factory=list)
    batches: int = 0


@dataclass
class _Batch:
    bid: int
    questions: list[dict]
    attempts: int = 0
    started: float = 0.0          # perf_counter when it was last sent to a worker


class RolloutPool:
    """Elastic group of ``RolloutWorker`` actors (see the module docstring)."""

    def __init__(self, cfg: Config, model_path: str, retriever_handle: Any = None,
                 num_workers: int | None = None, version: int = 0):
        """``version``: the policy version of the weights in ``model_path`` (a resumed run's
        current policy is not version 0: its rollouts must say which policy made them)."""
        self.cfg = cfg
        self.model_path = str(model_path)
        self.retriever = retriever_handle
        self._cfg_dict = cfg.to_dict()
        self._lock = threading.RLock()
        self._workers: dict[int, _Worker] = {}
        self._next_wid = 0
        self._target = cfg.rollout.num_workers if num_workers is None else int(num_workers)
        self._weights: Any = None          # what a new worker loads: ObjectRef / path / None
        self.version = self._path_version = int(version)
        self._replacements = 0
        self.timeouts = 0              # batches that ran past rollout.batch_timeout_s
        self._group: dict | None = None    # the open broadcast group (ranks by worker id)
        self.last_stats: dict[str, Any] = {}
        self._options, self._engine_options = self._actor_options()
        self.scale(self._target)

    # ---- workers -------------------------------------------------------------------------
    def _actor_options(self) -> tuple[dict, dict]:
        from searche1_ray.engine.vllm_engine import engine_env
        from searche1_ray.plan import rollout_worker_options

        opts = dict(rollout_worker_options(self.cfg))
        engine_options = opts.pop("vllm", {})
        pg_spec = opts.pop("placement_group", None)
        opts.pop("placement_group_bundle_index", None)
        self._pg_spec = pg_spec
        opts["runtime_env"] = {"env_vars": engine_env(self.cfg.rollout)}
        opts["max_restarts"] = 0
        return opts, engine_options

    def _spawn(self, slot_cpus: Sequence[int] | None = None) -> _Worker:
        opts = dict(self._options)
        if self._pg_spec is not None:  # pragma: no cover - tensor parallel on GPU clusters
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            pg = placement_group(self._pg_spec["bundles"], strategy=self._pg_spec["strategy"])
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
        if slot_cpus:
            env = dict(opts["runtime_env"]["env_vars"], OMP_NUM_THREADS=str(len(slot_cpus)))
            opts["runtime_env"] = {**opts["runtime_env"], "env_vars": env}
        wid = self._next_wid
        self._next_wid += 1
        handle = RolloutWorkerActor.options(name=None, **opts).remote(
            self._cfg_dict, self.model_path, self.retriever, list(slot_cpus or []),
            self._engine_options, self._path_version)
        w = _Worker(wid, handle, ready=None, version=self._path_version)
        if self._weights is not None:
            w.pending_sync = handle.update_weights.remote(self._weights, self.version)
            w.version = self.version
        elif self.version == self._path_version:
            pass                           # it loads model_path: that version
        else:  # weights arrived only by broadcast: this worker waits for the next update
            w.version = -1
        w.ready = handle.health.remote()
        self._workers[wid] = w
        log.info("rollout worker %d starting (%d live)", wid, len(self._workers))
        return w

    def _plan_cpus(self, count: int, cores: Sequence[int]) -> list[list[int]]:
        cores = sorted(cores)
        threads = max(1, len(cores) // max(1, count))
        from searche1_ray.engine.vllm_engine import cpu_slot
        return [cpu_slot(i, threads, cores) for i in range(count)]

    def _rebalance(self) -> None:
        """Give the workers of each node disjoint shares of its cores (CPU engines only)."""
        from searche1_ray.engine.vllm_engine import is_cpu_build
        if not is_cpu_build():
            return
        by_node: dict[str, list[_Worker]] = {}
        for w in self._workers.values():
            if w.is_ready and not w.retiring:
                by_node.setdefault(w.node_id, []).append(w)
        for ws in by_node.values():
            ws.sort(key=lambda w: w.wid)
            for w, cpus in zip(ws, self._plan_cpus(len(ws), ws[0].node_cores)):
                w.handle.bind.remote(cpus)

    def _initial_cpus(self) -> list[int] | None:
        # the driver's node: used only for the first binding, _rebalance fixes it once ready
        try:
            cores = sorted(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover
            return None
        live = sum(1 for w in self._workers.values() if not w.retiring)
        return self._plan_cpus(live + 1, cores)[live]

    @property
    def num_workers(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers.values() if not w.retiring)

    @property
    def workers(self) -> dict[int, Any]:
        """Live (not retiring) worker handles by worker id."""
        with self._lock:
            return {w.wid: w.handle for w in self._workers.values() if not w.retiring}

    def busy_workers(self) -> dict[int, Any]:
        """Workers running a batch right now (tests kill one of these)."""
        with self._lock:
            return {w.wid: w.handle for w in self._workers.values() if w.busy is not None}

    def worker_batches(self) -> dict[int, int]:
        """Batches each live worker has finished since it started."""
        with self._lock:
            return {w.wid: w.batches for w in self._workers.values()}

    def scale(self, num_workers: int) -> int:
        """Grow or shrink to ``num_workers`` live workers; safe to call while ``generate`` runs.
        New workers are used as soon as their engine is up and holds the current weights;
        removed workers finish their current batch first."""
        if num_workers < 0:
            raise ValueError(f"rollout: num_workers must be >= 0, got {num_workers}")
        with self._lock:
            self._target = int(num_workers)
            live = [w for w in self._workers.values() if not w.retiring]
            for _ in range(self._target - len(live)):
                self._spawn(self._initial_cpus())
            if len(live) > self._target:
                # retire idle (and not yet started) workers first, newest first
                victims = sorted(live, key=lambda w: (w.busy is not None, w.is_ready, -w.wid))
                for w in victims[:len(live) - self._target]:
                    w.retiring = True
                    if w.busy is None:
                        self._stop(w)
            if self._group is not None:
                self._group["stale"] = True
            self._rebalance()
            return self.num_workers

    def _stop(self, w: _Worker) -> None:
        self._workers.pop(w.wid, None)
        try:
            ray.kill(w.handle)
        except Exception:  # already gone
            pass
        log.info("rollout worker %d stopped (%d live)", w.wid, self.num_workers)

    def _replace(self, w: _Worker, why: str) -> None:
        log.warning("rollout worker %d lost (%s); its batch goes back in the queue", w.wid, why)
        self._workers.pop(w.wid, None)
        try:
            ray.kill(w.handle)
        except Exception:
            pass
        if self._group is not None:
            self._group["stale"] = True
        if not w.retiring and self.num_workers < self._target:
            if self._replacements >= _MAX_REPLACEMENTS:
                raise RuntimeError(f"rollout: {self._replacements} workers died; giving up "
                                   "(look at the worker logs under the Ray session directory)")
            self._replacements += 1
            self._spawn(self._initial_cpus())

    # ---- generation ----------------------------------------------------------------------
    def generate(self, questions: list[dict], n: int, temperature: float | None = None,
                 seed: int | None = None, questions_per_batch: int | None = None,
                 **overrides: Any) -> list[dict]:
        """``n`` trajectories per question ``{"id", "question", "golden_answers"}``, as rollout
        rows (ordered by question, then sample index). Blocks until every row is back.
        ``temperature`` None = ``rollout.temperature``; ``seed`` makes sampling reproducible per
        (question, sample, turn); keyword ``overrides`` change loop settings for this call
        (``max_searches``, ``max_turn_tokens``, ``max_response_tokens``, ``topk``…, and the
        schedule: ``loop``, ``max_inflight``);
        ``questions_per_batch`` None = ``rollout.questions_per_batch``."""
        from searche1_ray.engine.search_loop import LoopSettings
        allowed = [f.name for f in dataclasses.fields(LoopSettings)] + list(SCHEDULE_SETTINGS)
        bad = sorted(set(overrides) - set(allowed))
        if bad:
            raise TypeError(f"rollout: unknown loop setting(s) {bad}; allowed: " + ", ".join(allowed))
        if overrides.get("loop", "async") not in ("async", "rounds"):
            raise ValueError(f"rollout: loop must be 'async' or 'rounds', got {overrides['loop']!r}")
        ids = [str(q.get("id")) for q in questions]
        if len(set(ids)) != len(ids):
            dup = [i for i, c in Counter(ids).items() if c > 1][:3]
            raise ValueError(f"rollout: question ids must be unique within a call; repeated: {dup}")
        if n < 1:
            raise ValueError(f"rollout: n must be >= 1, got {n}")
        qpb = int(questions_per_batch or self.cfg.rollout.questions_per_batch)
        queue = deque(_Batch(i, list(questions[s:s + qpb]))
                      for i, s in enumerate(range(0, len(questions), qpb)))
        inflight: dict[Any, tuple[_Worker, _Batch]] = {}
        results: dict[tuple[str, int], dict] = {}
        per_worker: Counter = Counter()
        agg: Counter = Counter()
        resubmitted = duplicates = 0
        t0 = time.perf_counter()
        while queue or inflight:
            with self._lock:
                self._refresh()
                if not self._workers and self._target == 0:
                    raise RuntimeError("rollout: the pool has no workers; call scale(n) first")
                for w in sorted(self._workers.values(), key=lambda w: w.wid):
                    if not queue:
                        break
                    if w.busy is None and w.is_ready and not w.retiring and w.version == self.version:
                        b = queue.popleft()
                        ref = w.handle.generate.remote(b.questions, n, temperature, seed,
                                                       overrides or None)
                        w.busy = ref
                        b.started = time.perf_counter()
                        inflight[ref] = (w, b)
                waiting = list(inflight) + [w.ready for w in self._workers.values()
                                            if not w.is_ready] \
                    + [w.pending_sync for w in self._workers.values() if w.pending_sync is not None]
            if not waiting:
                time.sleep(0.05)  # only a scale() from another thread can make progress now
                continue
            done, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            with self._lock:
                self._expire(inflight, queue, set(done))
                for ref in done:
                    if ref not in inflight:
                        continue
                    w, b = inflight.pop(ref)
                    w.busy = None
                    err: BaseException | None = None
                    try:
                        out = ray.get(ref)
                    except RayTaskError as e:
                        # the worker is alive and its task raised; first, because ray.get's
                        # RayTaskError also takes its cause's type: another actor's death (a
                        # retriever replica's, after the search's own re-sends) is a task failure
                        err = e
                    except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                        queue.appendleft(b)            # the worker itself died
                        resubmitted += 1
                        self._replace(w, type(e).__name__)
                        continue
                    except RayError as e:
                        err = e
                    if err is not None:
                        b.attempts += 1
                        if b.attempts > _MAX_TASK_RETRIES:
                            raise RuntimeError(f"rollout: batch {b.bid} failed {b.attempts} times; "
                                               f"last error: {err}") from err
                        lines = [x for x in str(err).strip().splitlines() if x.strip()]
                        log.warning("rollout batch %d failed on worker %d (%s); retrying", b.bid,
                                    w.wid, lines[-1] if lines else type(err).__name__)
                        queue.append(b)
                        resubmitted += 1
                        continue
                    w.batches += 1
                    per_worker[w.wid] += 1
                    for row in out["rows"]:
                        key = (row["question_id"], row["sample_idx"])
                        if key in results:
                            duplicates += 1
                            continue
                        results[key] = row
                    for k, v in out["stats"].items():
                        if isinstance(v, (int, float)):
                            agg[k] += v
                    if w.retiring:
                        self._stop(w)
        wall = time.perf_counter() - t0
        rows = [results[(str(q["id"]), s)] for q in questions for s in range(n)]
        tokens = int(agg["policy_tokens"])
        self.last_stats = {
            "wall_s": wall, "trajectories": len(rows), "policy_tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "trajectories_per_s": len(rows) / wall if wall > 0 else 0.0,
            "batches": sum(per_worker.values()), "resubmitted": resubmitted,
            "duplicates_dropped": duplicates, "batches_per_worker": dict(per_worker),
            "workers_used": len(per_worker), "mean_searches": (
                sum(r["num_searches"] for r in rows) / len(rows) if rows else 0.0),
            "mean_reward": (sum(r["reward"] for r in rows) / len(rows) if rows else 0.0),
            **{f"engine_{k}": float(v) for k, v in agg.items()
               if k in ("generate_s", "retrieve_s", "retrieve_calls", "queries", "rounds",
                        "invalid_turns", "forced", "observation_tokens")}}
        log.info("rollout: %d trajectories in %.1fs (%.0f tok/s, %.2f traj/s) on %d workers",
                 len(rows), wall, self.last_stats["tokens_per_s"],
                 self.last_stats["trajectories_per_s"], len(per_worker))
        return rows

    def _expire(self, inflight: dict, queue: deque, done: set) -> None:
        """Batches running past ``rollout.batch_timeout_s``: the worker is taken as wedged
        (a hung engine or a search that never returns), killed and replaced, and the batch goes
        back in the queue; past its retries the round fails with a TimeoutError naming it."""
        limit = float(self.cfg.rollout.batch_timeout_s)
        if limit <= 0:
            return
        now = time.perf_counter()
        for ref, (w, b) in list(inflight.items()):
            if ref in done or now - b.started <= limit:
                continue
            inflight.pop(ref)
            w.busy = None
            b.attempts += 1
            self.timeouts += 1
            self._replace(w, f"batch {b.bid} still running after rollout.batch_timeout_s="
                             f"{limit:g}s: a wedged engine?")
            if b.attempts > _MAX_TASK_RETRIES:
                raise TimeoutError(f"rollout: batch {b.bid} ({len(b.questions)} questions) ran past "
                                   f"rollout.batch_timeout_s={limit:g}s {b.attempts} times, on "
                                   f"worker {w.wid} last; the engine or the retriever hangs")
            queue.appendleft(b)

    def _refresh(self) -> None:
        """Mark workers whose engine came up / whose weight load finished; replace dead ones."""
        changed = False
        for w in list(self._workers.values()):
            if not w.is_ready and w.ready is not None:
                done, _ = ray.wait([w.ready], timeout=0)
                if done:
                    try:
                        h = ray.get(w.ready)
                        w.node_id, w.node_cores = h["node_id"], h["node_cores"]
                        w.is_ready = True
                        changed = True
                        log.info("rollout worker %d ready (pid %d)", w.wid, h["pid"])
                    except (RayActorError, RayTaskError) as e:
                        if "creation task" in str(e):  # the constructor raised: a real error
                            self._workers.pop(w.wid, None)
                            raise RuntimeError(f"rollout: worker {w.wid} failed to start: "
                                               f"{e}") from e
                        self._replace(w, f"lost while starting: {type(e).__name__}")
                        continue
            if w.pending_sync is not None:
                done, _ = ray.wait([w.pending_sync], timeout=0)
                if done:
                    try:
                        ray.get(w.pending_sync)
                    except (RayActorError, RayTaskError) as e:
                        self._replace(w, f"weight load failed: {e}")
                        continue
                    w.pending_sync = None
        if changed:
            self._rebalance()

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every live worker's engine is up and holds the current weights."""
        deadline = time.time() + timeout_s
        while True:
            with self._lock:
                self._refresh()
                pending = [w.ready for w in self._workers.values() if not w.is_ready] + \
                    [w.pending_sync for w in self._workers.values() if w.pending_sync is not None]
            if not pending:
                return
            if time.time() > deadline:
                raise TimeoutError(f"rollout: {len(pending)} workers not ready after {timeout_s}s")
            ray.wait(pending, num_returns=len(pending), timeout=min(5.0, timeout_s))

    # ---- weights -------------------------------------------------------------------------
    def update_weights(self, weights: Any, version: int) -> float:
        """Load new weights into every worker in place; returns seconds. ``weights``: a dict of
        HF-named tensors (put into the object store once), an ObjectRef to one, or a
        safetensors file / folder path. Workers started later load the same weights."""
        t0 = time.perf_counter()
        if isinstance(weights, Mapping):
            ref = ray.put(dict(weights))
        elif isinstance(weights, ray.ObjectRef):
            ref = weights
        elif isinstance(weights, (str, Path)):
            if not Path(weights).expanduser().exists():
                raise FileNotFoundError(f"update_weights: {weights} does not exist")
            ref = str(Path(weights).expanduser())
        else:
            raise TypeError("update_weights: expected a state dict, an ObjectRef or a path; got "
                            f"{type(weights).__name__}")
        with self._lock:
            self.version = int(version)
            self._weights = ref
            calls = []
            for w in self._workers.values():
                if w.retiring:
                    continue
                w.pending_sync = w.handle.update_weights.remote(ref, self.version)
                w.version = self.version
                calls.append((w, w.pending_sync))
        for w, c in calls:
            try:
                ray.get(c)
            except (RayActorError, RayTaskError) as e:
                with self._lock:
                    self._replace(w, f"weight load failed: {e}")
            else:
                with self._lock:
                    if w.pending_sync is c:
                        w.pending_sync = None
        if isinstance(ref, ray.ObjectRef) and not isinstance(weights, Mapping):
            # keep a copy the pool owns: the caller's object may vanish with its owner (e.g.
            # the trainer) and workers started later still need it
            self._weights = ray.put(ray.get(ref))
        dt = time.perf_counter() - t0
        log.info("rollout: weights v%d in %d workers in %.2fs", version, len(calls), dt)
        return dt

    def open_broadcast_group(self, master_address: str, master_port: int,
                             backend: str = "nccl") -> tuple[int, list]:
        """Start every live worker joining a weight-sync group as ranks 1..N (N = workers x
        tensor-parallel size: every engine rank receives the full weights). The trainer must
        join as rank 0 at the same time (``weight_sync.open_group(addr, port, 0, world_size,
        backend)``), then ``ray.get`` the returned refs. Returns (world_size, refs). Scaling or
        losing a worker makes the group stale: open a new one (on a new port)."""
        self.wait_ready()
        with self._lock:
            ws = [w for w in sorted(self._workers.values(), key=lambda w: w.wid) if not w.retiring]
            tp = self.cfg.rollout.tensor_parallel_size
            world = len(ws) * tp + 1
            refs = [w.handle.init_broadcast_group.remote(master_address, master_port, 1 + i * tp,
                                                         world, backend)
                    for i, w in enumerate(ws)]
            self._group = {"wids": [w.wid for w in ws], "stale": False, "world_size": world}
        return world, refs

    def receive_broadcast(self, metas: list, version: int) -> list:
        """Start every group member receiving one broadcast of ``metas`` (``weight_sync.
        tensor_meta(state_dict)``); rank 0 then calls ``weight_sync.broadcast_state_dict`` and
        ``ray.get``s the returned refs. Workers outside the group wait for a later update."""
        with self._lock:
            if self._group is None or self._group["stale"]:
                raise RuntimeError("rollout: no current broadcast group (the pool was scaled or "
                                   "lost a worker); call open_broadcast_group again")
            metas = [[m.name, m.dtype, list(m.shape)] if hasattr(m, "name") else list(m)
                     for m in metas]  # plain lists cross vLLM's RPC in any executor
            self.version = int(version)
            self._weights = None  # only broadcasts hold these weights now
            refs = []
            for w in self._workers.values():
                if w.wid in self._group["wids"]:
                    w.pending_sync = w.handle.receive_broadcast.remote(metas, self.version)
                    w.version = self.version
                    refs.append(w.pending_sync)
                else:
                    w.version = -1
        return refs

    # ---- status --------------------------------------------------------------------------
    def health(self, timeout_s: float = 30.0) -> list[dict]:
        """One dict per live worker: ``{"worker", "ok", "version", "pid", "cpus", "rss_gib",
        …}``; a worker that does not answer gets ``ok: False`` and the error."""
        with self._lock:
            ws = [w for w in self._workers.values() if not w.retiring]
        out = []
        for w in ws:
            try:
                h = ray.get(w.handle.health.remote(), timeout=timeout_s)
                h.update(worker=w.wid, ready=w.is_ready)
            except Exception as e:
                h = {"worker": w.wid, "ok": False, "error": f"{type(e).__name__}: {e}"}
            out.append(h)
        return out

    def shutdown(self) -> None:
        """Stop every worker (idempotent)."""
        with self._lock:
            for w in list(self._workers.values()):
                self._stop(w)
            self._target = 0
            self._weights = None


__all__ = ["RolloutWorker", "RolloutWorkerActor", "RolloutPool"]
