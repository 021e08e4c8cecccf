"""DeepSpeed ZeRO-3 on CPU, 2 gloo ranks, a tiny random Llama (tied head, layers big enough that
ZeRO-3 partitions them): the GRPO and OPSD losses, weight export and the LoRA merge.

Under ZeRO-3 a parameter's ``data`` is an empty placeholder on every rank outside its module's
forward/backward, so whatever reads weights outside a module call must gather them
(``tasks.full_parameters``). Two levels:

- the engine itself, in two spawned processes (no Ray): each loss equals the plain model's on the
  same batch, the lean OPSD loss (which reads the LM-head matrix itself) equals the direct one,
  the exported / LoRA-merged weights equal the plain model's exactly, and a step trains;
- the TrainRunner (Ray Train workers): a GRPO step under ZeRO-3 gives the ZeRO-2 loss and
  weights, with an uneven log-prob batch (3 rows on 2 ranks); an OPSD step with the lean loss
  under ZeRO-3 gives the direct loss under ZeRO-2 and the same merged weights.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import ray_fixture

pytestmark = pytest.mark.slow

ray_local = ray_fixture("z3r", num_cpus=4)

LORA = ["opsd.target_modules=[q_proj,v_proj,up_proj]", "opsd.lora_r=4", "opsd.lora_alpha=8"]


def tiny_llama(seed: int = 0):
    """~1M parameters, fp32, tied embedding = LM head (1024 x 128), MLP matrices 128 x 1024 (LoRA
    on ``up_proj`` merges into a matrix larger than ZeRO-3's persistence threshold, 1e5 elements)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=1024,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, max_position_embeddings=512))


def grpo_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(6, 12)), int(rng.integers(8, 20))
        ids = rng.integers(3, 1024, p + r)
        mask = np.r_[np.zeros(p), (rng.random(r) < 0.8)].astype(np.float32)
        out.append({"question_id": f"q{i}", "input_ids": ids, "loss_mask": mask,
                    "old_logprobs": np.zeros(p + r, np.float32), "advantage": np.float32(rng.normal())})
    return out


