"""One schedule per run: the driver's ``run()`` refuses re-entry, a fresh ``run()`` clears an old
stop request, and ``jobs.train`` refuses to start a second schedule or to resume with changed --set
values. No Ray: the driver class is used as a plain object, with its stages stubbed."""

import threading

import pytest

import jobs.train as train
from actors.driver import RunAlreadyRunning, SelfEvolutionDriver, driver_name
from searche1_ray.config import ConfigError, load_config
from searche1_ray.run_state import RunState, load_state

Driver = SelfEvolutionDriver.__ray_metadata__.modified_class.__ray_actor_class__  # the plain class


class _NoMetrics:
    def stage(self, *a):
        pass

    def set(self, *a):
        pass


def _driver(tmp_path, run_stage):
    """A driver over a two-stage schedule whose stages call ``run_stage(stage)``."""
    d = object.__new__(Driver)
    d.cfg = load_config(None, ["run.name=r"])
    d.run_dir = tmp_path
    d.state = RunState("r", ["eval/base", "report"])
    d._stop, d._running = threading.Event(), threading.Lock()
    d._metrics, d._live, d.pool, d.runner = _NoMetrics(), {}, None, None
    d._setup = lambda: None
    d._write_report = lambda: None
    d._run_stage = lambda stage: (run_stage(stage), (None, None))[1]
    return d


@pytest.mark.faults("two schedules on one driver")
def test_a_second_run_on_a_running_driver_is_refused(tmp_path):
    entered, release = threading.Event(), threading.Event()

    def stage(_):
        entered.set()
        assert release.wait(10)

    d = _driver(tmp_path, stage)
    first = {}
    t = threading.Thread(target=lambda: first.update(d.run()))
    t.start()
    assert entered.wait(10)
    assert d.status()["active"] is True
    with pytest.raises(RunAlreadyRunning, match=f"run r is already running in driver {driver_name('r')}"
                                                r".*python -m jobs.status r"):
        d.run()
    release.set()
    t.join(10)
    assert first["status"] == "done" and d.state.done == ["eval/base", "report"]  # each stage once
    assert d.status()["active"] is False


@pytest.mark.faults("resume after a stop")
def test_a_resume_after_a_stop_runs_instead_of_stopping_at_once(tmp_path):
    d = _driver(tmp_path, lambda stage: None)
    d.request_stop()  # asked of the previous run(), which has returned
    assert d.run()["status"] == "done"
    assert load_state(tmp_path).status == "done"


def _saved_run(tmp_path, *overrides):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(load_config(None, ["run.name=r", *overrides]).to_yaml())
    return run_dir


def test_resume_refuses_set_values_that_differ_from_the_saved_config(tmp_path):
    run_dir = _saved_run(tmp_path, "grpo.lr=1e-6")
    args = train.parse_args(["--resume", str(run_dir), "--set", "grpo.lr=2e-6", "--set", "run.cycles=3"])
    with pytest.raises(ConfigError, match=r"run\.cycles \(saved 1, --set 3\), grpo\.lr \(saved 1e-06, "
                                          r"--set 2e-06\).*start a new run with --name"):
        train.load_run_config(args)
    # the saved values again, or where the run is hosted: fine
    cfg = train.load_run_config(train.parse_args(["--resume", str(run_dir), "--set", "grpo.lr=1e-6",
                                                  "--set", "run.num_cpus=3"]))
    assert cfg.grpo.lr == 1e-6 and cfg.run.num_cpus == 3 and cfg.run_dir == run_dir


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _LiveDriver:
    """A handle to a driver whose schedule runs: ``status`` says active; ``run`` must not be called."""

    def __init__(self):
        self.status = _Remote(lambda: {"active": True})
        self.run = _Remote(lambda: pytest.fail("train started a second schedule"))


@pytest.mark.faults("two schedules on one driver")
def test_train_refuses_to_attach_a_second_schedule_to_a_running_driver(tmp_path, monkeypatch, capsys):
    import ray

    run_dir = _saved_run(tmp_path)
    killed = []
    monkeypatch.setattr(train, "init_ray", lambda cfg, address: "")
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace=None: _LiveDriver())
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(ray, "kill", killed.append)
    assert train.main(["--resume", str(run_dir), "--quiet"]) == 1
    assert "run r is already running in driver searche1-driver-r" in capsys.readouterr().err
    assert killed == []  # the other job's driver is left alone
