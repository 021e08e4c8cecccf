"""Config tree: YAML + dotted overrides, and load-time errors that name the dotted key."""

from pathlib import Path

import pytest

from searche1_ray.config import Config, ConfigError, config_from_dict, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_smoke_yaml_loads_and_overrides_apply():
    cfg = load_config(CONFIGS / "smoke.yaml", ["grpo.lr=1e-6", "rollout.group_size=7",
                                               "eval.splits=[dev,test]", "run.name=x1"])
    assert cfg.grpo.lr == pytest.approx(1e-6)
    assert isinstance(cfg.grpo.lr, float)
    assert cfg.rollout.group_size == 7
    assert cfg.eval.splits == ["dev", "test"]
    assert cfg.run_dir == Path.cwd() / "runs" / "x1"  # absolute (searche1_ray/run_folder.py)
    assert cfg.warmstart.enabled is True


def test_defaults_without_file_are_valid():
    cfg = load_config(None)
    assert cfg.rollout.group_size == 5 and cfg.opsd.tau_clip == 10.0


def test_round_trip_through_dict():
    cfg = load_config(CONFIGS / "smoke.yaml", ["opsd.target_modules=[q_proj,v_proj]"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.faults("bad configs (error names the dotted key)")
@pytest.mark.parametrize("override, message", [
    ("rollout.group_size=1", "config: rollout.group_size must be >= 2, got 1"),
    ("grpo.lr=-1", "config: grpo.lr must be > 0, got -1.0"),
    ("retriever.topk=0", "config: retriever.topk must be between 1 and 100, got 0"),
    ("grpo.nonsense=3", "config: unknown key 'grpo.nonsense'"),
    ("nosection.key=3", "config: unknown key 'nosection'"),
    ("rollout.temperature=warm", "config: rollout.temperature must be a number, got 'warm'"),
    ("rollout.group_size=2.5", "config: rollout.group_size must be an integer, got 2.5"),
    ("warmstart.enabled=maybe", "config: warmstart.enabled must be true or false, got 'maybe'"),
    ("retriever.index_type=lsh", "config: retriever.index_type must be one of 'flat', 'hnsw', 'ivfpq'"),
    ("opsd.target_modules=q_proj", "config: opsd.target_modules must be a list of str"),
    ("train.zero_stage=4", "config: train.zero_stage must be one of 0, 1, 2, 3, got 4"),
    ("retriever.max_replicas=0", "retriever.max_replicas must be >= retriever.min_replicas"),
    ("data.source=files", "config: data.train_path is required when data.source is 'files'"),
    ("warmstart.batch_size=0", "config: warmstart.batch_size must be >= 1, got 0"),
    ("run.name=..", "config: run.name must be a folder name"),
    ("run.name=a/b", "config: run.name must be a folder name"),
    ("eval.splits=[dev,tset]", "config: eval.splits must be a non-empty list of 'train', 'dev', 'test'"),
    ("grpo.warmup_ratio=1.5", "config: grpo.warmup_ratio must be in [0, 1)"),
    ("opsd.loss_agg=sum", "config: opsd.loss_agg must be one of 'seq_mean', 'token_mean'"),
    ("opsd.teacher_reference=answer", "config: opsd.teacher_reference must be one of 'full', 'policy_text'"),
    ("train.bf16=maybe", "config: train.bf16 must be one of 'auto', True, False"),
])
def test_bad_values_fail_with_the_dotted_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "smoke.yaml", [override])
    assert message in str(err.value)


@pytest.mark.faults("bad configs (error names the dotted key)")
def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(notmap)
    section = tmp_path / "section.yaml"
    section.write_text("rollout: 3\n")
    with pytest.raises(ConfigError, match="config: rollout must be a mapping"):
        load_config(section)


def test_parse_override_shapes():
    assert parse_override("a.b=1e-6") == ("a.b", 1e-6)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=hello world") == ("a.b", "hello world")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("novalue")


def test_yaml_scientific_floats_without_dot_are_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("grpo:\n  lr: 1e-6\n")
    assert load_config(f).grpo.lr == pytest.approx(1e-6)
    assert Config().grpo.lr == pytest.approx(1e-6)


def test_warmup_is_steps_or_ratio_not_both():
    assert load_config(None, ["grpo.warmup_ratio=0.285"]).grpo.warmup_ratio == 0.285
    with pytest.raises(ConfigError, match="set grpo.warmup_steps .2. or grpo.warmup_ratio .0.1., not both"):
        load_config(None, ["grpo.warmup_steps=2", "grpo.warmup_ratio=0.1"])
