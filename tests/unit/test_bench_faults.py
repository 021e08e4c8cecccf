"""bench.faults.summarize: how the fault suite's records add up to its last line."""

from bench.faults import summarize


def test_kinds_and_totals():
    records = [
        {"fault": "a", "outcome": "passed", "seconds": 1.0, "props": {}},
        {"fault": "a", "outcome": "failed", "seconds": 2.0, "props": {}},
        {"fault": "b", "outcome": "passed", "seconds": 3.0, "props": {"injected": 2, "fuzz_cases": 150}},
        {"fault": "c", "outcome": "passed", "seconds": 4.0, "props": {"trajectories_lost": 0, "duplicated": 1}},
        {"fault": "d", "outcome": "skipped", "seconds": 0.0, "props": {}},
    ]
    lines, totals = summarize(records)
    assert lines == ["a: 1/2 survived (2 test(s), 3 s)", "b: 2/2 survived (1 test(s), 3 s)",
                     "c: 1/1 survived (1 test(s), 4 s)"]
    assert totals == {"faults_injected": 5, "survived": 4, "trajectories_lost": 0, "duplicated": 1,
                      "fuzz_cases": 150}
