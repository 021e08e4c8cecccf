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
    "warmstart.num_examples=16", "warmstart.batch_size=8",
    "eval.limit=6", "eval.splits=[dev]",
    "grpo.steps_per_round=3", "grpo.questions_per_step=2", "grpo.checkpoint_every=1",
    "rollout.group_size=2", "rollout.max_turn_tokens=48", "rollout.max_response_tokens=320",
    "rollout.questions_per_batch=8",
    "opsd.samples_per_question=2", "opsd.steps=2", "opsd.eval_every=1", "opsd.batch_size=2",
    "data.max_train_questions=6", "train.max_seq_len=640", "train.micro_batch_size=2",
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
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)


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


def _wait_job(cluster, job_id: str, timeout_s: float = 1200) -> str:
    status = _wait(lambda: (s := _job_status(cluster, job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                   timeout_s, f"job {job_id}", every=5)
    return status


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_job_submit_runs_the_smoke_job_to_a_report(cluster, tmp_path):
    out = tmp_path / "runs"
    _submit(cluster, "smoke-submit", _sets(*TINY, f"run.output_dir={out}", "run.name=submitted"))
    seen: set[str] = set()     # the driver's gauges as Prometheus scrapes them from the node
    stages: set[str] = set()   # stages whose searche1_stage series read 1 (running)

    def done_or_scrape():
        try:
            with urllib.request.urlopen(cluster["metrics"], timeout=5) as r:
                text = r.read().decode()
            seen.update(line.split("{")[0] for line in text.splitlines()
                        if line.startswith("ray_searche1_") and 'run="submitted"' in line)
            stages.update(m.group(1) for m in re.finditer(r'ray_searche1_stage\{[^}]*stage="([^"]+)"[^}]*\} 1\.0', text))
        except OSError:
            pass
        s = _job_status(cluster, "smoke-submit")
        return s in ("SUCCEEDED", "FAILED", "STOPPED") and s

    status = _wait(done_or_scrape, 1200, "job smoke-submit", every=5)
    logs = _job_logs(cluster, "smoke-submit")
    assert status == "SUCCEEDED", logs[-4000:]
    run_dir = out / "submitted"
    state = _state(run_dir)
    assert state["status"] == "done"
    assert [s for s in state["stages"] if s not in state["done"]] == []
    report = (run_dir / "report.md").read_text()
    assert "| base |" in report and "| opsd0 |" in report
    assert f"report: {run_dir / 'report.md'}" in logs
    assert list((run_dir / "rollouts").rglob("*.parquet"))
    # the dashboard / Prometheus gauges were live while it ran, with the stage by name
    assert {"ray_searche1_cycle", "ray_searche1_step", "ray_searche1_stage_index",
            "ray_searche1_rollout_workers"} <= seen, sorted(seen)
    assert "ray_searche1_stage" in seen and stages & {"warmstart", "grpo/0", "opsd/0"}, sorted(stages)


def test_killed_driver_resumes_with_every_step_once(cluster, tmp_path):
    import ray

    out = tmp_path / "runs"
    run_dir = out / "resumed"
    _submit(cluster, "smoke-kill", _sets(*TINY, f"run.output_dir={out}", "run.name=resumed",
                                         "warmstart.enabled=false", "eval.limit=3"))
    _wait(lambda: "grpo/0/step0" in _state(run_dir).get("done", []), 900, "the first GRPO step", every=1)
    ray.init(address=cluster["gcs"], namespace="searche1", log_to_driver=False)
    try:
        ray.kill(ray.get_actor("searche1-driver-resumed", namespace="searche1"))
    finally:
        ray.shutdown()
    assert _wait_job(cluster, "smoke-kill", 300) == "FAILED"
    killed_at = _state(run_dir)
    assert killed_at["status"] == "running"  # killed, not stopped: state.json is what the last step left
    assert "grpo/0/step2" not in killed_at["done"]

    _submit(cluster, "smoke-resume", [f"--resume={run_dir}"])
    status = _wait_job(cluster, "smoke-resume")
    assert status == "SUCCEEDED", _job_logs(cluster, "smoke-resume")[-4000:]
    state = _state(run_dir)
    assert state["status"] == "done"
    assert len(state["done"]) == len(set(state["done"]))
    for step in range(3):
        assert state["done"].count(f"grpo/0/step{step}") == 1
    keys = [h["key"] for h in state["history"] if h["key"].startswith("grpo/")]
    assert keys == [f"grpo/0/step{i}" for i in range(3)]
