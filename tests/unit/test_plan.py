"""The paper recipes load, validate and resolve into the Ray resources they would request."""

import subprocess
import sys
from pathlib import Path

import pytest

from searche1_ray.config import ConfigError, load_config
from searche1_ray.plan import (PlanError, check_fits, fit_problems, resource_plan, rollout_worker_options,
                               train_scaling_config)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
PAPER = {"3b": CONFIGS / "paper_qwen2.5_3b.yaml", "7b": CONFIGS / "paper_qwen2.5_7b.yaml"}


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_paper_recipe_values(size):
    cfg = load_config(PAPER[size])
    assert cfg.model.name == f"Qwen/Qwen2.5-{size.upper()}-Instruct"
    assert cfg.run.cycles == 2
    r = cfg.rollout
    assert (r.group_size, r.temperature, r.max_searches) == (5, 1.0, 4)
    ret = cfg.retriever
    assert (ret.topk, ret.encoder, ret.index_type, ret.faiss_gpu) == (3, "e5-base-v2", "flat", True)
    assert ret.faiss_index_path.endswith("e5_Flat.index")
    assert cfg.data.source == "files" and cfg.data.corpus_path.endswith("wiki-18.jsonl")
    g = cfg.grpo
    assert (g.steps_per_round, g.lr, g.kl_coef, g.clip_eps) == (200, 1e-6, 0.001, 0.2)
    assert cfg.opsd.tau_clip == 10.0 and cfg.opsd.lora_r >= 1
    t = cfg.train
    assert (t.use_gpu, t.zero_stage, t.bf16) == (True, 3, True)
    assert cfg.warmstart.enabled is False
    assert (cfg.cluster.num_gpus, cfg.cluster.gpus_per_node) == (8, 8)
    assert cfg.eval.temperature == 0.0


def _gpus_cpus(plan, name, at_max=False):
    c = plan.component(name)
    return c.total("GPU", at_max), c.total("CPU", at_max)


def test_paper_3b_plan():
    plan = check_fits(resource_plan(load_config(PAPER["3b"])))
    rollout = plan.component("rollout")
    assert rollout.count == 3 and rollout.bundles == [{"CPU": 4.0, "GPU": 1.0}]
    assert rollout.ray_options == {"actor": {"num_cpus": 4.0, "num_gpus": 1.0}, "placement_group": None,
                                   "vllm": {"tensor_parallel_size": 1}}
    assert _gpus_cpus(plan, "rollout") == (3, 12)
    assert _gpus_cpus(plan, "train") == (4, 32)
    assert plan.component("train").ray_options["ScalingConfig"] == {
        "num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 8.0, "GPU": 1.0},
        "placement_strategy": "PACK"}
    assert _gpus_cpus(plan, "retriever") == (1, 8)
    assert plan.component("retriever").ray_options["ray_actor_options"] == {"num_cpus": 8.0, "num_gpus": 1.0}
    assert _gpus_cpus(plan, "driver") == (0, 0)
    assert plan.totals() == plan.totals(at_max=True) == {"CPU": 52.0, "GPU": 8.0}
    assert fit_problems(plan) == []


def test_paper_7b_plan_uses_tensor_parallel_and_autoscaling():
    plan = check_fits(resource_plan(load_config(PAPER["7b"])))
    rollout = plan.component("rollout")
    assert rollout.count == 1 and rollout.strategy == "STRICT_PACK"
    assert rollout.bundles == [{"CPU": 4.0, "GPU": 1.0}] * 2
    assert rollout.ray_options["placement_group"] == {"bundles": [{"CPU": 4.0, "GPU": 1.0}] * 2,
                                                      "strategy": "STRICT_PACK"}
    assert rollout.ray_options["vllm"] == {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
    assert rollout.ray_options["actor"] == {"num_cpus": 4.0, "num_gpus": 0}  # the ranks hold the GPUs
    assert _gpus_cpus(plan, "rollout") == (2, 8)
    assert _gpus_cpus(plan, "train") == (4, 32)
    ret = plan.component("retriever")
    assert (ret.count, ret.max_count) == (1, 2)
    assert ret.ray_options["autoscaling_config"]["max_replicas"] == 2
    assert plan.totals() == {"CPU": 48.0, "GPU": 7.0}
    assert plan.totals(at_max=True) == {"CPU": 56.0, "GPU": 8.0}
    text = plan.to_text()
    assert "2 x {CPU: 4, GPU: 1} STRICT_PACK" in text and "fits" in text


def test_rollout_worker_options_as_the_pool_uses_them():
    # actors/rollout_worker.py pops placement_group / placement_group_bundle_index / vllm and
    # passes the rest to .options()
    assert rollout_worker_options(load_config(PAPER["3b"])) == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert rollout_worker_options(load_config(PAPER["7b"])) == {
        "num_cpus": 4.0, "num_gpus": 0,
        "placement_group": {"bundles": [{"CPU": 4.0, "GPU": 1.0}] * 2, "strategy": "STRICT_PACK"},
        "placement_group_bundle_index": 0,
        "vllm": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}}
    assert rollout_worker_options(load_config(CONFIGS / "smoke.yaml")) == {"num_cpus": 1.0, "num_gpus": 0}


