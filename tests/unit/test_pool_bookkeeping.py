"""RolloutPool's bookkeeping, with no Ray actors: a batch running past rollout.batch_timeout_s is
taken as a wedged engine (its worker killed and replaced, the batch requeued, and past its
retries a TimeoutError naming the setting); a pool started on a resumed policy reports its
version."""

import threading
import time
from collections import deque

import pytest

from actors.rollout_worker import _MAX_TASK_RETRIES, RolloutPool, _Batch, _Worker
from searche1_ray.config import Config


def _pool(limit: float) -> RolloutPool:
    pool = RolloutPool.__new__(RolloutPool)         # no actors: __init__ would start engines
    cfg = Config()
    cfg.rollout.batch_timeout_s = limit
    pool.cfg, pool._lock, pool._workers, pool._group = cfg, threading.RLock(), {}, None
    pool._target, pool._replacements, pool.timeouts = 0, 0, 0
    return pool


def _inflight(pool, started_ago: dict[int, float]):
    now = time.perf_counter()
    inflight = {}
    for wid, ago in started_ago.items():
        w = _Worker(wid=wid, handle=f"h{wid}", ready=None, is_ready=True, busy=f"ref{wid}")
        pool._workers[wid] = w
        inflight[f"ref{wid}"] = (w, _Batch(bid=wid, questions=[{"id": wid}], started=now - ago))
    return inflight


@pytest.mark.faults("hung rollout engine (timeout)")
def test_only_the_overdue_batch_is_requeued_and_its_worker_dropped(monkeypatch):
    killed = []
    monkeypatch.setattr("ray.kill", lambda h: killed.append(h))
    pool = _pool(limit=10.0)
    inflight = _inflight(pool, {0: 11.0, 1: 3.0, 2: 50.0})
    queue = deque()
    pool._expire(inflight, queue, done={"ref2"})    # ref2 finished this tick: not expired
    assert list(inflight) == ["ref1", "ref2"]
    assert [b.bid for b in queue] == [0] and queue[0].attempts == 1
    assert killed == ["h0"] and 0 not in pool._workers and pool.timeouts == 1


@pytest.mark.faults("hung rollout engine (timeout)")
def test_past_its_retries_the_round_fails_naming_the_setting(monkeypatch):
    monkeypatch.setattr("ray.kill", lambda h: None)
    pool = _pool(limit=2.5)
    inflight = _inflight(pool, {4: 3.0})
    inflight["ref4"][1].attempts = _MAX_TASK_RETRIES
    with pytest.raises(TimeoutError, match=r"batch 4 \(1 questions\) ran past "
                                           r"rollout.batch_timeout_s=2.5s 3 times"):
        pool._expire(inflight, deque(), done=set())


def test_zero_means_no_limit(monkeypatch):
    monkeypatch.setattr("ray.kill", lambda h: pytest.fail("killed a worker with no limit set"))
    pool = _pool(limit=0)
    inflight = _inflight(pool, {0: 1e6})
    pool._expire(inflight, deque(), done=set())
    assert list(inflight) == ["ref0"]


def test_a_pool_started_on_a_resumed_policy_reports_its_version(monkeypatch):
    """A resumed run starts its pool on the current policy's folder: workers load it and say
    so with its version (not 0), and a later update moves them on as usual."""
    import actors.rollout_worker as rw

    made = []

    class _Remote:
        def __init__(self, fn):
            self.remote = fn

    class _Handle:
        health = _Remote(lambda: "health-ref")
        update_weights = _Remote(lambda weights, version: ("sync", version))

    class _Actor:
        @staticmethod
        def options(**opts):
            return _Remote(lambda *args: made.append(args) or _Handle())

    monkeypatch.setattr(rw, "RolloutWorkerActor", _Actor)
    pool = _pool(limit=0)
    pool.model_path, pool.retriever, pool._cfg_dict, pool._engine_options = "/ckpt/grpo0-step0002", None, {}, {}
    pool._options, pool._pg_spec, pool._next_wid, pool._weights = {"runtime_env": {"env_vars": {}}}, None, 0, None
    pool.version = pool._path_version = 7
    w = pool._spawn()
    assert made[0][-1] == 7 and w.version == 7 and w.pending_sync is None
    pool._weights, pool.version = "weights-ref", 8              # after the next update
    w2 = pool._spawn()
    assert w2.version == 8 and w2.pending_sync == ("sync", 8)
