"""Data preparation: the synthetic world is generated once into its folder; file paths are checked."""

import pytest

from searche1_ray.config import load_config
from searche1_ray.data.prepare import prepare_data


def test_synthetic_world_is_generated_once(tmp_path):
    cfg = load_config(None, [f"data.dir={tmp_path / 'w'}", "data.world.num_questions=40"])
    paths = prepare_data(cfg)
    assert paths.corpus.is_file() and paths.train.is_file() and paths.split("test").is_file()
    mtime = paths.corpus.stat().st_mtime_ns
    assert prepare_data(cfg) == paths and paths.corpus.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w.") and p.is_dir()]


def test_files_source_checks_paths(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("")
    cfg = load_config(None, ["data.source=files", f"data.corpus_path={corpus}",
                             f"data.train_path={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(FileNotFoundError, match="data.train_path: no file at .*missing.jsonl"):
        prepare_data(cfg)
    train = tmp_path / "train.jsonl"
    train.write_text("")
    cfg = load_config(None, ["data.source=files", f"data.corpus_path={corpus}", f"data.train_path={train}"])
    paths = prepare_data(cfg)
    assert paths.train == train and paths.dev is None
    with pytest.raises(ValueError, match="no 'dev' split is configured"):
        paths.split("dev")


def test_dev_from_train_holds_a_validation_set_out_of_training(tmp_path):
    import json

    from searche1_ray.config import ConfigError
    from searche1_ray.data.prepare import read_splits

    corpus, train, test = tmp_path / "corpus.jsonl", tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": '"T"\ntext'}) + "\n")
    train.write_text("".join(json.dumps({"id": f"train_{i}", "question": f"q{i}?", "golden_answers": ["a"]}) + "\n"
                             for i in range(30)))
    test.write_text(json.dumps({"id": "test_0", "question": "t?", "golden_answers": ["a"]}) + "\n")
    base = ["data.source=files", f"data.corpus_path={corpus}", f"data.train_path={train}", f"data.test_path={test}"]
    cfg = load_config(None, [*base, "data.dev_from_train=8", "data.dev_seed=3"])
    splits = read_splits(cfg, prepare_data(cfg))
    assert len(splits["dev"]) == 8 and len(splits["train"]) == 22 and len(splits["test"]) == 1
    assert not {q["id"] for q in splits["dev"]} & {q["id"] for q in splits["train"]}
    assert read_splits(cfg, prepare_data(cfg))["dev"] == splits["dev"]        # the same on a resume
    assert "dev" not in read_splits(load_config(None, base), prepare_data(load_config(None, base)))
    with pytest.raises(ConfigError, match="data.dev_from_train .* needs data.source 'files' and no data.dev_path"):
        load_config(None, [*base, f"data.dev_path={test}", "data.dev_from_train=8"])
    with pytest.raises(ConfigError, match="data.dev_from_train"):
        load_config(None, ["data.dev_from_train=8"])                          # the synthetic world
    with pytest.raises(ConfigError, match="data.dev_from_train must be >= 0"):
        load_config(None, [*base, "data.dev_from_train=-1"])
