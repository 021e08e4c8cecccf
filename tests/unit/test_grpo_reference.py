"""GRPOTask's KL reference: the policy the round started from. A fresh round copies the model it
trains; a round resumed mid-way trains from its last checkpoint but loads the reference from
``reference_path`` (the round's starting policy), so the KL term equals an uninterrupted round's."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from searche1_ray.config import Config
from searche1_ray.training.tasks import GRPOTask


def _tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_fresh_round_copies_the_model_it_trains():
    model = _tiny(0)
    task = GRPOTask(Config(), use_reference=True)
    assert task.prepare_model(model, None) is model
    assert _same(task.reference, model) and task.reference is not model
    assert not any(p.requires_grad for p in task.reference.parameters())


def test_a_resumed_round_loads_the_rounds_starting_policy(tmp_path):
    start, mid = _tiny(0), _tiny(1)              # the round's start; its step-k checkpoint
    start.save_pretrained(tmp_path / "start")
    task = GRPOTask(Config(), use_reference=True, reference_path=str(tmp_path / "start"))
    assert task.prepare_model(mid, None) is mid
    assert _same(task.reference, start) and not _same(task.reference, mid)
    assert task.reference.dtype == mid.dtype and not task.reference.training
    assert not any(p.requires_grad for p in task.reference.parameters())


def test_no_reference_without_kl():
    cfg = Config()
    cfg.grpo.kl_coef = 0.0
    task = GRPOTask(cfg, reference_path="/nonexistent")
    task.prepare_model(_tiny(0), cfg)
    assert task.reference is None
