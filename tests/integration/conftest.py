"""Fixtures shared by the integration tests: the packaged SmolLM2 policy (``model_path``) and its
tokenizer (``tok``), plus two factories for what differs between modules: a private local Ray
(``ray_fixture``) and a seeded synthetic world (``world_fixture``). A test module binds a factory's
result to the fixture name it uses, e.g. ``ray_local = ray_fixture("rw", num_cpus=8)``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ray_fixture(tmp_prefix: str, num_cpus: int = 4, *, repo_on_pythonpath: bool = False,
                log_to_driver: bool | None = None, stop_serve: bool = False, remove_tmp: bool = False) -> Callable:
    """A module-scoped fixture that runs a private local Ray for the module's tests.

    ``num_cpus`` logical CPUs; Ray's files in a fresh /tmp/<tmp_prefix>* (short: Ray's socket paths
    are limited). ``repo_on_pythonpath``: a runtime env with PYTHONPATH=<repo> for workers that
    import actors/ or jobs/. ``log_to_driver``: None keeps Ray's default. Teardown: Serve first
    when ``stop_serve``, then Ray, then the temp folder when ``remove_tmp``."""

    @pytest.fixture(scope="module")
    def ray_local() -> Iterator[None]:
        import ray

        tmp = tempfile.mkdtemp(prefix=tmp_prefix, dir="/tmp")
        env = {"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}}
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=tmp, include_dashboard=False,
                 log_to_driver=log_to_driver, runtime_env=env if repo_on_pythonpath else None)
        yield
        try:
            if stop_serve:
                from ray import serve

                serve.shutdown()
        finally:
            ray.shutdown()
            if remove_tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    return ray_local


def world_fixture(num_questions: int) -> Callable:
    """A module-scoped fixture: the folder of the seed-0 synthetic world with ``num_questions``
    questions (corpus.jsonl, {train,dev,test}.jsonl, world.json)."""

    @pytest.fixture(scope="module")
    def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
        from searche1_ray.data.world import generate_world

        folder = tmp_path_factory.mktemp("world")
        generate_world(seed=0, num_questions=num_questions).write(folder)
        return folder

    return world


@pytest.fixture(scope="module")
def model_path() -> str:
    """The packaged SmolLM2-135M-Instruct as a local HF folder (converted on first use)."""
    from searche1_ray.model_store import resolve_model

    return resolve_model()


@pytest.fixture(scope="module")
def tok(model_path: str):
    """The policy's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
