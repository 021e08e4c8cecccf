"""SelfEvolutionDriver: the long-running Ray actor that runs Search-E1's self-evolution schedule.

    warm start (CPU testbed) → eval(base) → for each cycle: GRPO round → eval → OPSD round → eval
    → report

It owns the retriever app, the rollout pool and one Ray Train runner per round, writes
``runs/<name>/state.json`` atomically after every step and stage (a restarted driver resumes
from it, repeating and skipping nothing), exports Ray metrics (dashboard / Prometheus) and
TensorBoard scalars, and answers ``status()`` while it runs.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import ray

from searche1_ray.config import Config, config_from_dict
from searche1_ray.data.sampling import eval_questions, step_questions, strata
from searche1_ray.durable import atomic_write, atomic_write_with
from searche1_ray.run_state import RunState, load_state, save_state, schedule, state_path
from searche1_ray.training.opsd_round import RoundStopped

log = logging.getLogger("searche1.driver")

NAMESPACE = "searche1"


def driver_name(run: str) -> str:
    return f"searche1-driver-{run}"


class RunAlreadyRunning(RuntimeError):
    """``run()`` was called on a driver whose schedule is already running."""


def already_running_message(run: str) -> str:
    """What to tell a person who starts or resumes a run whose driver is running its schedule."""
    return (f"run {run} is already running in driver {driver_name(run)} (namespace {NAMESPACE}); "
            f"watch it with `python -m jobs.status {run} --address auto`, or stop it first with "
            f"`python -m jobs.status {run} --address auto --stop` (it finishes its step and saves), "
            f"then resume")


def stage_cycle(stage: str) -> int:
    """The cycle a stage belongs to: ``grpo/1``, ``opsd/1`` → 1; ``eval/grpo1`` → 1; others 0."""
    head, _, tail = stage.partition("/")
    digits = "".join(ch for ch in tail if ch.isdigit())
    return int(digits) if head in ("grpo", "opsd", "eval") and digits else 0


class _Metrics:
    """Ray metrics (shown by the dashboard's Metrics view / Prometheus) and TensorBoard."""

    def __init__(self, run: str, tb_dir: Path):
        from ray.util.metrics import Counter, Gauge
        from torch.utils.tensorboard import SummaryWriter

        tags = ("run",)
        self._tags = {"run": run}
        self.gauges = {name: Gauge(f"searche1_{name}", description=desc, tag_keys=tags) for name, desc in [
            ("cycle", "current self-evolution cycle"),
            ("stage_index", "index of the current stage in the schedule"),
            ("step", "steps finished in the current stage"),
            ("reward_mean", "mean EM reward of the last rollout batch"),
            ("eval_em", "exact match of the last evaluation"),
            ("tokens_per_s", "rollout tokens per second of the last batch"),
            ("rollout_workers", "live rollout workers"),
        ]}
        self.steps = Counter("searche1_steps_total", description="training steps finished", tag_keys=tags)
        # one series per stage name: 1 while it runs, 0 otherwise (a dashboard panel shows which)
        self._stage = Gauge("searche1_stage", description="1 for the stage that is running (tag: stage)",
                            tag_keys=("run", "stage"))
        self._current_stage: str | None = None
        self.tb = SummaryWriter(str(tb_dir))

    def stage(self, name: str, index: int, step: int) -> None:
        """Publish the running stage: its name (``searche1_stage{stage=…}`` = 1), index, cycle
        (``grpo/1`` → 1; 0 before the first cycle) and the steps finished in it."""
        if self._current_stage and self._current_stage != name:
            self._stage.set(0.0, tags={**self._tags, "stage": self._current_stage})
        self._stage.set(1.0, tags={**self._tags, "stage": name})
        self._current_stage = name
        self.set("stage_index", index)
        self.set("cycle", stage_cycle(name))
        self.set("step", step)

    def set(self, name: str, value: float) -> None:
        self.gauges[name].set(float(value), tags=self._tags)

    def scalars(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and "/" in k:
                self.tb.add_scalar(k, v, step)
        self.tb.flush()


@ray.remote(num_cpus=0, max_concurrency=8)
class SelfEvolutionDriver:
    def __init__(self, cfg_dict: dict[str, Any], resume: bool = False):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        self.cfg: Config = config_from_dict(cfg_dict)
        self.run_dir = self.cfg.run_dir.resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log.info("run folder: %s", self.run_dir)
        self._known_evals: dict[tuple[str, str], dict[str, Any]] = {}  # (label, split) -> result
        if resume and state_path(self.run_dir).is_file():
            self.state = load_state(self.run_dir)
            log.info("resuming %s at stage %s, step %d", self.state.run, self.state.stage, self.state.step)
        else:
            stages = schedule(self.cfg.run.cycles, self.cfg.warmstart.enabled)
            self.state = RunState(self.cfg.run.name, stages)
        atomic_write(self.run_dir / "config.yaml", self.cfg.to_yaml())
        self._stop = threading.Event()
        self._running = threading.Lock()  # held while ``run`` runs the schedule: one at a time
        self._metrics = _Metrics(self.cfg.run.name, self.run_dir / "tb")
        self._live: dict[str, Any] = {}
        self.pool = None
        self.runner = None

    # ---- control -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st = self.state
        return {"run": st.run, "status": st.status, "stage": st.stage, "stage_index": st.stage_index,
                "num_stages": len(st.stages), "step": st.step, "policy_version": st.policy_version,
                "evals": st.evals, "last": st.history[-1] if st.history else {}, "live": dict(self._live),
                "run_dir": str(self.run_dir), "error": st.error, "active": self._running.locked(),
                "faults": list(st.faults),
                "rollout_workers": self.pool.num_workers if self.pool is not None else 0}

    def request_stop(self) -> None:
        """Finish the current step, save, and return from ``run`` (the run stays resumable)."""
        log.info("stop requested")
        self._stop.set()

    def scale_rollout(self, num_workers: int) -> int:
        if self.pool is None:
            raise RuntimeError("the rollout pool is not started yet")
        self.pool.scale(num_workers)
        self._metrics.set("rollout_workers", self.pool.num_workers)
        return self.pool.num_workers

    # ---- the schedule ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the schedule from ``state`` to its end (or a stop request). One at a time: a second
        call while one runs raises ``RunAlreadyRunning``; a call after a stopped run starts afresh."""
        if not self._running.acquire(blocking=False):
            raise RunAlreadyRunning(already_running_message(self.cfg.run.name))
        try:
            self._stop.clear()  # a stop asked of the previous run() must not end this one
            return self._run_schedule()
        finally:
            self._running.release()

    def _run_schedule(self) -> dict[str, Any]:
        st = self.state
        if st.finished:
            return self.status()
        st.status, st.error = "running", ""
        self._save()
        try:
            self._setup()
            while not st.finished:
                if self._stop.is_set():
                    st.status = "stopped"
                    break
                stage = st.stage
                self._metrics.stage(stage, st.stage_index, st.step)
                self._live = {"stage": stage}
                t0 = time.time()
                try:
                    policy, version = self._run_stage(stage)
                    interrupted = (self._stop.is_set() and stage.startswith("grpo/")
                                   and st.step < self.cfg.grpo.steps_per_round)
                except RoundStopped:  # an OPSD round abandoned between steps: it reruns on resume
                    interrupted = True
                if interrupted:
                    st.timings[stage] = st.timings.get(stage, 0.0) + time.time() - t0
                    st.status = "stopped"
                    break
                st.finish_stage(time.time() - t0, policy=policy, policy_version=version)
                self._save()
                log.info("stage %s done in %.0f s", stage, st.timings[stage])
            else:
                st.status = "done"
        except Exception as e:  # recorded, then re-raised so the job fails visibly
            st.status = "failed"
            st.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            log.error("run failed in stage %s: %s", st.stage, e)
            raise
        finally:
            self._save()
            if st.status in ("done", "failed", "stopped"):
                self._write_report()
            self._teardown()
        return self.status()

    def _run_stage(self, stage: str) -> tuple[str | None, int | None]:
        if stage == "warmstart":
            return self._warmstart()
        if stage.startswith("eval/"):
            self._evaluate(stage.split("/", 1)[1])
            return None, None
        if stage.startswith("grpo/"):
            self._grpo_round(int(stage.split("/")[1]))
            return None, None
        if stage.startswith("opsd/"):
            return self._opsd_round(int(stage.split("/")[1]))
        if stage == "report":
            self._write_report()
            return None, None
        raise ValueError(f"unknown stage {stage!r}")

    # ---- setup -----------------------------------------------------------------------------
    def _setup(self) -> None:
        from transformers import AutoTokenizer

        from actors.retriever import start_retriever
        from actors.rollout_worker import RolloutPool
        from searche1_ray.data.prepare import prepare_data, read_splits
        from searche1_ray.model_store import resolve_model

        cfg, st = self.cfg, self.state
        self._live = {"stage": "setup"}
        self.data = prepare_data(cfg)
        self.questions = read_splits(cfg, self.data)
        if cfg.grpo.stratify_by and "train" in self.questions:
            strata(self.questions["train"], cfg.grpo.stratify_by)  # a missing field fails now, not after the warm start

        def policy_and_pool() -> None:
            # the first run converts the GGUF (~30 s) and the engines start (~25 s) while the
            # index is built and Serve starts: the workers find the app by name at their first search
            if not st.policy:
                st.policy = resolve_model(cfg.model.name, cfg.model.cache_dir, cfg.model.dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(st.policy)
            # a resumed run's policy keeps its version: the rollouts say which policy made them
            self.pool = RolloutPool(cfg, st.policy, cfg.retriever.app_name, version=st.policy_version)
            self._metrics.set("rollout_workers", self.pool.num_workers)

        index_dir = cfg.retriever.index_dir or str(self.data.dir / f"index-{cfg.retriever.encoder}-{cfg.retriever.index_type}")
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="setup") as ex:  # exit waits for it
            policy = ex.submit(policy_and_pool)
            _handle, url = start_retriever(cfg, str(self.data.corpus), index_dir)  # the pool finds it by name
        policy.result()
        self._save()
        self._live["retriever_url"] = url
        log.info("retriever at %s", url)

    def _teardown(self) -> None:
        if self.state.status == "done":  # a stopped or failed run keeps it for its resume
            from actors.retriever import stop_retriever
            try:
                stop_retriever(self.cfg.retriever)
            except Exception as e:  # best effort
                log.warning("could not delete the retriever app: %s", e)
        for name in ("runner", "pool"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.stop() if name == "runner" else obj.shutdown()
                except Exception as e:  # best effort
                    log.warning("could not stop the %s: %s", name, e)
                setattr(self, name, None)

    def _save(self) -> None:
        save_state(self.run_dir, self.state)

    def _write_report(self) -> Path:
        from searche1_ray.report import write_report

        return write_report(self.state, self.run_dir)

    # ---- policy bookkeeping ---------------------------------------------------------------
    def _ckpt_dir(self) -> Path:
        d = self.run_dir / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _prune(self, keep: str) -> None:
        """Delete intermediate GRPO step checkpoints other than ``keep`` (stage results stay).
        Called only after a durable state.json names ``keep``, so a crash at any point leaves
        state.json pointing at a complete checkpoint."""
        # the round's starting policy stays too: a resume mid-round reloads it as the KL reference
        for p in self._ckpt_dir().glob("grpo*-step*"):
            if str(p) not in (keep, self.state.round_start_policy) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def _runner_dir(folder: Path) -> Path:
        """A round's TrainRunner folder, rid of Ray Train checkpoint copies a killed driver's
        runner left (a runner deletes its own when it stops). Safe: ``run`` is one schedule at a
        time, so no other runner of this run writes there."""
        shutil.rmtree(folder / "ray_train", ignore_errors=True)
        return folder

    def _sync_pool(self, weights: Any, version: int) -> float:
        t0 = time.time()
        self.pool.update_weights(weights, version)
        return time.time() - t0

    def _load_policy_into_pool(self, folder: str, version: int) -> float:
        from safetensors.torch import load_file

        t0 = time.time()
        weights = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            weights.update(load_file(str(f)))
        self.pool.update_weights(ray.put(weights), version)
        return time.time() - t0

    # ---- stages ------------------------------------------------------------------------------
    def _warmstart(self) -> tuple[str, int]:
        from searche1_ray.training.warmstart import run_warmstart

        out = self._ckpt_dir() / "warmstart"
        self._live["detail"] = "warm start (SFT on oracle trajectories)"
        folder, metrics = run_warmstart(self.cfg, self.state.policy, str(out), self.data)
        self.state.history.append({"key": "warmstart", "stage": "warmstart", **metrics})
        version = self.state.policy_version + 1
        self._load_policy_into_pool(folder, version)
        return folder, version

    def _eval_path(self, label: str, split: str) -> Path:
        """Where the evaluation of policy ``label`` on ``split`` writes its per-question Parquet."""
        return self.run_dir / "eval" / label / f"{split}.parquet"

    def _evaluate(self, label: str) -> None:
        from searche1_ray.evaluation import evaluate_split

        cfg = self.cfg
        results = {}
        for split in cfg.eval.splits:
            qs = self.questions.get(split)
            if not qs:
                continue
            # eval.limit: the first N of each data source (the merged test parquet holds seven)
            qs = eval_questions(qs, cfg.eval.limit, cfg.data.max_eval_questions)
            self._live["detail"] = f"evaluating {label} on {split} ({len(qs)} questions)"
            out = self._eval_path(label, split)
            known = self._known_evals.pop((label, split), None)
            if known and known.get("n") == len(qs) and Path(known.get("path", "")).is_file():
                atomic_write_with(out, lambda tmp: shutil.copyfile(known["path"], tmp))  # same policy, questions, greedy
                results[split] = {k: v for k, v in known.items() if k != "path"}
                log.info("eval %s %s: the OPSD round's validation of this policy, reused", label, split)
            else:
                results[split] = evaluate_split(self.pool, qs, out, temperature=cfg.eval.temperature)
            self._metrics.set("eval_em", results[split]["em"])
            r = results[split]
            avg = f", Avg. over {len(r['by_type'])} types/datasets {r['avg']:.3f}" if "avg" in r else ""
            log.info("eval %s %s: EM %.3f%s (%d questions, %.2f searches)", label, split, r["em"], avg,
                     r["n"], r["num_searches"])
        self.state.evals[label] = results
        for split, r in results.items():
            self._metrics.tb.add_scalar(f"eval/em_{split}", r["em"], self.state.policy_version)

    def _step_questions(self, cycle: int, step: int) -> list[dict]:
        train = self.questions["train"]
        if self.cfg.data.max_train_questions:
            train = train[: self.cfg.data.max_train_questions]
        return step_questions(train, self.cfg.grpo.questions_per_step, f"{self.cfg.run.seed}-grpo-{cycle}-{step}",
                              self.cfg.grpo.stratify_by)

    def _grpo_round(self, cycle: int) -> None:
        """The round's steps; when its train workers fail (a rank's error, a rank that died) new
        ones start from the last step checkpoint, up to ``train.max_failures`` times: the steps
        after that checkpoint rerun (their rollouts are redrawn) and the pool gets its weights back."""
        self._with_train_restarts(f"GRPO cycle {cycle}", lambda: self._grpo_steps(cycle))

    def _with_train_restarts(self, what: str, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, rerun when its train workers fail (``TrainWorkerError``), at most
        ``train.max_failures`` times. Before a rerun the fault is recorded in the run state and the
        pool is given back the weights of ``state.policy`` (the last checkpoint: steps after it, or
        an OPSD round's validation weights, may have reached the engines). Past the limit the error
        names the limit and the resume command."""
        from searche1_ray.training.runner import TrainWorkerError

        st, limit = self.state, self.cfg.train.max_failures
        failures = 0
        while True:
            try:
                return attempt()
            except TrainWorkerError as e:
                failures += 1
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if failures > limit:
                    raise TrainWorkerError(
                        f"{what}: the train workers failed {failures} time(s), more than "
                        f"train.max_failures={limit}; the run can be resumed from stage {st.stage} step {st.step} "
                        f"(python -m jobs.train --resume {st.run}). Last failure: {e}") from e
                st.faults.append({"stage": st.stage, "restart_step": st.step, "error": first_line[:500],
                                  "time": time.time()})
                self._save()
                log.warning("%s: train workers failed (%s); restart %d of %d from step %d (%s)",
                            what, first_line, failures, limit, st.step, st.policy)
                self._live["restarts"] = failures
                self._load_policy_into_pool(st.policy, st.policy_version)

    def _grpo_steps(self, cycle: int) -> None:
        from searche1_ray.grpo_round import grpo_step
        from searche1_ray.training.runner import TrainRunner
        from searche1_ray.training.tasks import GRPOTask

        cfg, st = self.cfg, self.state
        steps = cfg.grpo.steps_per_round
        if st.step >= steps:
            return
        if st.step == 0 or not st.round_start_policy:
            st.round_start_policy = st.policy
            self._save()
        # resumed mid-round, the trainer starts from the last step's checkpoint, but the KL
        # reference stays the policy the round started from (as in an uninterrupted round)
        reference = st.round_start_policy if st.round_start_policy != st.policy else None
        self._live["detail"] = "starting the GRPO trainer"
        # ... and the optimizer state and lr schedule continue from that checkpoint's
        resume = st.policy if st.step > 0 else None
        self.runner = TrainRunner(cfg, st.policy, GRPOTask(cfg, reference_path=reference, resume_from=resume),
                                  str(self._runner_dir(self.run_dir / "train" / f"grpo{cycle}")))
        pending: list[tuple[str, dict]] = []
        try:
            for step in range(st.step, steps):
                key = f"grpo/{cycle}/step{step}"
                self._live["detail"] = f"GRPO cycle {cycle} step {step + 1}/{steps}"
                questions = self._step_questions(cycle, step)
                version = st.policy_version + len(pending) + 1
                metrics = grpo_step(cfg, self.pool, self.runner, self.tokenizer, questions,
                                    self.run_dir / "rollouts" / f"grpo{cycle}" / f"step{step:04d}.parquet",
                                    version)
                pending.append((key, metrics))
                self._metrics.set("reward_mean", metrics.get("rollout/reward_mean", 0.0))
                self._metrics.set("tokens_per_s", metrics.get("perf/tokens_per_s", 0.0))
                self._metrics.steps.inc(tags={"run": cfg.run.name})
                self._metrics.scalars(metrics, len(st.history) + len(pending))
                last = step + 1 == steps
                if last or (step + 1) % cfg.grpo.checkpoint_every == 0 or self._stop.is_set():
                    # a step counts as done once the policy it produced is on disk
                    folder = self.runner.save_checkpoint(str(self._ckpt_dir() / f"grpo{cycle}-step{step + 1:04d}"))
                    for k, m in pending:
                        st.record_step(k, m)
                    st.policy, st.policy_version = folder, version
                    pending.clear()
                    self._save()
                    self._metrics.set("step", st.step)
                    self._prune(keep=folder)
                    log.info("GRPO c%d step %d/%d: reward %.3f, loss %.4f, %.1f s", cycle, step + 1, steps,
                             metrics.get("rollout/reward_mean", 0.0), metrics.get("grpo/loss", 0.0),
                             metrics.get("perf/step_s", 0.0))
                if self._stop.is_set():
                    return
        finally:
            self.runner.stop()
            self.runner = None

    def _opsd_round(self, cycle: int) -> tuple[str, int]:
        """One OPSD round; when its train workers fail the round reruns from its start (new pool
        rollouts, pairs, LoRA steps) on the policy it started from, up to ``train.max_failures`` times."""
        return self._with_train_restarts(f"OPSD cycle {cycle}", lambda: self._opsd_round_once(cycle))

    def _opsd_round_once(self, cycle: int) -> tuple[str, int]:
        from searche1_ray.training.opsd_round import run_opsd_round

        cfg, st = self.cfg, self.state
        self._live["detail"] = f"OPSD cycle {cycle}"
        out = self.run_dir / "opsd" / f"c{cycle}"
        self._runner_dir(out / "train")  # run_opsd_round's runner lives there
        train = self.questions["train"]
        if cfg.data.max_train_questions:
            train = train[: cfg.data.max_train_questions]
        dev = eval_questions(self.questions.get("dev", []), cfg.eval.limit, cfg.data.max_eval_questions)
        version = st.policy_version + 1
        # the post-GRPO evaluation measured this policy on these dev questions already
        start = st.evals.get(f"grpo{cycle}", {}).get("dev")
        if start and start.get("n") == len(dev):  # with its parquet, so eval/opsd<c> can reuse it
            start = {**start, "path": str(self._eval_path(f"grpo{cycle}", "dev"))}
        else:
            start = None
        folder, metrics = run_opsd_round(cfg, self.pool, st.policy, train, dev, str(out), version,
                                         start_eval=start, should_stop=self._stop.is_set)
        kept = metrics.pop("opsd/kept_result", None)
        if kept:  # the next policy was measured on these dev questions: eval/opsd<c> reuses it
            self._known_evals[(f"opsd{cycle}", "dev")] = kept
        st.history.append({"key": f"opsd/{cycle}", "stage": f"opsd/{cycle}", **metrics})
        self._metrics.scalars(metrics, len(st.history))
        self._load_policy_into_pool(folder, version)
        return folder, version
