"""Smoke-run the retriever entrypoints on a tiny world: jobs.build_index then jobs.serve_retriever
(finds the index current, serves it, answers Search-R1 JSON, exits cleanly on Ctrl-C)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    return env


def test_build_then_serve(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    world, index_dir = tmp_path / "world", tmp_path / "index"
    sets = ["--set", f"data.dir={world}", "--set", "data.world.num_questions=20",
            "--set", f"retriever.index_dir={index_dir}", "--set", "run.num_cpus=4",
            "--set", "retriever.port=0"]
    out = subprocess.run([sys.executable, "-m", "jobs.build_index", "--config", "configs/smoke.yaml",
                          *sets, "--set", "run.dashboard=false"], cwd=ROOT, env=_env(ray_tmp), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    corpus_lines = sum(1 for _ in open(world / "corpus.jsonl"))
    assert summary["count"] == corpus_lines and summary["index"] == {"type": "flat"}
    built_at = json.loads((index_dir / "meta.json").read_text())["built_at"]

    log = open(tmp_path / "serve.log", "w+")
    # started as `… &` in a script starts it: with SIGINT ignored (Ctrl-C must still stop it)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.serve_retriever", "--config",
                             "configs/smoke.yaml", *sets, "--set", "run.dashboard=false"], cwd=ROOT, env=_env(ray_tmp),
                            stdout=log, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        url, deadline = None, time.monotonic() + 300
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            text = (tmp_path / "serve.log").read_text()
            url = next((l.split("=", 1)[1] for l in text.splitlines()
                        if l.startswith("RETRIEVER_URL=")), None)
            time.sleep(0.5)
        assert url, (tmp_path / "serve.log").read_text()[-3000:]
        r = requests.post(url, json={"queries": ["Who founded it?"], "topk": 2,
                                     "return_scores": True}, timeout=60)
        assert r.status_code == 200 and len(r.json()["result"][0]) == 2
        assert json.loads((index_dir / "meta.json").read_text())["built_at"] == built_at  # reused
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    with pytest.raises(requests.ConnectionError):
        requests.post(url, json={"queries": ["x"]}, timeout=10)
