"""Continuous batching of search calls: the calls that arrive while one batch runs go together
as the next batch, and a call that finds the searcher idle starts at once (no Ray here).

    caller -> submit(queries, topk) -> pending ─┐ (runner: while pending)
                                                └─> take <= max_calls calls -> run_batch in a
                                                    worker thread -> each call's future

Why not ``@serve.batch``: Ray Serve's batch loop cuts the next batch (after its wait timeout)
while the previous one is still running, so under load a replica queues many small batches
behind one another, and at one client every call pays the wait timeout. Here a batch is cut
only when the searcher is free, so its size follows the load with no timer: 1 call at one
client, everything that queued meanwhile at 32.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Callable, Sequence

Call = tuple[Sequence[str], int]                  # (queries, topk)
RunBatch = Callable[[list[Call]], list[Any]]      # blocking: one result per call, in order


class ContinuousBatcher:
    """``await submit(queries, topk)`` -> ``run_batch``'s result for that call.

    ``run_batch`` gets a list of calls and returns one result per call; it runs in a worker
    thread, one batch at a time. ``max_calls`` caps the calls per batch; ``wait_s`` > 0 makes
    an idle batcher wait that long for more calls before it starts a batch (0: never wait).
    An exception in ``run_batch`` goes to every call of that batch; later batches still run.
    """

    def __init__(self, run_batch: RunBatch, max_calls: int = 32, wait_s: float = 0.0):
        if max_calls < 1:
            raise ValueError(f"ContinuousBatcher: max_calls must be >= 1, got {max_calls}")
        self.run_batch = run_batch
        self.max_calls = max_calls
        self.wait_s = max(0.0, wait_s)
        self.batches = 0
        self.calls = 0
        self._pending: deque[tuple[Call, asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None

    async def submit(self, queries: Sequence[str], topk: int) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(((queries, topk), future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._pending:
            if self.wait_s > 0 and len(self._pending) < self.max_calls:
                await asyncio.sleep(self.wait_s)
            take = [self._pending.popleft() for _ in range(min(self.max_calls, len(self._pending)))]
            take = [(call, f) for call, f in take if not f.done()]    # cancelled callers
            if not take:
                continue
            try:
                results = await asyncio.to_thread(self.run_batch, [call for call, _ in take])
                if len(results) != len(take):
                    raise RuntimeError(f"run_batch returned {len(results)} results for "
                                       f"{len(take)} calls")
            except Exception as e:
                for _, f in take:
                    if not f.done():
                        f.set_exception(e)
            else:
                for (_, f), result in zip(take, results):
                    if not f.done():
                        f.set_result(result)
            self.batches += 1
            self.calls += len(take)
