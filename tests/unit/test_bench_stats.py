"""bench.grpo_learning.sign_test against the definition, by enumerating every outcome."""

import itertools

import pytest

from bench.grpo_learning import sign_test


def _enumerated(up: int, down: int) -> float:
    """P(min(#up, #down) <= the observed min) over all 2^n equally likely up/down sequences."""
    n = up + down
    if n == 0:
        return 1.0
    lo = min(up, down)
    hits = sum(1 for seq in itertools.product((0, 1), repeat=n) if min(sum(seq), n - sum(seq)) <= lo)
    return hits / 2 ** n


@pytest.mark.parametrize("up,down", [(0, 0), (1, 0), (3, 3), (9, 4), (4, 9), (10, 0), (7, 5), (11, 1)])
def test_sign_test_matches_enumeration(up, down):
    assert sign_test(up, down) == pytest.approx(_enumerated(up, down), abs=1e-12)


def test_sign_test_known_values():
    assert sign_test(9, 4) == pytest.approx(0.2668, abs=1e-4)      # session 4's bench run
    assert sign_test(22, 26) == pytest.approx(0.6655, abs=1e-4)
    assert sign_test(15, 2) < 0.01


def test_ablation_arm_keys_ignore_operational_settings():
    """An arm folder is reused by a run whose arm would sample and train the same: timeouts,
    the rollout schedule and checkpoint contents do not change its key; a learning setting does."""
    from bench.ablation import _draw_cfg, arm_key, parse_args

    def key(name, *sets):
        args = parse_args(["--draws", "1", *[x for s in sets for x in ("--set", s)]])
        return arm_key(_draw_cfg(args, 0), args, name)

    for arm in ("G", "G+O", "G+G"):
        assert key(arm) == key(arm, "rollout.batch_timeout_s=60", "retriever.call_timeout_s=5",
                               "train.command_timeout_s=10", "grpo.save_optimizer=false",
                               "rollout.loop=rounds", "train.max_failures=0", "train.gpus_per_worker=0.5",
                               "retriever.replace_app=true")
        assert key(arm) != key(arm, "grpo.lr=1e-3")
    assert key("G") == key("G", "opsd.lr=1e-3") != key("G+O", "opsd.lr=1e-3")


def test_ablation_searches_by_type():
    from bench.ablation import searches_by_type

    rows = [{"question_id": "a", "num_searches": 2}, {"question_id": "b", "num_searches": 1},
            {"question_id": "c", "num_searches": 0}, {"question_id": "d", "num_searches": 3}]
    types = {"a": "two_hop", "b": "single_hop", "c": "single_hop", "d": "two_hop"}
    assert searches_by_type(rows, types) == {"two_hop": 2.5, "single_hop": 0.5, "overall": 1.5}


def test_ablation_opsd_pool_is_shared_by_opsd_training_levers_only(tmp_path):
    """G+O runs that differ only in how OPSD trains reuse one pool of G's rollouts (paired lever
    sweeps); anything that changes the pool — its size, K, the dev questions, G itself — does not."""
    from bench.ablation import _draw_cfg, parse_args, pool_dir

    def where(*argv, d=0):
        args = parse_args(["--draws", "1", *argv])
        return pool_dir(tmp_path, _draw_cfg(args, d), args, d)

    base = where()
    assert base.parent == tmp_path / "draw0" and base.name.startswith("pool-")
    assert base == where("--set", "opsd.lr=3e-4", "--set", "opsd.steps=4", "--set", "opsd.action_weight=10",
                         "--set", "opsd.teacher_reference=policy_text")
    for other in (["--set", "opsd.questions_per_round=48"], ["--set", "opsd.samples_per_question=3"],
                  ["--dev", "60"], ["--set", "grpo.lr=3e-5"], ["--grpo-steps", "2"]):
        assert where(*other) != base, other
    assert where(d=1).parent == tmp_path / "draw1" and where(d=1).name != base.name  # G differs by draw


def test_ablation_report_counts_answers_named_before_searching():
    from bench.ablation import _guessed

    q = "Which singer recorded the album The Pilgrim of Raven?"
    guess = {"question": q, "answer": "Tina Turner", "em": 0.0,
             "response": "<think>Tina Turner sang it.</think><search> The Pilgrim of Raven </search>"}
    found = {**guess, "response": "<think>Search it.</think><search> The Pilgrim of Raven </search>"
                                  "<information>Tina Turner</information><answer> Tina Turner </answer>"}
    assert _guessed(guess) and not _guessed(found)


def _write_eval(folder, em_by_qid):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question_id": q, "question": f"q {q}?", "em": float(e), "answer": "x" if e else "y",
             "num_searches": 2, "response": "<search> q </search><answer> x </answer>"}
            for q, e in em_by_qid.items()]
    pq.write_table(pa.Table.from_pylist(rows), str(folder / "eval.parquet"))


def _write_arm(folder, name, em_by_qid, draw):
    import json

    folder.mkdir(parents=True)
    _write_eval(folder, em_by_qid)
    rec = {"arm": name, "draw": draw, "em": sum(em_by_qid.values()) / len(em_by_qid), "n": len(em_by_qid),
           "num_searches": 2.0, "train_s": 1.0, "eval_s": 1.0, "rollouts": 40}
    (folder / "arm.json").write_text(json.dumps(rec))


