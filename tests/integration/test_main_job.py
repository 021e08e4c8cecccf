"""The main job as users run it: `ray start --head` on 127.0.0.1, `ray job submit` of the smoke job
with tiny settings, and a resume after the driver actor is killed mid-round."""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    # no warm start (its stage is one call of run_warmstart, which test_opsd runs for real)
    "warmstart.enabled=false", "eval.limit=3", "eval.splits=[dev]",
    "grpo.steps_per_round=2", "grpo.questions_per_step=2", "grpo.checkpoint_every=1",
    "rollout.group_size=2", "rollout.max_turn_tokens=48", "rollout.max_response_tokens=192",
    "rollout.questions_per_batch=8",
    "opsd.samples_per_question=2", "opsd.steps=2", "opsd.eval_every=2", "opsd.batch_size=2",
    "data.max_train_questions=6", "train.max_seq_len=640", "train.micro_batch_size=2",
    "data.world.num_questions=100",  # ~200 passages: the index builds in seconds
]


def _sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in overrides]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout_s: float, what: str, every: float = 2.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, agent, agent_grpc, rt_agent, metrics = (_free_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=8", f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--disable-usage-stats",
         # private ports: another Ray on this host must not hold the agents' default ports
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def dashboard_up():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait(dashboard_up, 120, "the Ray head's dashboard")
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        # SIGINT, as Ctrl-C on `ray start --block`: the head is usually down in ~2 s (SIGTERM took
        # ~34 s) but once sat for 60 s after the jobs ran, so SIGKILL the session after 15 s
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the head's session is left
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _submit(cluster, job_id: str, args: list[str]) -> None:
    runtime_env = json.dumps({"excludes": ["runs/", ".git/", ".hypothesis/", ".pytest_cache/"]})
    cmd = ["ray", "job", "submit", "--address", cluster["dashboard"], "--submission-id", job_id,
           "--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--no-wait", "--",
           sys.executable, "-m", "jobs.train", "--config", "configs/smoke.yaml", *args]
    deadline = time.time() + 180
    while True:  # the head's job agent comes up a little after the dashboard answers
        out = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=180)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout + out.stderr


def _job_status(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster["dashboard"]).get_job_status(job_id).value)


def _job_logs(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["dashboard"]).get_job_logs(job_id)


