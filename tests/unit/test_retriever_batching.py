"""The retriever's continuous batcher, and the bench's Search-R1-design baseline request handling
(no Ray, no model: stand-in searchers)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from searche1_ray.retrieval.batcher import ContinuousBatcher


class Recorder:
    """A blocking ``run_batch`` that records its batches; ``gate`` holds the first batch."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[tuple[list[str], int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def __call__(self, calls):
        self.gate.wait(5)
        self.batches.append([(list(q), k) for q, k in calls])
        if any(self.fail_on in q for q, _ in calls):
            raise RuntimeError("boom")
        return [[f"{q}@{k}" for q in qs] for qs, k in calls]


def test_a_lone_call_runs_at_once_and_gets_its_own_result():
    rec = Recorder()

    async def main():
        b = ContinuousBatcher(rec, max_calls=8)
        t0 = time.perf_counter()
        out = await b.submit(["a", "b"], 3)
        return out, time.perf_counter() - t0, b

    out, dt, b = asyncio.run(main())
    assert out == ["a@3", "b@3"] and rec.batches == [[(["a", "b"], 3)]]
    assert dt < 1.0 and (b.batches, b.calls) == (1, 1)


def test_calls_that_arrive_during_a_batch_form_the_next_batch_capped_at_max_calls():
    rec = Recorder()
    rec.gate.clear()

    async def main():
        b = ContinuousBatcher(rec, max_calls=3)
        first = asyncio.create_task(b.submit(["first"], 1))
        await asyncio.sleep(0.05)                    # the first batch is running (held)
        rest = [asyncio.create_task(b.submit([f"q{i}"], 1 + i % 2)) for i in range(5)]
        await asyncio.sleep(0.05)
        rec.gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == ["first@1"]
    assert rest == [[f"q{i}@{1 + i % 2}"] for i in range(5)]     # each call its own answer
    assert [len(batch) for batch in rec.batches] == [1, 3, 2]     # then 3 (the cap), then 2
    assert [q for batch in rec.batches for qs, _ in batch for q in qs] == \
        ["first"] + [f"q{i}" for i in range(5)]                  # arrival order kept


def test_a_failing_batch_fails_its_calls_only():
    rec = Recorder(fail_on="bad")
    rec.gate.clear()

    async def main():
        b = ContinuousBatcher(rec, max_calls=2)
        held = asyncio.create_task(b.submit(["x"], 1))
        await asyncio.sleep(0.05)
        bad = [asyncio.create_task(b.submit([q], 1)) for q in ("bad", "ok1")]
        later = asyncio.create_task(b.submit(["ok2"], 1))
        await asyncio.sleep(0.05)
        rec.gate.set()
        results = await asyncio.gather(held, *bad, later, return_exceptions=True)
        return results

    held, bad, ok1, ok2 = asyncio.run(main())
    assert held == ["x@1"] and ok2 == ["ok2@1"]
    assert isinstance(bad, RuntimeError) and isinstance(ok1, RuntimeError)


def test_wait_s_lets_an_idle_batcher_gather_calls():
    rec = Recorder()

    async def main():
        b = ContinuousBatcher(rec, max_calls=8, wait_s=0.2)
        tasks = [asyncio.create_task(b.submit([f"q{i}"], 1)) for i in range(1)]
        await asyncio.sleep(0.02)
        tasks += [asyncio.create_task(b.submit([f"q{i}"], 1)) for i in range(1, 4)]
        return await asyncio.gather(*tasks)

    asyncio.run(main())
    assert [len(batch) for batch in rec.batches] == [4]


def test_max_calls_must_be_positive():
    with pytest.raises(ValueError, match="max_calls must be >= 1"):
        ContinuousBatcher(lambda calls: [], max_calls=0)


class FakeRetriever:
    def __init__(self):
        self.seen = []

    def batch_search(self, queries, k):
        self.seen.append((list(queries), k))
        docs = [[{"id": f"{q}-{i}", "contents": q} for i in range(k)] for q in queries]
        return docs, [[1.0 - i / 10 for i in range(k)] for _ in queries]


def test_searchr1_baseline_answers_in_search_r1_shape():
    from bench.searchr1_server import QueryRequest, answer

    r = FakeRetriever()
    scored = answer(QueryRequest(queries=["a", "b"], topk=2, return_scores=True), r)
    assert r.seen == [(["a", "b"], 2)]               # the whole request in one search call
    assert scored["result"][1] == [{"document": {"id": "b-0", "contents": "b"}, "score": 1.0},
                                   {"document": {"id": "b-1", "contents": "b"}, "score": 0.9}]
    bare = answer(QueryRequest(queries=["a"]), r, default_topk=3)
    assert r.seen[-1] == (["a"], 3)                  # topk falls back to the server's
    assert bare == {"result": [[{"id": f"a-{i}", "contents": "a"} for i in range(3)]]}


def test_searchr1_baseline_endpoint_is_sync_so_fastapi_uses_its_thread_pool():
    import inspect

    from bench.searchr1_server import make_app

    app = make_app(FakeRetriever())
    route = next(r for r in app.routes if getattr(r, "path", "") == "/retrieve")
    assert not inspect.iscoroutinefunction(route.endpoint)