def test_ablation_pools_draws_from_archives_of_other_runs(tmp_path):
    """Draw 0 finished here, draw 1 in an archive of another session's run (with its own warm
    start): the report pools both draws' paired changes, each against its own warm start, and an
    --archive of the pooled run reads back to the same report."""
    from bench.ablation import _draw_cfg, archive, arm_dir, build_report, make_locate, parse_args

    test = [{"id": f"q{i}", "metadata": {"type": "single_hop" if i % 2 else "two_hop"}} for i in range(8)]
    out, other = tmp_path / "run", tmp_path / "other"
    # draw 0 (here): warm right on q0-q3, G right on q0-q5 -> 2 up, 0 down
    # draw 1 (archive): warm right on q0-q5, G right on q2-q6 -> 1 up (q6), 2 down (q0, q1)
    ems = {0: ({f"q{i}": i < 4 for i in range(8)}, {f"q{i}": i < 6 for i in range(8)}),
           1: ({f"q{i}": i < 6 for i in range(8)}, {f"q{i}": 2 <= i < 7 for i in range(8)})}
    args = parse_args(["--draws", "2", "--include", str(tmp_path)])  # a folder with no arms: ignored
    args.include.append(str(other))
    for d, root in ((0, out), (1, other)):
        warm, g = ems[d]
        _write_arm(arm_dir(root, _draw_cfg(args, d), args, d, "warm start"), "warm start", warm, d)
        _write_arm(arm_dir(root, _draw_cfg(args, d), args, d, "G"), "G", g, d)
    out.mkdir(exist_ok=True)
    locate = make_locate(args, _draw_cfg(args), out)
    assert locate(1, "G").parent == other / "draw1" and locate(0, "G").parent == out / "draw0"
    lines, figures = build_report(locate, test, [0, 1], out)
    row = next(line for line in lines if line.startswith("| G vs warm start |"))
    assert row.startswith("| G vs warm start | 3 | 2 | 1 |"), row
    # grpo_gain = the mean over draws of the type-averaged EM gap, each draw against its own warm start
    def avg(em):
        single = [v for q, v in em.items() if int(q[1:]) % 2]
        two = [v for q, v in em.items() if not int(q[1:]) % 2]
        return (sum(single) / len(single) + sum(two) / len(two)) / 2
    expected = sum(100 * (avg(ems[d][1]) - avg(ems[d][0])) for d in (0, 1)) / 2
    assert figures["grpo_gain"] == pytest.approx(expected)
    assert "| warm start | " in "\n".join(lines)

    dest = tmp_path / "archive"
    assert archive(locate, [0, 1], dest) == 4
    assert sorted(p.relative_to(dest).parts[0] for p in dest.glob("draw*/*/arm.json")) == ["draw0", "draw0",
                                                                                          "draw1", "draw1"]
    only = parse_args(["--draws", "2", "--include", str(dest)])
    again, figures2 = build_report(make_locate(only, _draw_cfg(only), tmp_path / "empty"), test, [0, 1], out)
    assert figures2["grpo_gain"] == figures["grpo_gain"] and [x for x in again if "|" in x] == [x for x in lines if "|" in x]


def test_ablation_arguments_name_the_bad_value(capsys, tmp_path):
    from bench.ablation import parse_args

    for argv, what in ((["--first-draw", "-1"], "--first-draw must be >= 0"),
                       (["--include", str(tmp_path / "nope")], "--include")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert what in capsys.readouterr().err


def test_ablation_scores_the_warm_start_once_and_records_it_in_every_draw(tmp_path, monkeypatch):
    import json

    from bench.ablation import Ablation, _draw_cfg, arm_dir, parse_args

    args = parse_args(["--draws", "2", "--eval", "2"])
    cfg = _draw_cfg(args)
    test = [{"id": "q0"}, {"id": "q1"}]
    calls = []

    def fake_eval(self, where, label):
        calls.append(where)
        _write_eval(where, {"q0": 1, "q1": 0})
        return {"seconds": 3.0, "em": 0.5, "n": 2}

    monkeypatch.setattr(Ablation, "_eval", fake_eval)
    monkeypatch.setattr(Ablation, "_serve", lambda self, policy: None)
    ab = Ablation(args, cfg, tmp_path / "run", [], [], test, pool=None, warm="/warm")
    for d in (0, 1):
        assert ab.warm_arm(d)["em"] == 0.5
    assert len(calls) == 1
    for d in (0, 1):
        where = arm_dir(tmp_path / "run", cfg, args, d, "warm start")
        assert json.loads((where / "arm.json").read_text())["draw"] == d and (where / "eval.parquet").is_file()
    # a run folder from before per-draw folders: its one warm-start evaluation is reused
    legacy = arm_dir(tmp_path / "old", cfg, args, None, "warm start")
    _write_arm(legacy, "warm start", {"q0": 1, "q1": 1}, None)
    ab = Ablation(args, cfg, tmp_path / "old", [], [], test, pool=None, warm="/warm")
    assert ab.warm_arm(0)["em"] == 1.0 and len(calls) == 1


def test_the_archived_draws_are_found_with_the_default_settings():
    """bench/results/ablation holds draws run in earlier sessions; a later session adds draws
    with --include. That only pools if today's defaults give the archived arms' keys: a change of
    the bench's settings (or of configs/smoke.yaml) makes new arms, and this test says so. New
    OPSD levers at their neutral value (NEUTRAL_OPSD) keep the keys."""
    from pathlib import Path

    from bench.ablation import ARMS, _draw_cfg, make_locate, parse_args

    archive = Path(__file__).resolve().parents[2] / "bench" / "results" / "ablation"
    args = parse_args(["--draws", "1", "--include", str(archive)])
    locate = make_locate(args, _draw_cfg(args), archive / "none")
    for name in ("warm start", *ARMS):
        assert (locate(0, name) / "arm.json").is_file(), (
            f"the archived draw 0's {name} arm is not found under today's default settings "
            f"({locate(0, name).name}): a default changed; archive new draws separately or restore it")
