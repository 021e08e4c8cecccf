"""TrainRunner: one long-lived Ray Train TorchTrainer per round, driven step by step by commands.

    driver                               CommandChannel actor             train workers (ranks)
    runner.step(batch) ─ ray.put(batch) ─► send {step, ref} ──────────────► every rank: shard
                       ◄── metrics (rank 0, reduced) ◄─ put_result ◄───── rows[rank::world], train
    runner.get_weights() ─────────────────► {weights} ─────────────────────► rank 0: ray.put(sd)
    runner.save_checkpoint(tag) ──────────► {save} ─► HF folder + ray.train.report(checkpoint)
    runner.stop() ────────────────────────► {stop} ─► the loop returns, fit() ends

``TorchTrainer.fit()`` runs in a background thread for the whole round (its start-up, ~20 s,
is paid once); each worker loads the model, lets the task prepare it, wraps it with DeepSpeed
(deepspeed_config.py) and then serves commands until ``stop``. The step's batch goes into the
object store once; every rank reads it, so the token-mean normalisation over the global
minibatch needs no communication (tasks.py). Gradient accumulation is explicit: every rank runs
the same number of micro-batches per optimizer step (a short shard runs a zero-weight dummy), as
ZeRO-2 reduces gradients during each backward.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import ray

from searche1_ray.config import Config
from searche1_ray.training.worker import READY, worker_loop

log = logging.getLogger(__name__)


def _interrupted() -> bool:
    """Whether the caller runs inside the unwinding of Ctrl-C (KeyboardInterrupt) or an exit."""
    return isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit))


class TrainWorkerError(RuntimeError):
    """A train rank failed (its error, or the Ray Train run ended because a rank died): the
    runner is unusable; the round may restart a new one from its last checkpoint (train.max_failures)."""


@ray.remote(num_cpus=0)
class CommandChannel:
    """Per-rank command queues and a result board (async actor: waits never block it)."""

    def __init__(self, world_size: int):
        self.world = world_size
        self.queues = [asyncio.Queue() for _ in range(world_size)]
        self.results: dict[int, dict[int, Any]] = {}
        self.changed = asyncio.Event()

    async def next_command(self, rank: int) -> dict:
        return await self.queues[rank].get()

    async def send(self, command: dict) -> None:
        for q in self.queues:
            q.put_nowait(command)

    async def put_result(self, seq: int, rank: int, result: Any) -> None:
        self.results.setdefault(seq, {})[rank] = result
        self.changed.set()

    async def wait_results(self, seq: int, timeout: float) -> dict[int, Any] | None:
        """All ranks' results for ``seq`` (or as soon as one rank reported an error); None if
        they are not all in after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.results.get(seq, {})
            if len(got) == self.world or any(isinstance(r, dict) and "error" in r for r in got.values()):
                return self.results.pop(seq)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass


