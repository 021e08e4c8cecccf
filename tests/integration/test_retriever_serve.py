"""The retriever end to end on a local Ray: Ray Data index build of the synthetic world, the
real Serve app over HTTP (Search-R1 JSON) and through its handle, bad inputs, recall@3."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import ray_fixture, world_fixture

pytestmark = pytest.mark.slow

MAX_QUERIES = 64


ray_local = ray_fixture("rr", num_cpus=2, log_to_driver=False, stop_serve=True, remove_tmp=True)  # 2 CPUs: the app fits a small machine
world = world_fixture(num_questions=1000)   # the smoke config's world


@pytest.fixture(scope="module")
def cfg(world):
    from searche1_ray.config import load_config
    return load_config(None, [f"data.dir={world}", "retriever.port=0",
                              f"retriever.max_queries_per_request={MAX_QUERIES}",
                              "retriever.app_name=retriever-test"])


@pytest.fixture(scope="module")
def built_index(ray_local, world, cfg, tmp_path_factory):
    from searche1_ray.retrieval.index import build_index
    out = tmp_path_factory.mktemp("index")
    meta = build_index(world / "corpus.jsonl", out, cfg.retriever)
    print(f"\nindex build (Ray Data, {meta['count']} passages, minilm, flat): "
          f"{meta['build_seconds']:.1f}s")
    return out, meta


@pytest.fixture(scope="module")
def app(built_index, world, cfg):
    from actors.retriever import start_retriever
    index_dir, meta = built_index
    handle, url = start_retriever(cfg, world / "corpus.jsonl", index_dir)
    return handle, url, meta


def _questions(world: Path) -> list[dict]:
    rows = []
    for split in ("train", "dev", "test"):
        rows += [json.loads(line) for line in open(world / f"{split}.jsonl")]
    return rows


def test_the_ray_data_build_runs_its_dataset_in_order(ray_local, world, cfg, monkeypatch):
    """Ray Data keeps row order only when the Dataset's own DataContext asks for it (a Dataset
    copies the global context when it is created; setting that one later is ignored — the order
    then depends on which block finishes first, and a prebuilt FAISS index would point at the
    wrong passages)."""
    import ray.data

    from searche1_ray.retrieval.index import _ray_batches

    seen = []
    iter_batches = ray.data.Dataset.iter_batches

    def spy(self, *args, **kwargs):
        seen.append(self.context.execution_options.preserve_order)
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy)
    ids = [i for b in _ray_batches(world / "corpus.jsonl", None, cfg.retriever, 1) for i in b["id"]]
    assert seen == [True]
    assert ids == [json.loads(line)["id"] for line in open(world / "corpus.jsonl")]


def test_ray_data_build_keeps_corpus_order(built_index, world):
    import faiss

    from searche1_ray.retrieval.encoders import load_encoder
    from searche1_ray.retrieval.index import PassageStore
    index_dir, meta = built_index
    corpus = [json.loads(line) for line in open(world / "corpus.jsonl")]
    assert meta["built_with"] == "ray.data" and meta["count"] == len(corpus) and meta["dim"] == 384
    store = PassageStore(index_dir / "passages.arrow")
    assert store.table.column("id").to_pylist() == [r["id"] for r in corpus]
    index = faiss.read_index(str(index_dir / "index.faiss"))
    assert index.ntotal == len(corpus)
    rows = [0, 1, 777, len(corpus) - 1]
    local = load_encoder("minilm").encode_passages([corpus[i]["contents"] for i in rows])
    np.testing.assert_allclose(np.stack([index.reconstruct(i) for i in rows]), local, atol=1e-4)


def test_http_and_handle_answer_in_search_r1_format(app):
    handle, url, _ = app
    assert url.startswith("http://127.0.0.1:") and url.endswith("/retrieve")
    q = ["Who founded Zefoo Motors?", "Zefoo Motors"]
    r = requests.post(url, json={"queries": q, "topk": 3, "return_scores": True}, timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert len(result) == 2 and all(len(hits) == 3 for hits in result)
    for hits in result:
        assert set(hits[0]) == {"document", "score"} and set(hits[0]["document"]) == {"id", "contents"}
        assert isinstance(hits[0]["score"], float)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert result[1][0]["document"]["contents"].startswith("\"Zefoo Motors\"")
    bare = requests.post(url, json={"queries": q, "topk": 3}, timeout=60).json()["result"]
    assert bare == [[h["document"] for h in hits] for hits in result]    # return_scores=False
    via_handle = handle.retrieve.remote(q, 3).result()
    assert [[h["document"] for h in hits] for hits in via_handle] == bare
    np.testing.assert_allclose([h["score"] for h in via_handle[0]],
                               [h["score"] for h in result[0]], atol=1e-5)
    assert handle.retrieve.remote(["Zefoo Motors", "", "  "], 2).result()[1:] == [[], []]
    assert len(handle.retrieve.remote(["Zefoo Motors"]).result()[0]) == 3   # retriever.topk


def test_concurrent_requests_share_batches(app):
    handle, url, _ = app
    before = handle.stats.remote().result()["batches"]
    qs = [f"Who directed the film number {i}?" for i in range(24)]

    def one(i):
        return requests.post(url, json={"queries": [qs[i]], "topk": 1 + i % 3}, timeout=60)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(24)))
    assert all(a.status_code == 200 for a in answers)
    assert [len(a.json()["result"][0]) for a in answers] == [1 + i % 3 for i in range(24)]
    batches = handle.stats.remote().result()["batches"] - before
    print(f"\n24 concurrent HTTP requests -> {batches} batches")
    assert batches < 24


@pytest.mark.faults("malformed and oversize HTTP bodies (live replica)")
def test_bad_inputs_get_clear_errors_and_the_replica_survives(app):
    handle, url, _ = app
    from ray import serve
    before = _replica(serve, handle)
    cases = [
        (b"not json", 400, "must be JSON"),
        (json.dumps({"queries": "who?"}), 422, "list of strings"),
        (json.dumps({"queries": ["ok", ""]}), 422, "queries[1] is empty"),
        (json.dumps({"queries": ["ok"], "topk": 0}), 422, "between 1 and 100"),
        (json.dumps({"queries": ["ok"], "topk": 101}), 422, "between 1 and 100"),
        (json.dumps({"queries": ["q"] * (MAX_QUERIES + 1)}), 413, "too many queries"),
        (json.dumps({"queries": [["nested"]]}), 422, "queries[0] must be a string"),
    ]
    for body, status, words in cases:
        r = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == status, (body[:80], r.status_code, r.text)
        assert words in r.json()["error"]
    assert requests.get(url, timeout=60).status_code == 405
    t0 = time.perf_counter()
    huge = requests.post(url, json={"queries": ["Zefoo Motors " * 200_000], "topk": 2}, timeout=120)
    assert huge.status_code == 200 and len(huge.json()["result"][0]) == 2
    print(f"\n2.6 MB query answered in {time.perf_counter() - t0:.2f}s (truncated to 256 tokens)")
    over = requests.post(url, json={"queries": ["Zefoo Motors " * 400_000], "topk": 2}, timeout=120)
    assert over.status_code == 413 and "retriever.max_request_bytes" in over.json()["error"]
    with pytest.raises(Exception, match="'queries' must be a list of strings"):
        handle.retrieve.remote("not a list", 3).result()
    with pytest.raises(Exception, match="'topk' must be between 1 and 100"):
        handle.retrieve.remote(["ok"], 500).result()
    ok = requests.post(url, json={"queries": ["Zefoo Motors"], "topk": 1}, timeout=60)
    assert ok.status_code == 200 and ok.json()["result"][0][0]["contents"]
    after = _replica(serve, handle)
    assert after["replica"] == before["replica"]         # the same actor: it never crashed
    assert after["batches"] > before["batches"]


@pytest.mark.faults("poisoned query batched with good ones")
def test_a_poisoned_query_fails_alone_in_its_batch(app):
    """A lone surrogate (valid JSON, refused by the tokenizer) batched with good requests: it gets
    422 naming queries[i]; every good request batched with it gets its hits."""
    handle, url, _ = app
    before = handle.stats.remote().result()["batches"]
    bodies = [json.dumps({"queries": ["Zefoo Motors", "b\ud800"] if i == 5 else [f"Who founded company {i}?"],
                          "topk": 2}) for i in range(16)]
    assert "\\ud800" in bodies[5]  # sent escaped, as JSON allows

    def one(body):
        return requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, bodies))
    assert answers[5].status_code == 422 and "queries[1] is not valid Unicode" in answers[5].json()["error"]
    assert all(a.status_code == 200 and len(a.json()["result"][0]) == 2 for i, a in enumerate(answers) if i != 5)
    assert handle.stats.remote().result()["batches"] - before < 15  # they did share batches
    calls = [handle.retrieve.remote(["\udfff"] if i == 3 else [f"company {i}"], 1) for i in range(8)]
    for i, c in enumerate(calls):
        if i == 3:
            with pytest.raises(Exception, match=r"queries\[0\] is not valid Unicode"):
                c.result()
        else:
            assert len(c.result()[0]) == 1


_JSON_LEAF = (st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30)
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
              | st.sampled_from(["\ud800", "ok\udfff", "Zefoo Motors", "", " "]))
_JSON = st.recursive(_JSON_LEAF, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=12)
_VALID = st.fixed_dictionaries(   # mostly well-formed: the 200 path is fuzzed too
    {"queries": st.lists(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40),
                         min_size=1, max_size=8)},
    optional={"topk": st.integers(min_value=1, max_value=100), "return_scores": st.booleans()})
_BODY = st.one_of(
    _VALID,
    st.fixed_dictionaries({"queries": st.one_of(_JSON, st.lists(_JSON_LEAF, min_size=0, max_size=6))},
                          optional={"topk": st.one_of(st.integers(min_value=-10**12, max_value=10**12), _JSON),
                                    "return_scores": _JSON}),
    _JSON)
# raw bodies no JSON encoder writes: deep nesting, a 5,000-digit int (over CPython's int limit),
# bare NaN, truncated JSON, bytes that are not UTF-8
_RAW = [b"[" * 100_000, b'{"queries": ["a"], "topk": ' + b"9" * 5000 + b"}", b'{"queries": ["a"], "topk": NaN}',
        b'{"queries": ["a"', b'{"queries": ["\xff\xfe"]}', b"\xff\xfe\x00{", b""]


@pytest.mark.faults("HTTP fuzz of /retrieve")
def test_fuzzed_bodies_get_a_status_and_the_replica_survives(app, record_property):
    """Issue 20: property-based bodies for /retrieve (surrogates, nesting, huge and non-finite
    numbers, wrong types, topk out of range) and raw bytes no encoder writes. Every answer is 200
    with a result per query or a 4xx with an error that names the field; the replica never restarts."""
    from ray import serve
    handle, url, _ = app
    before = _replica(serve, handle)
    seen = Counter()

    def check(data: bytes):
        r = requests.post(url, data=data, headers={"content-type": "application/json"}, timeout=60)
        seen[r.status_code] += 1
        assert r.status_code in (200, 400, 413, 422), (data[:200], r.status_code, r.text[:300])
        body = r.json()
        if r.status_code == 200:
            assert isinstance(body["result"], list)
        else:
            assert isinstance(body["error"], str) and body["error"], body
        return r.status_code, body

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_BODY)
    def fuzz(body):
        status, answer = check(json.dumps(body, allow_nan=True).encode())
        good = (isinstance(body, dict) and isinstance(body.get("queries"), list)
                and 1 <= len(body["queries"]) <= MAX_QUERIES
                and all(isinstance(q, str) and q.strip() and q.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") == q
                        for q in body["queries"])
                and ("topk" not in body or (type(body["topk"]) is int and 1 <= body["topk"] <= 100))
                and ("return_scores" not in body or isinstance(body["return_scores"], bool)))
        if good:   # a valid request is answered, one list of hits per query
            assert status == 200 and len(answer["result"]) == len(body["queries"]), (body, answer)

    fuzz()
    for raw in _RAW:
        status, _ = check(raw)
        assert status in (400, 413, 422), raw[:60]
    record_property("fuzz_cases", sum(seen.values()))
    after = _replica(serve, handle)
    print(f"\n/retrieve fuzz: {sum(seen.values())} bodies, statuses {dict(sorted(seen.items()))}")
    assert after["replica"] == before["replica"]         # the same actor: it never crashed
    assert seen[200] >= 30 and seen[422] >= 30           # both kinds, in numbers


def test_a_second_start_attaches_to_the_running_app(app, world, cfg):
    from ray import serve

    from actors.retriever import start_retriever
    handle, url, meta = app
    before = _replica(serve, handle)
    index_dir = Path(before["index_dir"])
    handle2, url2 = start_retriever(cfg, world / "corpus.jsonl", index_dir)
    assert url2 == url
    assert _replica(serve, handle2)["replica"] == before["replica"]   # not redeployed


def _replica(serve, handle) -> dict:
    dep = serve.status().applications["retriever-test"].deployments["Retriever"]
    assert dep.status == "HEALTHY" and dep.replica_states == {"RUNNING": 1}, dep
    return handle.stats.remote().result()


def test_recall_at_3_on_the_synthetic_world(app, world):
    handle, _, _ = app
    questions = _questions(world)
    hits_by_type, totals = Counter(), Counter()
    for start in range(0, len(questions), MAX_QUERIES):
        chunk = questions[start:start + MAX_QUERIES]
        results = handle.retrieve.remote([q["question"] for q in chunk], 3).result()
        for q, hits in zip(chunk, results):
            kind = q["metadata"]["type"]
            totals[kind] += 1
            top3 = {h["document"]["id"] for h in hits}
            hits_by_type[kind] += bool(top3 & set(q["metadata"]["supporting_ids"]))
    recall = {k: hits_by_type[k] / totals[k] for k in sorted(totals)}
    print("\nrecall@3 (a supporting passage in the top 3): " +
          ", ".join(f"{k} {v:.3f} (n={totals[k]})" for k, v in recall.items()))
    assert totals["single_hop"] >= 100
    assert recall["single_hop"] >= 0.9


@pytest.mark.faults("retriever app over another index")
def test_an_app_over_another_index_is_refused_then_replaced_when_configured(app, world, cfg, tmp_path):
    """Issue 20: a start whose index differs from the running app's must not take the app over
    from the run searching it (last in the module: it replaces the module's app)."""
    import dataclasses
    import shutil

    from actors.retriever import RetrieverAppConflict, start_retriever
    handle, url, _ = app
    ours = Path(handle.stats.remote().result()["index_dir"])
    other = tmp_path / "other-index"
    shutil.copytree(ours, other)
    with pytest.raises(RetrieverAppConflict, match=r"'retriever-test' is already running .*retriever.replace_app"):
        start_retriever(cfg, world / "corpus.jsonl", other)
    assert handle.stats.remote().result()["index_dir"] == str(ours)   # untouched
    replacing = dataclasses.replace(cfg, retriever=dataclasses.replace(cfg.retriever, replace_app=True))
    handle2, _ = start_retriever(replacing, world / "corpus.jsonl", other)
    assert handle2.stats.remote().result()["index_dir"] == str(other.resolve())
    assert len(handle2.retrieve.remote(["who"], 3).result()[0]) == 3
