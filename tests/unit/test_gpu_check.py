"""jobs.gpu_check on a machine without a GPU: its arguments, its dry-run plan, and how it judges a
finished rehearsal run (the GPU parts themselves run only where a GPU exists)."""

import json
import types

import pytest

from jobs import gpu_check


def _args(**kw):
    base = {"model": None, "gpus": None, "out": None, "timeout_min": 20.0, "dry_run": False}
    return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture
def model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return str(tmp_path / "m")


def test_arguments_are_checked_naming_the_flag(tmp_path, model):
    with pytest.raises(gpu_check.CheckError, match=r"--model .*no such folder"):
        gpu_check.check_args(_args(model=str(tmp_path / "none")), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(gpu_check.CheckError, match="no config.json"):
        gpu_check.check_args(_args(model=str(tmp_path / "empty")), 1)
    with pytest.raises(gpu_check.CheckError, match="no CUDA GPU is visible"):
        gpu_check.check_args(_args(model=model), 0)
    with pytest.raises(gpu_check.CheckError, match="--gpus 4 but only 2"):
        gpu_check.check_args(_args(model=model, gpus=4), 2)
    with pytest.raises(gpu_check.CheckError, match="--gpus must be >= 1"):
        gpu_check.check_args(_args(model=model, gpus=0), 2)
    with pytest.raises(gpu_check.CheckError, match="--timeout-min"):
        gpu_check.check_args(_args(model=model, timeout_min=0), 2)
    assert gpu_check.check_args(_args(model=model), 2) == 2
    assert gpu_check.check_args(_args(model=model, dry_run=True), 0) == 1   # a plan needs no GPU


def test_no_gpu_exits_2_with_the_reason(model, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "_visible_gpus", lambda: 0)
    assert gpu_check.main(["--model", model]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_dry_run_prints_a_plan_that_fits(model, capsys, gpus):
    assert gpu_check.main(["--model", model, "--dry-run", "--gpus", str(gpus)]) == 0
    out = capsys.readouterr().out
    assert f"on {gpus} GPU(s)" in out and "nothing was started" in out
    assert f"cluster: {gpus} GPUs" in out and "fits" in out and "does not fit" not in out
    assert "--set train.use_gpu=true" in out and "--set retriever.faiss_gpu=true" in out
    assert "DeepSpeed ZeRO-3, bf16" in out


def _run(tmp_path, status="done", datasets=7, zero="zero_stage: 3", evals=(0, 2)):
    run = tmp_path / "rehearsal"
    run.mkdir()
    (run / "config.yaml").write_text(f"train:\n  {zero}\n  bf16: true\nretriever:\n  faiss_gpu: true\n")
    state = {"status": status, "error": "" if status == "done" else "RuntimeError: boom\nmore",
             "history": [{"stage": "grpo/0", "rollout/reward_mean": 0.4, "grpo/loss": 0.01},
                         {"stage": "opsd/0", "opsd/evals": [{"step": s} for s in evals]}],
             "evals": {"opsd0": {"test": {"by_type": {f"d{i}": 0.1 for i in range(datasets)}, "avg": 0.1}}}}
    (run / "state.json").write_text(json.dumps(state))
    return run


def test_judge_a_finished_run(tmp_path):
    res = gpu_check.judge_run(_run(tmp_path), 1)
    assert all(ok for ok, _ in res.values()), res
    assert set(res) == set(gpu_check.PARTS[1:6])


def test_judge_names_what_failed(tmp_path):
    res = gpu_check.judge_run(_run(tmp_path, status="failed", datasets=3, zero="zero_stage: 2", evals=(0,)), 1)
    assert not res["eval (seven datasets)"][0] and not res["train (ZeRO-3 bf16)"][0]
    assert not res["opsd (validation + merge)"][0] and res["rollout (vLLM CUDA)"][0]
    missing = gpu_check.judge_run(tmp_path / "nothing", 1)
    assert all(not ok and "no run state" in why for ok, why in missing.values())


def test_nccl_is_skipped_on_one_gpu(tmp_path):
    ok, why = gpu_check.nccl_part("m", tmp_path, 1)
    assert ok is None and "2 GPUs" in why
