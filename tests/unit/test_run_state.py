"""Run state: schedule order, exactly-once step records, atomic writes, report from state."""

import json

import pytest

from searche1_ray.report import write_report
from searche1_ray.run_state import RunState, load_state, save_state, schedule


def test_schedule_order():
    assert schedule(2, True) == ["eval/base", "warmstart", "eval/warmstart", "grpo/0", "eval/grpo0", "opsd/0", "eval/opsd0",
                                 "grpo/1", "eval/grpo1", "opsd/1", "eval/opsd1", "report"]
    assert schedule(0, False) == ["eval/base", "report"]


def test_steps_and_stages_are_recorded_once(tmp_path):
    st = RunState("r", schedule(1, False))
    st.finish_stage(1.0)
    assert st.stage == "grpo/0"  # no warm start: eval/base, then the first GRPO round
    st.record_step("grpo/0/step0", {"rollout/reward_mean": 0.2}, policy="/p1", policy_version=1)
    with pytest.raises(RuntimeError, match="already recorded"):
        st.record_step("grpo/0/step0", {})
    assert st.step == 1 and st.policy == "/p1" and st.policy_version == 1
    save_state(tmp_path, st)
    again = load_state(tmp_path)
    assert again == st
    assert not list(tmp_path.glob(".state.*"))  # no temp files left behind
    again.finish_stage(2.0)
    assert again.step == 0 and again.stage == "eval/grpo0"
    while not again.finished:
        again.finish_stage(0.5)
    with pytest.raises(RuntimeError, match="no stage left"):
        again.finish_stage(0.1)


def test_load_errors_name_the_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no state.json in"):
        load_state(tmp_path)
    (tmp_path / "state.json").write_text("{oops")
    with pytest.raises(ValueError, match="state.json is not valid JSON"):
        load_state(tmp_path)


def test_report_has_em_table_and_plots(tmp_path):
    st = RunState("r", schedule(1, True))
    st.evals = {"base": {"dev": {"em": 0.1, "num_searches": 1.0, "answered": 0.05}},
                "grpo0": {"dev": {"em": 0.25, "num_searches": 1.5, "answered": 0.9}}}
    st.history = [{"key": f"grpo/0/step{i}", "rollout/reward_mean": 0.1 * i} for i in range(3)]
    st.timings = {"warmstart": 60.0}
    path = write_report(st, tmp_path)
    text = path.read_text()
    assert "| base | 0.100 | 0.050 | 1.00 |" in text and "| grpo0 | 0.250 | 0.900 | 1.50 |" in text
    assert "| warmstart | 60 |" in text
    for png in ("reward.png", "em.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    json.loads(st.to_json())


def _write_eval(run_dir, label, split, ems, types):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = run_dir / "eval" / label / f"{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"question_id": f"q{i}", "em": float(e), "type": t}
                                         for i, (e, t) in enumerate(zip(ems, types))]), str(path))


def test_report_shows_em_per_type_and_the_changes_between_stages(tmp_path):
    st = RunState("r", schedule(1, True))
    types = ["single_hop", "single_hop", "two_hop", "two_hop", "bridge", "bridge"]
    ems = {"base": [0, 0, 0, 0, 0, 0], "warmstart": [1, 0, 1, 0, 0, 0], "grpo0": [1, 1, 0, 1, 1, 0]}
    for label, e in ems.items():
        st.evals[label] = {"dev": {"em": sum(e) / 6, "num_searches": 1.0, "answered": 1.0}}
        _write_eval(tmp_path, label, "dev", e, types)
    st.evals["opsd0"] = {"dev": {"em": 0.5, "num_searches": 1.0, "answered": 1.0}}  # no Parquet: skipped
    st.history = [{"key": "grpo/0/step0", "stage": "grpo/0", "rollout/reward_mean": 0.2},
                  {"key": "grpo/0/step1", "stage": "grpo/0", "rollout/reward_mean": 0.4},
                  {"key": "opsd/0", "stage": "opsd/0", "rollout/reward_mean": 0.6}]
    text = write_report(st, tmp_path).read_text()
    assert "| policy | bridge | single_hop | two_hop | avg | n |" in text
    assert "| warmstart | 0.000 | 0.500 | 0.500 | 0.333 | 6 |" in text
    assert "| grpo0 | 0.500 | 1.000 | 0.500 | 0.667 | 6 |" in text
    # base -> warmstart: 2 up, 0 down; warmstart -> grpo0: q1, q3, q4 up, q2 down
    assert "| base → warmstart | 2 | 0 | 0.5 | bridge 0/0, single_hop 1/0, two_hop 1/0 |" in text
    assert "| warmstart → grpo0 | 3 | 1 | 0.625 | bridge 1/0, single_hop 1/0, two_hop 1/1 |" in text
    assert "opsd0 |" not in text.split("### dev: EM per question type")[1].split("###")[0]
    assert (tmp_path / "reward.png").stat().st_size > 1000


def test_stage_cycle_for_the_dashboard_gauge():
    from actors.driver import stage_cycle
    from searche1_ray.run_state import schedule

    stages = schedule(2, True)
    got = {s: stage_cycle(s) for s in stages}
    assert got["warmstart"] == 0 and got["eval/base"] == 0 and got["report"] == 0
    for c in (0, 1):
        assert got[f"grpo/{c}"] == got[f"eval/grpo{c}"] == got[f"opsd/{c}"] == got[f"eval/opsd{c}"] == c
    assert stage_cycle("grpo/12") == 12
