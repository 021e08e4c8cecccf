"""bench.opsd_signal's parts against direct definitions: which tokens are a span's content, and
per-token log-probs / distributions of a response (one forward) against one forward per prefix."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.opsd_signal import action_positions, token_logprobs


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from searche1_ray.model_store import resolve_model
    return AutoTokenizer.from_pretrained(resolve_model())


def test_action_positions_cover_exactly_the_tag_contents(tok):
    text = ("<think>who?</think><search> Neifeo Thaitesez spouse </search>\n\n<information>Doc 1"
            "</information>\n\n<answer> Lerna Braigaxov </answer>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for kind, content in (("query", "Neifeo Thaitesez spouse"), ("answer", "Lerna Braigaxov")):
        pos = action_positions(tok, ids, kind)
        assert pos == sorted(pos) and pos
        got = tok.decode([ids[i] for i in pos]).strip()
        assert got == content
        # nothing of the tags themselves
        assert "<" not in got and ">" not in got
    assert action_positions(tok, tok("<think>no tags</think>")["input_ids"], "answer") == []


def test_token_logprobs_match_one_forward_per_prefix():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    prompt, response = [3, 7, 11, 2], [5, 9, 1, 30, 4]
    lp, dist = token_logprobs(model, prompt, response)
    assert lp.shape == (5,) and dist.shape == (5, 50)
    for j, t in enumerate(response):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response[:j]])).logits[0, -1]
        ref = torch.log_softmax(logits.float(), -1)
        assert torch.allclose(dist[j], ref, atol=1e-5)
        assert lp[j].item() == pytest.approx(ref[t].item(), abs=1e-5)
