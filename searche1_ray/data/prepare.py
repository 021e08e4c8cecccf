"""Resolve the data settings into files on disk: the synthetic world (generated once per seed and
size, then reused) or the user's FlashRAG / Search-R1 / wiki-18 paths, checked to exist; then
``read_splits`` reads the question splits, holding a validation set out of training when
``data.dev_from_train`` asks for one."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from searche1_ray.config import Config, DataConfig

log = logging.getLogger(__name__)

WORLD_CACHE = "~/.cache/searche1_ray/worlds"


@dataclass(frozen=True)
class DataPaths:
    dir: Path          # folder holding the data (the world folder, or the corpus' folder)
    corpus: Path       # wiki-18 jsonl
    train: Path
    dev: Path | None
    test: Path | None

    def split(self, name: str) -> Path:
        path = getattr(self, name, None) if name in ("train", "dev", "test") else None
        if path is None:
            raise ValueError(f"data: no '{name}' split is configured (have: train"
                             + ", dev" * (self.dev is not None) + ", test" * (self.test is not None) + ")")
        return path


def world_dir(data: DataConfig) -> Path:
    if data.dir:
        return Path(data.dir).expanduser()
    from searche1_ray.data.world import GENERATOR_VERSION  # a new generator gets a new cache folder

    return (Path(WORLD_CACHE).expanduser()
            / f"seed{data.world.seed}-q{data.world.num_questions}-v{GENERATOR_VERSION}")


def _ensure_world(folder: Path, data: DataConfig) -> None:
    if (folder / "world.json").is_file():
        return
    from searche1_ray.data.world import generate_world

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if (folder / "world.json").is_file():
            return
        log.info("generating the synthetic world (seed %d, %d questions) into %s",
                 data.world.seed, data.world.num_questions, folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            generate_world(seed=data.world.seed, num_questions=data.world.num_questions).write(tmp)
            if folder.exists():  # a user-chosen data.dir that exists but holds no world yet
                for item in tmp.iterdir():
                    os.replace(item, folder / item.name)
            else:
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_data(cfg: Config) -> DataPaths:
    """Return the data files for ``cfg``, generating the synthetic world if needed."""
    data = cfg.data
    if data.source == "synthetic":
        folder = world_dir(data)
        _ensure_world(folder, data)
        return DataPaths(folder, folder / "corpus.jsonl", folder / "train.jsonl",
                         folder / "dev.jsonl", folder / "test.jsonl")
    paths = {}
    for key in ("corpus_path", "train_path", "dev_path", "test_path"):
        value = getattr(data, key)
        if not value:
            paths[key] = None
            continue
        p = Path(value).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data.{key}: no file at {p}")
        paths[key] = p
    return DataPaths(paths["corpus_path"].parent, paths["corpus_path"], paths["train_path"],
                     paths["dev_path"], paths["test_path"])


def read_splits(cfg: Config, data: DataPaths) -> dict[str, list[dict]]:
    """``{"train": rows, "dev": rows, "test": rows}`` for the splits that exist (``read_qa`` rows).
    With ``data.dev_from_train = n``, dev is n training questions drawn with ``data.dev_seed``,
    and training no longer sees them."""
    from searche1_ray.data.readers import read_qa
    from searche1_ray.data.sampling import hold_out

    out = {}
    for split in ("train", "dev", "test"):
        path = getattr(data, split)
        if path is not None and Path(path).is_file():
            out[split] = read_qa(path)
    n = cfg.data.dev_from_train
    if n:
        out["train"], out["dev"] = hold_out(out["train"], n, cfg.data.dev_seed)
        log.info("validation: %d questions held out of %s (data.dev_seed=%d); %d left for training",
                 n, data.train, cfg.data.dev_seed, len(out["train"]))
    return out
