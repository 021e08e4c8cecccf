"""A round whose train workers fail restarts within ``train.max_failures``: the driver's
``_with_train_restarts`` (used by the GRPO and the OPSD round) records the fault, gives the pool
the last checkpoint's weights back and reruns; past the limit it fails with the limit and the
resume command in the message. No Ray: the driver class is used as a plain object with its
train work stubbed (the live SIGKILL of a GRPO train rank is in tests/integration/test_main_job.py)."""

import threading

import pytest

from actors.driver import SelfEvolutionDriver
from searche1_ray.config import load_config
from searche1_ray.run_state import RunState, load_state
from searche1_ray.training.runner import TrainWorkerError

Driver = SelfEvolutionDriver.__ray_metadata__.modified_class.__ray_actor_class__  # the plain class


def _driver(tmp_path, max_failures=2):
    d = object.__new__(Driver)
    d.cfg = load_config(None, ["run.name=r", f"train.max_failures={max_failures}"])
    d.run_dir = tmp_path
    d.state = RunState("r", ["grpo/0", "opsd/0", "report"])
    d.state.stage_index = 1  # in opsd/0
    d.state.policy, d.state.policy_version = str(tmp_path / "ckpt-grpo0"), 7
    d._stop, d._running = threading.Event(), threading.Lock()
    d._live, d.pool, d.runner = {}, None, None
    d.loads = []
    d._load_policy_into_pool = lambda folder, version: d.loads.append((folder, version))
    return d


@pytest.mark.faults("train worker failed in an OPSD round")
def test_opsd_round_reruns_after_a_train_worker_failure(tmp_path, record_property):
    d = _driver(tmp_path)
    calls = []

    def once(cycle):
        calls.append(cycle)
        if len(calls) == 1:
            raise TrainWorkerError("rank 1 died: ActorDiedError\nlong traceback")
        return "opsd-policy", 8

    d._opsd_round_once = once
    assert d._opsd_round(0) == ("opsd-policy", 8)
    assert calls == [0, 0]                                       # rerun once, whole round
    assert d.loads == [(str(tmp_path / "ckpt-grpo0"), 7)]        # the round's starting weights back
    assert d._live["restarts"] == 1
    saved = load_state(tmp_path)                                 # the fault is on disk for jobs.status
    assert len(saved.faults) == 1
    f = saved.faults[0]
    assert f["stage"] == "opsd/0" and f["restart_step"] == 0
    assert f["error"] == "rank 1 died: ActorDiedError"          # the first line only
    record_property("injected", 1)


@pytest.mark.faults("train worker failed in an OPSD round")
def test_restarts_are_bounded_by_max_failures(tmp_path, record_property):
    d = _driver(tmp_path, max_failures=2)
    attempts = []

    def always_fails():
        attempts.append(1)
        raise TrainWorkerError(f"rank 0 died ({len(attempts)})")

    with pytest.raises(TrainWorkerError) as e:
        d._with_train_restarts("OPSD cycle 0", always_fails)
    assert len(attempts) == 3                                    # the first try + 2 restarts
    msg = str(e.value)
    assert "OPSD cycle 0: the train workers failed 3 time(s), more than train.max_failures=2" in msg
    assert "python -m jobs.train --resume r" in msg and "rank 0 died (3)" in msg
    assert len(load_state(tmp_path).faults) == 2 and len(d.loads) == 2
    record_property("injected", 3)


def test_no_restart_when_max_failures_is_zero_and_other_errors_pass_through(tmp_path):
    d = _driver(tmp_path, max_failures=0)
    with pytest.raises(TrainWorkerError, match="failed 1 time"):
        d._with_train_restarts("GRPO cycle 0", lambda: (_ for _ in ()).throw(TrainWorkerError("x")))
    assert d.loads == [] and d.state.faults == []

    d = _driver(tmp_path)
    n = []

    def bug():
        n.append(1)
        raise ValueError("a bug, not a worker failure")

    with pytest.raises(ValueError, match="a bug"):
        d._with_train_restarts("GRPO cycle 0", bug)
    assert n == [1] and d.loads == []                            # not retried


def test_grpo_round_uses_the_same_restarts(tmp_path):
    d = _driver(tmp_path)
    d.state.stage_index = 0
    calls = []

    def steps(cycle):
        calls.append(cycle)
        if len(calls) < 3:
            raise TrainWorkerError("collective timed out")

    d._grpo_steps = steps
    d._grpo_round(0)
    assert calls == [0, 0, 0] and len(d.loads) == 2
    assert [f["stage"] for f in d.state.faults] == ["grpo/0", "grpo/0"]
