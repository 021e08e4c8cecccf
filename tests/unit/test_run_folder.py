"""Where a run's folder is: a relative run.output_dir resolves against the current directory,
except inside a Ray job's working-dir package (deleted with the Ray session), where it lands under
~/searche1-ray; runs are found by name in either place."""

from pathlib import Path

import pytest

import jobs.status as status
import jobs.train as train
from searche1_ray.config import load_config
from searche1_ray.run_folder import find_run_dir, in_ray_package, resolve_output_dir
from searche1_ray.run_state import RunState, save_state

PKG = "/tmp/ray/session_2026-12-07/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_relative_output_dirs_leave_the_ray_package(home):
    assert in_ray_package(PKG) and in_ray_package(PKG + "/sub") and not in_ray_package("/work/checkout")
    assert resolve_output_dir("runs", PKG) == home / "searche1-ray" / "runs"
    assert resolve_output_dir("out/../runs", PKG + "/jobs") == home / "searche1-ray" / "runs"
    assert resolve_output_dir("runs", "/work/checkout") == Path("/work/checkout/runs")
    assert resolve_output_dir("/data/runs", PKG) == Path("/data/runs")      # absolute: as given
    assert resolve_output_dir("~/r", PKG) == home / "r"


def test_a_job_started_in_a_ray_package_writes_its_run_under_home(home, tmp_path, monkeypatch):
    pkg = tmp_path / "working_dir_files" / "_ray_pkg_feed"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    cfg = train.load_run_config(train.parse_args(["--name", "r1"]))
    assert cfg.run_dir == home / "searche1-ray" / "runs" / "r1"
    assert cfg.run.output_dir == str(home / "searche1-ray" / "runs")  # absolute for the driver actor


def test_status_and_resume_find_a_run_a_ray_job_wrote(home, tmp_path, monkeypatch, capsys):
    job_run = home / "searche1-ray" / "runs" / "r1"
    save_state(job_run, RunState("r1", ["eval/base", "report"]))
    (job_run / "config.yaml").write_text(load_config(None, ["run.name=r1"]).to_yaml())
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)  # a later command, from the user's checkout
    assert find_run_dir("r1", "runs", "state.json") == job_run
    assert status.main(["r1"]) == 0 and "run r1: created" in capsys.readouterr().out
    cfg = train.load_run_config(train.parse_args(["--resume", "r1"]))
    assert cfg.run_dir == job_run
    # a run in the checkout's runs/ comes first
    local = checkout / "runs" / "r1"
    save_state(local, RunState("r1", ["report"]))
    assert find_run_dir("r1", "runs", "state.json") == local
    with pytest.raises(FileNotFoundError, match=r"run 'nope': no state.json in .*checkout/nope or "
                                                r".*checkout/runs/nope or .*searche1-ray/runs/nope"):
        find_run_dir("nope", "runs", "state.json")


def test_a_new_run_into_a_folder_that_holds_one_is_refused_unless_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train.load_run_config(train.parse_args(["--name", "r2"]))        # a fresh folder: fine
    st = RunState("r2", ["warmstart", "grpo/0", "report"], stage_index=1, step=3, status="stopped")
    save_state(cfg.run_dir, st)
    with pytest.raises(SystemExit, match=r"already holds run 'r2' \(status stopped, at stage grpo/0\)\. "
                                         r"Continue it with `python -m jobs.train --resume r2`.*--overwrite"):
        train.load_run_config(train.parse_args(["--name", "r2"]))
    assert train.load_run_config(train.parse_args(["--name", "r2", "--overwrite"])).run_dir == cfg.run_dir
    assert train.load_run_config(train.parse_args(["--name", "r2", "--dry-run"])).run_dir == cfg.run_dir