def test_smoke_plan_is_cpu_only_and_unchecked():
    plan = resource_plan(load_config(CONFIGS / "smoke.yaml"))
    assert plan.totals() == {"CPU": 3.5, "GPU": 0.0}
    assert train_scaling_config(load_config(CONFIGS / "smoke.yaml"))["resources_per_worker"] == {"CPU": 1.0}
    assert fit_problems(plan) == []
    assert "cluster: unknown" in plan.to_text()


def test_too_many_gpus_is_reported_with_the_counts():
    plan = resource_plan(load_config(PAPER["3b"], ["rollout.num_workers=5"]))
    problems = fit_problems(plan)
    assert problems == ["GPUs: the plan asks for 10 (rollout 5, train 4, retriever 1) but cluster.num_gpus is 8"]
    with pytest.raises(PlanError, match="cluster.num_gpus is 8"):
        check_fits(plan)


def test_too_many_cpus_is_reported():
    plan = resource_plan(load_config(PAPER["3b"], ["train.cpus_per_worker=30"]))
    assert fit_problems(plan) == ["CPUs: the plan asks for 140 but cluster.num_cpus is 96"]


def test_groups_must_fit_on_one_node():
    # 8 GPUs on 2 nodes of 4: two TP=3 engines leave one GPU per node, so a retriever replica
    # needing 2 whole GPUs fits the total but no single node
    cfg = load_config(PAPER["3b"], ["cluster.gpus_per_node=4", "rollout.num_workers=2",
                                    "rollout.tensor_parallel_size=3", "train.use_gpu=false",
                                    "retriever.num_gpus=2"])
    plan = resource_plan(cfg)
    assert plan.totals(at_max=True)["GPU"] == 8
    problems = fit_problems(plan)
    assert len(problems) == 1 and problems[0].startswith("retriever[0] needs 2 GPU + 8 CPU on one node")
    ok = resource_plan(load_config(PAPER["3b"], ["cluster.gpus_per_node=4", "rollout.num_workers=2",
                                                 "rollout.tensor_parallel_size=2"]))
    assert fit_problems(ok) == ["GPUs: the plan asks for 9 (rollout 4, train 4, retriever 1) but cluster.num_gpus is 8"]


@pytest.mark.parametrize("override, message", [
    ("retriever.num_gpus=0", "config: retriever.faiss_gpu needs retriever.num_gpus > 0"),
    ("retriever.num_gpus=1.5", "config: retriever.num_gpus must be >= 0, and a whole number when above 1"),
    ("rollout.num_gpus_per_worker=2", "config: rollout.num_gpus_per_worker must be between 0 and 1"),
    ("cluster.gpus_per_node=16", "config: cluster.gpus_per_node (16) must be <= cluster.num_gpus (8)"),
    ("cluster.num_gpus=-1", "config: cluster.num_gpus must be >= 0"),
    ("cluster.racks=2", "config: unknown key 'cluster.racks'"),
])
def test_resource_settings_are_validated(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(PAPER["3b"], [override])
    assert str(e.value).startswith(message)


def dry_run(job: str, size: str, *extra: str) -> str:
    """stdout of ``python -m jobs.<job> --config <paper size> --dry-run [extra args]``, run in a
    fresh interpreter that must import neither Ray nor vLLM and exit 0."""
    code = (f"import sys; from jobs.{job} import main; "
            "rc = main(['--config', sys.argv[1], '--dry-run', *sys.argv[2:]]); "
            "assert 'ray' not in sys.modules and 'vllm' not in sys.modules, 'dry run imported ray/vllm'; "
            "sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(PAPER[size]), *extra], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_dry_run_prints_the_plan_and_starts_nothing(size):
    out = dry_run("evaluate", size)
    assert f"Qwen/Qwen2.5-{size.upper()}-Instruct" in out
    assert "fits (at the maximum replica counts)" in out and "nothing was started" in out
    assert "ScalingConfig(" in out and "DeepSpeed ZeRO-3" in out
    assert "e5_Flat.index" in out


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_train_dry_run_prints_validation_set_and_budgets(size):
    out = dry_run("train", size)
    assert "fits (at the maximum replica counts)" in out and "nothing was started" in out
    assert "validation  500 questions held out of the training file (data.dev_seed=0)" in out
    assert "200 steps x 512 questions x G=5 = 512,000 rollouts" in out
    assert "2,560 sequences per step in 10 optimizer update(s) (mini-batch 256" in out
    assert ("6,400 training questions x K=5 = 32,000 rollouts -> pairs; 100 LoRA steps x 32 pairs = "
            "3,200 pair uses; validation every 20 steps on 500 questions") in out
    assert "train.parquet  (not on this machine)" in out
    # eval.limit is per data source: the plan says so
    limited = dry_run("train", size, "--set", "eval.limit=50")
    assert "validation every 20 steps on the first 50 questions of each data source (eval.limit)" in limited


def test_dry_run_fails_when_the_plan_does_not_fit():
    code = ("import sys; from jobs.evaluate import main; "
            "sys.exit(main(['--config', sys.argv[1], '--dry-run', '--set', 'train.num_workers=6']))")
    p = subprocess.run([sys.executable, "-c", code, str(PAPER["3b"])], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert "DOES NOT FIT" in p.stdout and "cluster.num_gpus is 8" in p.stdout
