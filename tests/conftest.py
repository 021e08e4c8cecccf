"""Shared test setup: quiet, offline, and GPU tests skipped where no GPU is present."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- the fault-injection suite (issue 20): tests marked ``@pytest.mark.faults("<fault class>")``
# ``python -m bench.faults`` runs them with SEARCHE1_FAULTS_LOG set; each one's outcome and the
# numbers it recorded with pytest's ``record_property`` (injected, trajectories_lost, duplicated,
# fuzz_cases) are appended there as a JSON line, and the bench sums them.

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get("SEARCHE1_FAULTS_LOG")
    marker = item.get_closest_marker("faults")
    if not path or marker is None or not (report.when == "call" or report.failed or report.skipped):
        return
    if report.when != "call" and report.passed:
        return
    import json

    with open(path, "a") as f:
        f.write(json.dumps({"fault": marker.args[0] if marker.args else item.name, "test": item.nodeid,
                            "phase": report.when, "outcome": report.outcome,
                            "seconds": round(report.duration, 1),
                            "props": {k: v for k, v in item.user_properties}}) + "\n")