class TrainRunner:
    """Ray Train workers that live for a round and train ``task`` on the batches they are given.

    ``TrainRunner(cfg, model_path, task, run_dir)`` starts the workers and returns once every rank
    has loaded the model (~20-30 s on 2 CPU cores; DeepSpeed builds no op: see worker.skip_shm_comm_build).
    """

    def __init__(self, cfg: Config, model_path: str, task: Any, run_dir: str | os.PathLike,
                 start_timeout_s: float = 900.0):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        self.cfg, self.task, self.model_path = cfg, task, str(model_path)
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.world = cfg.train.num_workers
        self.channel = CommandChannel.remote(self.world)
        self._seq = 0
        self._error: BaseException | None = None
        self._stopped = False
        self._broadcast: dict | None = None
        self.steps_done = 0
        name = f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        # Ray Train's copies of this round's checkpoints (the HF folders are the run's own copies):
        # deleted when the round's fit() has ended (``stop``), so they never pile up over rounds
        self.storage = self.run_dir / "ray_train" / name
        from searche1_ray.plan import train_scaling_config

        scaling = train_scaling_config(cfg)  # the same options `jobs.evaluate --dry-run` prints
        self.trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"cfg": cfg, "task": task, "model_path": self.model_path,
                               "channel": self.channel},
            scaling_config=ScalingConfig(**{**scaling, "num_workers": self.world}),
            run_config=RunConfig(name=name, storage_path=str(self.storage.parent),
                                 failure_config=FailureConfig(max_failures=0),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        self._thread = threading.Thread(target=self._fit, name=f"fit-{name}", daemon=True)
        t0 = time.time()
        self._thread.start()
        try:
            self._collect(READY, timeout=start_timeout_s, what="start the train workers")
        except BaseException:
            # workers that start later find no channel, fail, and end the run
            self._stopped = True
            ray.kill(self.channel)
            raise
        self.start_s = time.time() - t0
        log.info("%d train workers ready in %.1f s (%s)", self.world, self.start_s, name)

    # ---- driver-side plumbing ------------------------------------------------------------
    def _fit(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as e:  # surfaced by the next command
            self._error = e

    def _collect(self, seq: int, timeout: float | None, what: str, hint: str = "") -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            res = ray.get(self.channel.wait_results.remote(seq, 2.0))
            if res is not None:
                errors = [(r, v["error"]) for r, v in sorted(res.items()) if isinstance(v, dict) and "error" in v]
                if errors:
                    rank, tb = errors[0]
                    self._error = TrainWorkerError(f"train worker rank {rank} failed to {what}:\n{tb}")
                    raise self._error
                return res.get(0)
            if not self._thread.is_alive():
                raise TrainWorkerError(f"the Ray Train run ended while waiting to {what}: {self._error!r}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"train workers did not {what} within {timeout:g} s; " + (
                    hint or "check `ray status` for free CPUs (train.num_workers x train.cpus_per_worker)"))

    def _command(self, kind: str, timeout: float | None = None, **payload: Any) -> Any:
        if self._stopped:
            raise RuntimeError(f"TrainRunner is stopped; cannot {kind}")
        if self._error is not None:
            raise TrainWorkerError(f"TrainRunner failed earlier: {self._error}")
        self._seq += 1
        ray.get(self.channel.send.remote({"kind": kind, "seq": self._seq, **payload}))
        if timeout is None and self.cfg.train.command_timeout_s > 0:
            timeout = float(self.cfg.train.command_timeout_s)
        return self._collect(self._seq, timeout, f"finish '{kind}'",
                             hint="a rank may hang in a collective or have died without an error "
                                  "(train.command_timeout_s bounds each command)")

    # ---- the interface -------------------------------------------------------------------
    def step(self, batch: Sequence[dict]) -> dict[str, float]:
        """Train on one batch of samples (pipelines.py): ``task.epochs`` passes over
        ``task.minibatches(batch)``, one optimizer step per minibatch. Returns the metrics
        reduced over ranks (token-weighted means), ``<task>/grad_norm``, ``<task>/lr`` and
        ``perf/train_s``."""
        if not batch:
            raise ValueError("TrainRunner.step: empty batch")
        t0 = time.time()
        ref = ray.put(list(batch))
        metrics = self._command("step", batch=[ref])
        metrics["perf/train_s"] = time.time() - t0
        self.steps_done += 1
        return metrics

    def get_weights_ref(self) -> ray.ObjectRef:
        """ObjectRef of the full HF-named state dict (bf16 CPU tensors; merged if LoRA), put by
        rank 0. Valid while the runner lives; hand it to the rollout pool as is."""
        return self._command("weights")[0]

    def get_weights(self) -> dict:
        return ray.get(self.get_weights_ref())

    def broadcast_weights(self, pool: Any, version: int, backend: str | None = None) -> float:
        """Push the current weights into ``pool``'s engines by a collective broadcast from rank 0
        (engine/weight_sync.py; NCCL on GPUs, gloo on CPU) instead of the object store. The
        group is opened on first use and again after the pool was rescaled. Returns seconds."""
        t0 = time.time()
        backend = backend or ("nccl" if self.cfg.train.use_gpu else "gloo")
        refs = None
        if self._broadcast is not None:
            try:
                refs = pool.receive_broadcast(self._broadcast["metas"], version)
            except RuntimeError:  # the pool was scaled or lost a worker: the group is stale
                self._broadcast = None
        if refs is None:
            addr, port = self._command("bcast_address")
            world, join = pool.open_broadcast_group(addr, port, backend)
            metas = self._command("bcast_open", address=addr, port=port, world=world, backend=backend)
            ray.get(join)
            self._broadcast = {"metas": metas, "world": world}
            refs = pool.receive_broadcast(metas, version)
        self._command("bcast_send")
        ray.get(refs)
        return time.time() - t0

    def compute_logprobs(self, batch: Sequence[dict]) -> list:
        """Trainer log-probs per sample, aligned to ``input_ids`` (position 0 is 0.0): entry t
        is log π(ids[t] | ids[<t]) under the current weights (no grad)."""
        ref = ray.put(list(batch))
        return self._command("logprobs", batch=[ref])

    def save_checkpoint(self, tag: str) -> str:
        """Write an HF folder (weights + config + tokenizer; loadable by transformers and vLLM)
        and register it with Ray Train (``ray.train.report(checkpoint=…)``). ``tag`` is a name
        (saved under ``<run_dir>/checkpoints/``) or a path. Returns the folder."""
        folder = Path(tag) if (os.sep in tag or Path(tag).is_absolute()) else self.run_dir / "checkpoints" / tag
        folder = folder.expanduser().resolve()
        return self._command("save", path=str(folder), metrics={"steps": self.steps_done})

    def stop(self, timeout_s: float = 120.0, abort: bool | None = None) -> None:
        """End the workers' loops, wait for ``fit()`` to return and delete Ray Train's copies of
        the round's checkpoints (``storage``; the HF folders ``save_checkpoint`` wrote stay)
        (idempotent). ``abort`` (default: when called while a KeyboardInterrupt or SystemExit
        unwinds, i.e. Ctrl-C or SIGTERM) does not wait for the current command to finish: the
        channel is killed, the ranks fail at their next read and the run ends with the Ray session."""
        if self._stopped:
            return
        self._stopped = True
        if abort is None:
            abort = _interrupted()
        try:
            if abort:
                log.warning("train run %s aborted (not waiting for the current command)", self.storage.name)
            elif self._thread.is_alive():
                ray.get(self.channel.send.remote({"kind": "stop", "seq": -2}))
                self._thread.join(timeout_s)
                if self._thread.is_alive():
                    log.warning("Ray Train run did not end within %.0f s of stop", timeout_s)
        finally:
            ray.kill(self.channel)
        if not self._thread.is_alive():  # fit() has returned: nothing writes there any more
            shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> "TrainRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
