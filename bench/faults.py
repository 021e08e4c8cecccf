"""The fault-injection suite (issue 20), run and summed: one line per fault kind, then the totals.

    python -m bench.faults            # every test marked @pytest.mark.faults (~15 min on 2 cores)
    python -m bench.faults --quick    # only the ones that need no Ray (seconds)

Each fault test injects a fault for real where this machine can (a rollout worker, the driver
actor and a train rank are killed with SIGKILL / ray.kill; bodies no encoder writes are posted to
the live retriever; hypothesis fuzzes /retrieve) and through a seam where it cannot in bounded
time (a hung engine, retriever or collective: a call that never answers; a full disk: an
injected ENOSPC). The tests themselves assert the recovery; this bench runs pytest with
``-m faults`` and SEARCHE1_FAULTS_LOG set, so tests/conftest.py appends each test's outcome and
the numbers it recorded (``record_property``: injected, trajectories_lost, duplicated, fuzz_cases)
as JSON lines, and sums them. The last line:

    faults_injected=<n> survived=<n> trajectories_lost=<n> duplicated=<n> fuzz_cases=<n>

A test injects one fault unless it records ``injected``; a parametrized case counts once; a
failed test's faults count as injected and not survived. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarize(records: list[dict]) -> tuple[list[str], dict[str, int]]:
    """Lines per fault kind and the totals, from the JSON records tests/conftest.py wrote."""
    kinds: dict[str, dict] = defaultdict(lambda: {"injected": 0, "survived": 0, "tests": 0, "seconds": 0.0})
    totals = {"faults_injected": 0, "survived": 0, "trajectories_lost": 0, "duplicated": 0, "fuzz_cases": 0}
    for r in records:
        if r["outcome"] == "skipped":
            continue
        props = r.get("props", {})
        n = int(props.get("injected", 1))
        k = kinds[r["fault"]]
        k["tests"] += 1
        k["seconds"] += r.get("seconds", 0.0)
        k["injected"] += n
        totals["faults_injected"] += n
        if r["outcome"] == "passed":
            k["survived"] += n
            totals["survived"] += n
        for key in ("trajectories_lost", "duplicated", "fuzz_cases"):
            totals[key] += int(props.get(key, 0))
    lines = [f"{kind}: {k['survived']}/{k['injected']} survived ({k['tests']} test(s), {k['seconds']:.0f} s)"
             for kind, k in sorted(kinds.items())]
    return lines, totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the fault tests that need no Ray (not marked slow)")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (e.g. -k fuzz)")
    args = p.parse_args(argv)
    marker = "faults and not slow" if args.quick else "faults"
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        log = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "SEARCHE1_FAULTS_LOG": str(log)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", *args.pytest_args]
        print("$ " + shlex.join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    lines, totals = summarize(records)
    print()
    for line in lines:
        print(line)
    print(" ".join(f"{k}={v}" for k, v in totals.items()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
