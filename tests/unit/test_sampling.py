"""Step question sampling: uniform (the paper) and stratified by a row field."""

from collections import Counter

import pytest

from searche1_ray.data.sampling import StratifyError, field_value, step_questions, strata


def rows(counts: dict[str, int]) -> list[dict]:
    out = []
    for kind, n in counts.items():
        out += [{"id": f"{kind}_{i}", "metadata": {"type": kind}} for i in range(n)]
    return out


def test_uniform_is_the_old_rng_sample():
    import random

    train = rows({"a": 30, "b": 10})
    assert step_questions(train, 8, "0-grpo-3") == random.Random("0-grpo-3").sample(train, 8)
    assert step_questions(train, 100, 1) == random.Random(1).sample(train, 40)


@pytest.mark.parametrize("n", [1, 3, 4, 7, 8, 16])
def test_stratified_counts_are_even(n):
    train = rows({"single_hop": 360, "two_hop": 240, "comparison": 210, "bridge": 190})
    for seed in range(20):
        got = step_questions(train, n, seed, "metadata.type")
        assert len(got) == n and len({r["id"] for r in got}) == n
        c = Counter(r["metadata"]["type"] for r in got)
        per = [c.get(k, 0) for k in ("single_hop", "two_hop", "comparison", "bridge")]
        assert max(per) - min(per) <= 1, per  # every stratum gets n // 4 or n // 4 + 1


def test_remainder_goes_to_different_strata_across_seeds():
    train = rows({"a": 50, "b": 50, "c": 50})
    extra = Counter()
    for seed in range(60):
        c = Counter(r["metadata"]["type"] for r in step_questions(train, 4, seed, "metadata.type"))
        extra.update(k for k, v in c.items() if v == 2)
    assert set(extra) == {"a", "b", "c"} and min(extra.values()) >= 10


def test_small_stratum_hands_its_share_on():
    train = rows({"big": 40, "tiny": 1, "mid": 5})
    got = step_questions(train, 12, 7, "metadata.type")
    c = Counter(r["metadata"]["type"] for r in got)
    assert c == {"tiny": 1, "mid": 5, "big": 6}
    everything = step_questions(train, 999, 7, "metadata.type")
    assert sorted(r["id"] for r in everything) == sorted(r["id"] for r in train)


def test_reproducible_and_seed_dependent():
    train = rows({"a": 30, "b": 30})
    assert step_questions(train, 6, "s", "metadata.type") == step_questions(train, 6, "s", "metadata.type")
    assert step_questions(train, 6, "s", "metadata.type") != step_questions(train, 6, "t", "metadata.type")


def test_top_level_field_and_missing_field_error():
    train = [{"id": "q1", "data_source": "nq"}, {"id": "q2", "data_source": "hotpotqa"}, {"id": "q3"}]
    assert field_value(train[0], "data_source") == "nq"
    with pytest.raises(StratifyError, match=r"grpo.stratify_by='data_source': training row 2 \(id 'q3'\)"):
        strata(train, "data_source")
    with pytest.raises(StratifyError, match="metadata.type"):
        step_questions(train, 2, 0, "metadata.type")


def test_hold_out_is_a_seeded_disjoint_split_in_file_order():
    from searche1_ray.data.sampling import hold_out

    rows = [{"id": str(i)} for i in range(50)]
    train, dev = hold_out(rows, 10, 0)
    assert len(dev) == 10 and len(train) == 40
    ids = [r["id"] for r in train + dev]
    assert sorted(ids, key=int) == [r["id"] for r in rows]              # disjoint, nothing lost
    assert [int(r["id"]) for r in dev] == sorted(int(r["id"]) for r in dev)
    assert hold_out(rows, 10, 0) == (train, dev)                        # a resume holds out the same
    assert [r["id"] for r in hold_out(rows, 10, 1)[1]] != [r["id"] for r in dev]
    for n in (0, 50):
        with pytest.raises(ValueError, match=f"data.dev_from_train={n}: must be between 1 and .* \\(49\\)"):
            hold_out(rows, n, 0)


def test_first_per_source_takes_the_first_n_of_each_source_in_order():
    from searche1_ray.data.sampling import first_per_source

    merged = ([{"id": f"nq/{i}", "data_source": "nq"} for i in range(5)]
              + [{"id": f"tq/{i}", "data_source": "triviaqa"} for i in range(3)]
              + [{"id": f"hp/{i}", "data_source": "hotpotqa"} for i in range(4)])
    got = [r["id"] for r in first_per_source(merged, 2)]
    # a plain rows[:6] would be NQ alone: the bug this fixes on Search-R1's merged test parquet
    assert got == ["nq/0", "nq/1", "tq/0", "tq/1", "hp/0", "hp/1"]
    assert first_per_source(merged, 0) == merged and first_per_source(merged, 9) == merged
    one = [{"id": str(i)} for i in range(5)]                       # no data_source: one group
    assert [r["id"] for r in first_per_source(one, 3)] == ["0", "1", "2"]
    from searche1_ray.data.sampling import eval_questions   # eval.limit, then data.max_eval_questions
    assert [r["id"] for r in eval_questions(merged, 2, 3)] == ["nq/0", "nq/1", "tq/0"]
    assert eval_questions(merged, 0, 0) == merged and len(eval_questions(merged, 0, 4)) == 4