def _wait_job(cluster, job_id: str, timeout_s: float = 1200, every: float = 5, on_poll=None) -> str:
    """The job's terminal status; ``on_poll()`` runs before each status check."""
    def done():
        if on_poll is not None:
            on_poll()
        s = _job_status(cluster, job_id)
        return s in ("SUCCEEDED", "FAILED", "STOPPED") and s

    return _wait(done, timeout_s, f"job {job_id}", every=every)


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _scrape(cluster, run: str, seen: set[str], stages: set[str]) -> None:
    """Collect the driver's gauges for ``run`` from the head's Prometheus endpoint: the series
    names in ``seen``, the stage names whose ``searche1_stage`` series read 1 (running) in ``stages``."""
    try:
        with urllib.request.urlopen(cluster["metrics"], timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return
    for name, labels, value in re.findall(r"^(ray_searche1_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if tags.get("run") != run:
            continue
        seen.add(name)
        if name == "ray_searche1_stage" and float(value) == 1.0:
            stages.add(tags["stage"])


def _train_worker_pids(cluster) -> list[int]:
    """PIDs of the live Ray Train worker actors on the cluster."""
    from ray.util.state import list_actors

    try:
        actors = list_actors(address=cluster["dashboard"], filters=[("state", "=", "ALIVE")], limit=1000)
    except Exception:  # the state API may be briefly unavailable
        return []
    return [a.pid for a in actors if "TrainWorker" in (a.class_name or "") and a.pid]


@pytest.mark.faults("driver killed mid-round, train worker SIGKILLed after the resume")
def test_job_submit_kill_the_driver_resume_to_a_report(cluster, tmp_path, record_property):
    """One tiny smoke run as users run it: `ray job submit`; the driver actor is killed after the
    first GRPO step (the job fails, state.json keeps what was done); `--resume` in a second job,
    in which a train worker of the round is SIGKILLed (the round restarts its trainer from the
    last step checkpoint), finishes it with every step done exactly once, the report written and
    the gauges live in Prometheus while it ran. (One run for all three checks: CI time.)"""
    import ray

    out = tmp_path / "runs"
    run_dir = out / "resumed"
    _submit(cluster, "smoke-kill", _sets(*TINY, f"run.output_dir={out}", "run.name=resumed"))
    seen: set[str] = set()
    stages: set[str] = set()

    def first_step_done():
        _scrape(cluster, "resumed", seen, stages)
        if _job_status(cluster, "smoke-kill") in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError("the job ended before its first GRPO step:\n"
                                 + _job_logs(cluster, "smoke-kill")[-4000:])
        return "grpo/0/step0" in _state(run_dir).get("done", [])

    _wait(first_step_done, 900, "the first GRPO step", every=1)
    ray.init(address=cluster["gcs"], namespace="searche1", log_to_driver=False)
    try:
        ray.kill(ray.get_actor("searche1-driver-resumed", namespace="searche1"))
    finally:
        ray.shutdown()
    assert _wait_job(cluster, "smoke-kill", 300) == "FAILED"
    killed_at = _state(run_dir)
    assert killed_at["status"] == "running"  # killed, not stopped: state.json is what the last step left
    assert "eval/base" in killed_at["done"] and "grpo/0/step1" not in killed_at["done"]

    before = _train_worker_pids(cluster)   # the killed driver's runner, if its workers linger
    _submit(cluster, "smoke-resume", [f"--resume={run_dir}"])
    killed: list[int] = []

    def in_step() -> bool:
        """The resumed driver is inside a GRPO step: its trainer is up (a rank killed while Ray
        Train still starts the group is replaced by Ray Train itself, unseen by the round)."""
        try:
            live = ray.get(ray.get_actor("searche1-driver-resumed", namespace="searche1").status.remote(),
                           timeout=10)["live"]
        except Exception:  # not created yet
            return False
        return "GRPO cycle 0 step" in live.get("detail", "")

    def poll():
        _scrape(cluster, "resumed", seen, stages)
        if not killed and in_step():  # SIGKILL a rank of the resumed round's trainer once (train.max_failures)
            pids = [p for p in _train_worker_pids(cluster) if p not in before]
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                print(f"\nSIGKILL train worker {pids[0]} at {time.strftime('%H:%M:%S')}; state done: "
                      f"{_state(run_dir).get('done')}", flush=True)

    ray.init(address=cluster["gcs"], namespace="searche1", log_to_driver=False)
    try:
        status = _wait_job(cluster, "smoke-resume", 1200, every=3, on_poll=poll)
    finally:
        ray.shutdown()
    logs = _job_logs(cluster, "smoke-resume")
    assert status == "SUCCEEDED", logs[-4000:]
    state = _state(run_dir)
    assert state["status"] == "done"
    assert [s for s in state["stages"] if s not in state["done"]] == []
    assert len(state["done"]) == len(set(state["done"]))
    for step in range(2):
        assert state["done"].count(f"grpo/0/step{step}") == 1
    keys = [h["key"] for h in state["history"] if h["key"].startswith("grpo/")]
    assert keys == [f"grpo/0/step{i}" for i in range(2)]
    # the killed rank cost a restart of the round's trainer from its last checkpoint, not the run
    record_property("injected", 1 + len(killed))   # the driver, then a train rank
    assert killed, "no train worker of the resumed round was seen to kill"
    assert [f["stage"] for f in state["faults"]] == ["grpo/0"], (state["faults"], logs[-6000:])
    report = (run_dir / "report.md").read_text()
    for row in ("| base |", "| grpo0 |", "| opsd0 |"):
        assert row in report, (row, report)
    assert f"report: {run_dir / 'report.md'}" in logs
    assert f"run folder: {run_dir}" in logs
    assert not list(run_dir.rglob("*.tmp"))  # no partial checkpoint or file left
    assert list((run_dir / "rollouts").rglob("*.parquet"))
    # the dashboard / Prometheus gauges were live while it ran, with the stage by name
    assert {"ray_searche1_cycle", "ray_searche1_step", "ray_searche1_stage_index",
            "ray_searche1_rollout_workers", "ray_searche1_stage"} <= seen, sorted(seen)
    assert stages & {"grpo/0", "opsd/0"}, sorted(stages)
