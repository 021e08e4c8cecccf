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