def opsd_samples(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sp = rng.integers(3, 1024, int(rng.integers(5, 10))).tolist()
        tp = rng.integers(3, 1024, int(rng.integers(10, 20))).tolist()
        resp = rng.integers(3, 1024, int(rng.integers(8, 16))).tolist()
        mask = [1 if rng.random() < 0.8 else 0 for _ in resp]
        mask[0] = 1
        out.append({"question_id": f"q{i}", "input_ids": sp + resp, "student_prompt_ids": sp,
                    "teacher_prompt_ids": tp, "response_ids": resp, "loss_mask": mask})
    return out


def _assert_same_weights(got: dict, want: dict, atol: float = 0.0) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:5]
    for k in want:
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------ the engine, 2 spawned ranks


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: ZeRO-3 engines around a GRPO model and an OPSD (LoRA) model; results to disk."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from searche1_ray.config import load_config
    from searche1_ray.training.deepspeed_config import deepspeed_config
    from searche1_ray.training.opsd_task import OPSDTask, merged_state_dict
    from searche1_ray.training.tasks import GRPOTask, full_parameters, full_state_dict
    from searche1_ray.training.worker import skip_shm_comm_build

    dist.init_process_group("gloo", rank=rank, world_size=world)
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_config(None, ["train.zero_stage=3", f"train.num_workers={world}", "train.bf16=false",
                             "grpo.kl_coef=0", *LORA])
    ds_cfg = deepspeed_config(cfg.train, 1.0, world)
    res: dict = {"stage": ds_cfg["zero_optimization"]["stage"]}

    def engine_for(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg, dist_init_required=False)[0]

    # GRPO: the full model trains
    task = GRPOTask(cfg)
    model = tiny_llama(0)
    plain = copy.deepcopy(model)
    batch = task.collate(grpo_samples(3))
    res["grpo_plain"] = float(task.loss(plain, batch)[0].detach())
    engine = engine_for(model)
    res["partitioned"] = {n: p.numel() == 0 for n, p in engine.module.named_parameters()}
    with full_parameters(engine.module.parameters()):
        export = full_state_dict(engine.module)
    res["grpo_export_ok"] = _same(export, full_state_dict(plain))
    loss, _ = task.loss(engine.module, batch)
    engine.backward(loss)
    engine.step()
    res["grpo_z3"] = float(loss.detach())
    with full_parameters(engine.module.parameters()):
        after = full_state_dict(engine.module)
    res["grpo_moved"] = max(float((after[k] - export[k]).abs().max()) for k in export)

    # OPSD: LoRA on the frozen base; a non-zero adapter so that the merge has something to add
    task = OPSDTask(cfg)
    pm = task.prepare_model(tiny_llama(1), cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    plain = copy.deepcopy(pm)
    batch = task.collate(opsd_samples(3))
    res["opsd_plain"] = float(task.loss(plain, batch)[0].detach())
    plain_merged = merged_state_dict(plain)
    engine = engine_for(pm)
    head = engine.module.get_base_model().get_output_embeddings().weight
    res["head_partitioned"] = head.numel() == 0
    with full_parameters(engine.module.parameters()):
        res["merge_ok"] = _same(merged_state_dict(engine.module), plain_merged)
    with torch.no_grad():
        res["opsd_direct_z3"] = float(OPSDTask(load_config(None, [*LORA, "opsd.lean_loss=false"])).loss(
            engine.module, batch)[0])
    loss, m = task.loss(engine.module, batch)  # lean (the default)
    engine.backward(loss)
    engine.step()
    res["opsd_lean_z3"] = float(loss.detach())
    res["head_partitioned_after"] = head.numel() == 0
    with full_parameters(engine.module.parameters()):
        merged = merged_state_dict(engine.module)
    res["opsd_moved"] = max(float((merged[k] - plain_merged[k]).abs().max()) for k in merged)
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _same(got: dict, want: dict) -> str:
    """'' when ``got`` equals ``want`` exactly (names, shapes, values), else what differs."""
    if got.keys() != want.keys():
        return f"names differ: {sorted(set(got) ^ set(want))[:5]}"
    for k in want:
        if got[k].shape != want[k].shape or not torch.equal(got[k], want[k]):
            return f"{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}"
    return ""


def test_zero3_engine_losses_export_and_merge_on_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["stage"] == 3
    # the test exercises partitioning: after initialize every weight is an empty placeholder
    assert all(r0["partitioned"].values()), r0["partitioned"]
    assert r0["head_partitioned"] and r0["head_partitioned_after"]
    for r in (r0, r1):
        assert r["grpo_export_ok"] == "" and r["merge_ok"] == "", (r["grpo_export_ok"], r["merge_ok"])
        assert r["grpo_z3"] == pytest.approx(r["grpo_plain"], rel=1e-5, abs=1e-6)
        assert r["opsd_lean_z3"] == pytest.approx(r["opsd_plain"], rel=1e-5, abs=1e-7)
        assert r["opsd_direct_z3"] == pytest.approx(r["opsd_lean_z3"], rel=1e-5, abs=1e-7)
        assert r["grpo_moved"] > 1e-4 and r["opsd_moved"] > 1e-6  # the steps trained
    assert r0["opsd_lean_z3"] > 0 and r0["grpo_z3"] == r1["grpo_z3"]


# ------------------------------------------------------------------ the TrainRunner (Ray Train workers)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, model_path) -> str:
    """``tiny_llama()`` as an HF folder (fp32 safetensors) with SmolLM2's tokenizer files beside it
    (rank 0 loads a tokenizer; the tests feed token ids < 1024 directly)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(folder)
    return str(folder)


def _cfg(stage: int, *overrides):
    from searche1_ray.config import load_config

    return load_config(None, ["train.num_workers=2", "train.cpus_per_worker=1", f"train.zero_stage={stage}",
                              "train.bf16=false", "train.micro_batch_size=2", "train.max_seq_len=256",
                              *LORA, *overrides])


def test_grpo_step_and_export_under_zero3_match_zero2(ray_local, tiny_model_dir, tmp_path):
    """Per stage: export (before any step), trainer log-probs of 3 rows on 2 ranks (one rank runs
    a padding forward under ZeRO-3), one on-policy GRPO step, export again."""
    from safetensors.torch import load_file

    from searche1_ray.training.runner import TrainRunner
    from searche1_ray.training.tasks import GRPOTask

    saved = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    out = {}
    for stage in (2, 3):
        cfg = _cfg(stage, "grpo.lr=1e-3", "grpo.kl_coef=0.001", "grpo.mini_batch_size=0")  # a frozen reference too
        samples = grpo_samples(3)
        runner = TrainRunner(cfg, tiny_model_dir, GRPOTask(cfg), tmp_path / f"z{stage}")
        try:
            start = runner.get_weights()
            lps = runner.compute_logprobs(samples)
            for s, lp in zip(samples, lps):
                s["old_logprobs"] = np.where(s["loss_mask"] > 0, lp, 0.0).astype(np.float32)
            m = runner.step(samples)
            after = runner.get_weights()
        finally:
            runner.stop()
        _assert_same_weights(start, saved)   # exported = the full model: names, shapes, values
        out[stage] = (lps, m, after)
    (lp2, m2, w2), (lp3, m3, w3) = out[2], out[3]
    for a, b in zip(lp2, lp3):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert m3["grpo/loss"] == pytest.approx(m2["grpo/loss"], rel=1e-4, abs=1e-6), (m2, m3)
    assert m3["grpo/ratio_dev"] < 1e-4 and m3["grpo/loss_tokens"] == m2["grpo/loss_tokens"]
    # one Adam step moves each weight by up to lr (1e-3); the two stages take the same step
    moved = max(float((w2[k] - saved[k]).abs().max()) for k in saved)
    assert moved > 5e-4, moved
    _assert_same_weights(w3, w2, atol=1e-4)


def test_opsd_lean_step_and_lora_merge_under_zero3_match_zero2(ray_local, tiny_model_dir, tmp_path):
    """ZeRO-2 with the direct loss, ZeRO-3 with the lean loss (the paper configs' setting): the
    same loss, and after one step the same merged (W + ΔW) weights, which differ from W."""
    from safetensors.torch import load_file

    from searche1_ray.training.opsd_task import OPSDTask
    from searche1_ray.training.runner import TrainRunner

    saved = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    out = {}
    for stage, lean in ((2, False), (3, True)):
        cfg = _cfg(stage, "opsd.lr=1e-3", f"opsd.lean_loss={str(lean).lower()}")
        runner = TrainRunner(cfg, tiny_model_dir, OPSDTask(cfg), tmp_path / f"z{stage}")
        try:
            m = runner.step(opsd_samples(3))
            merged = runner.get_weights()
        finally:
            runner.stop()
        out[stage] = (m, merged)
    (m2, w2), (m3, w3) = out[2], out[3]
    assert m3["opsd/kl"] > 0 and m3["opsd/kl"] == pytest.approx(m2["opsd/kl"], rel=1e-4, abs=1e-7), (m2, m3)
    assert m3["opsd/loss_tokens"] == m2["opsd/loss_tokens"]
    assert w3.keys() == saved.keys()
    delta = float((w3["model.layers.0.mlp.up_proj.weight"] - saved["model.layers.0.mlp.up_proj.weight"]).abs().max())
    assert delta > 1e-6, delta        # the adapter moved and was merged into a partitioned matrix
    _assert_same_weights(w3, w2, atol=1e-5)
