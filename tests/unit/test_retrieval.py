"""Retriever pieces without Ray: encoder pooling / prefixes, index build + search on a tiny
corpus (flat, HNSW, IVF-PQ, BM25), stale-index detection, and Search-R1 request validation."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from searche1_ray.config import RetrieverConfig
from searche1_ray.retrieval import encoders
from searche1_ray.retrieval.api import RequestError, check_queries, format_response, parse_request
from searche1_ray.retrieval.encoders import (add_prefix, clip_chars, is_e5, load_encoder,
                                             mean_pool, resolve_encoder)
from searche1_ray.retrieval.index import PassageStore, build_index, ensure_index, index_status
from searche1_ray.retrieval.search import Searcher, search_calls

CORPUS = [
    ("p0", "Varnholt Glassworks", "Varnholt Glassworks is a glass maker founded by Idra Moss in 1911 "
                                  "in the port city of Quellan."),
    ("p1", "Idra Moss", "Idra Moss is a chemist born in Tavrin in 1880. She married Olen Brask."),
    ("p2", "Quellan", "Quellan is a port city on the river Seld, known for salt markets."),
    ("p3", "The Copper Lantern", "The Copper Lantern is a novel written by Pell Ostry in 1954 "
                                 "about a lighthouse keeper."),
    ("p4", "Pell Ostry", "Pell Ostry is a novelist born in Quellan in 1921."),
    ("p5", "Tavrin", "Tavrin is a mountain town famous for its bell towers and weaving mills."),
    ("p6", "Olen Brask", "Olen Brask is an architect who designed the Tavrin observatory."),
    ("p7", "Seld", "The Seld is a river that flows through Quellan into the northern sea."),
]
QUESTIONS = [("Who founded Varnholt Glassworks?", "p0"), ("Where was Idra Moss born?", "p1"),
             ("Who wrote the novel The Copper Lantern?", "p3"), ("What is Tavrin famous for?", "p5"),
             ("Which river flows through Quellan?", "p7")]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for pid, title, text in CORPUS:
            f.write(json.dumps({"id": pid, "contents": f"\"{title}\"\n{text}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(2)
    return load_encoder("minilm")


# --- encoders ------------------------------------------------------------------------------

def _mean_pool_reference(hidden, mask):
    out = []
    for b in range(hidden.shape[0]):
        rows = [hidden[b, t] for t in range(hidden.shape[1]) if mask[b, t] == 1]
        out.append(sum(rows) / len(rows) if rows else torch.zeros(hidden.shape[2]))
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.data())
def test_mean_pool_matches_the_token_loop(b, t, h, data):
    hidden = torch.tensor(data.draw(st.lists(st.floats(-10, 10, width=32), min_size=b * t * h,
                                             max_size=b * t * h))).reshape(b, t, h)
    lengths = data.draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    torch.testing.assert_close(mean_pool(hidden, mask), _mean_pool_reference(hidden, mask),
                               rtol=1e-5, atol=1e-5)


def test_prefixes_per_family():
    e5 = resolve_encoder("e5-base-v2")
    assert (e5.model, e5.query_prefix, e5.passage_prefix) == ("intfloat/e5-base-v2", "query: ", "passage: ")
    assert resolve_encoder("intfloat/multilingual-e5-small").query_prefix == "query: "
    mini = resolve_encoder("minilm")
    assert (mini.kind, mini.query_prefix, mini.passage_prefix, mini.max_length) == ("dense", "", "", 256)
    assert os.path.isfile(os.path.join(mini.model, "model.safetensors"))
    assert resolve_encoder("bm25").kind == "bm25"
    other = resolve_encoder("BAAI/bge-small-en")
    assert (other.query_prefix, other.passage_prefix) == ("", "")
    assert [is_e5(n) for n in ("e5-base-v2", "x/multilingual-e5-large", "bert-base", "me5x")] == \
        [True, True, False, False]
    assert add_prefix(["a", "b"], "query: ") == ["query: a", "query: b"]
    with pytest.raises(ValueError, match="retriever.encoder"):
        resolve_encoder(" ")


def test_clip_chars_keeps_short_texts_and_cuts_long_ones():
    assert clip_chars(["abc"], 4) == ["abc"]
    assert len(clip_chars(["x" * 10_000], 4)[0]) == 4 * encoders.CHARS_PER_TOKEN_CAP


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer
    texts = ["Who founded Varnholt Glassworks?", CORPUS[0][2]]
    ref = SentenceTransformer(resolve_encoder("minilm").model, device="cpu").encode(
        texts, normalize_embeddings=True)
    ours = minilm.encode_queries(texts)
    assert ours.shape == (2, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_huge_query_is_truncated_to_the_encoder_maximum(minilm):
    word = "lantern "
    long_q, capped = word * 50_000, word * 400       # both exceed 256 tokens
    t0 = time.perf_counter()
    a = minilm.encode_queries([long_q])
    assert time.perf_counter() - t0 < 5
    np.testing.assert_allclose(a, minilm.encode_queries([capped]), atol=1e-5)


def test_e5_family_adds_prefixes_and_mean_pools(tmp_path):
    """A tiny random BERT saved under an e5 name: the encoder must feed 'query: x' /
    'passage: x' and return the normalised mask-mean of the last hidden states."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    folder = tmp_path / "tiny-e5-v2"
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(resolve_encoder("minilm").model)
    tok.save_pretrained(folder)
    spec = resolve_encoder(str(folder))
    assert (spec.query_prefix, spec.passage_prefix) == ("query: ", "passage: ")
    enc = load_encoder(spec)
    texts = ["Idra Moss", "a longer text about Quellan and the river Seld"]

    def reference(prefixed):
        model.eval()
        out = []
        for t in prefixed:                      # one at a time: no padding at all
            ids = tok(t, return_tensors="pt")
            with torch.no_grad():
                h = model(**ids).last_hidden_state[0]
            v = h.mean(dim=0)
            out.append((v / v.norm()).numpy())
        return np.stack(out)

    np.testing.assert_allclose(enc.encode_queries(texts), reference([f"query: {t}" for t in texts]),
                               atol=1e-5)
    np.testing.assert_allclose(enc.encode_passages(texts),
                               reference([f"passage: {t}" for t in texts]), atol=1e-5)
    assert not np.allclose(enc.encode_queries(texts), enc.encode_passages(texts))


# --- index build / load / search without Ray -----------------------------------------------

@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_dense_index_finds_the_passage(corpus_file, tmp_path, index_type):
    rcfg = RetrieverConfig(index_type=index_type, pq_m=8, ivf_nlist=4)
    meta = build_index(corpus_file, tmp_path / "idx", rcfg, use_ray=False)
    assert meta["count"] == len(CORPUS) and meta["dim"] == 384
    assert meta["index"]["type"] == index_type and meta["built_with"] == "local"
    assert index_status(tmp_path / "idx", corpus_file, rcfg) is None
    searcher = Searcher(tmp_path / "idx", rcfg)
    hits = searcher.search([q for q, _ in QUESTIONS], topk=3)
    top1 = [h[0]["document"]["id"] for h in hits]
    top3 = [[x["document"]["id"] for x in h] for h in hits]
    if index_type == "ivfpq":   # lossy codes: the passage must still be in the top 3
        assert all(gold in ids for (_, gold), ids in zip(QUESTIONS, top3))
    else:
        assert top1 == [gold for _, gold in QUESTIONS]
    for per_query in hits:
        assert len(per_query) == 3
        scores = [x["score"] for x in per_query]
        assert scores == sorted(scores, reverse=True)
        assert set(per_query[0]["document"]) == {"id", "contents"}


def test_flat_scores_are_cosine_similarities(corpus_file, tmp_path, minilm):
    rcfg = RetrieverConfig()
    build_index(corpus_file, tmp_path / "idx", rcfg, use_ray=False)
    hits = Searcher(tmp_path / "idx", rcfg).search(["Where was Idra Moss born?"], topk=8)[0]
    q = minilm.encode_queries(["Where was Idra Moss born?"])[0]
    by_id = {pid: f"\"{title}\"\n{text}" for pid, title, text in CORPUS}
    for h in hits:
        p = minilm.encode_passages([by_id[h["document"]["id"]]])[0]
        assert h["score"] == pytest.approx(float(q @ p), abs=1e-4)
        assert h["document"]["contents"] == by_id[h["document"]["id"]]


def test_blank_queries_and_topk_beyond_the_corpus(corpus_file, tmp_path):
    rcfg = RetrieverConfig()
    build_index(corpus_file, tmp_path / "idx", rcfg, use_ray=False)
    s = Searcher(tmp_path / "idx", rcfg)
    hits = s.search(["", "Idra Moss", "   "], topk=50)
    assert hits[0] == [] and hits[2] == []
    assert len(hits[1]) == len(CORPUS)            # only as many as there are passages
    assert s.search([], 3) == []


def test_bm25_back_end(corpus_file, tmp_path):
    rcfg = RetrieverConfig(encoder="bm25")
    meta = build_index(corpus_file, tmp_path / "idx", rcfg, use_ray=False)
    assert meta["index"] == {"type": "bm25"} and meta["count"] == len(CORPUS)
    s = Searcher(tmp_path / "idx", rcfg)
    hits = s.search(["Varnholt Glassworks founder", "zzzz unknownword", "the of"], topk=2)
    assert hits[0][0]["document"]["id"] == "p0" and hits[0][0]["score"] > 0
    assert hits[1] == [] and hits[2] == []        # nothing matches: no hits, no crash


def test_stale_index_is_detected_and_rebuilt(corpus_file, tmp_path):
    rcfg = RetrieverConfig()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(corpus_file.read_bytes())
    idx = tmp_path / "idx"
    assert "no meta.json" in index_status(idx, corpus, rcfg)
    first = ensure_index(corpus, idx, rcfg, use_ray=False)
    assert ensure_index(corpus, idx, rcfg, use_ray=False)["built_at"] == first["built_at"]
    assert "index settings changed" in index_status(idx, corpus, RetrieverConfig(index_type="hnsw"))
    assert "encoder changed" in index_status(idx, corpus, RetrieverConfig(encoder="bm25"))
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "p8", "contents": "\"Brask Hall\"\nBrask Hall is a museum."}) + "\n")
    assert "corpus changed" in index_status(idx, corpus, rcfg)
    meta = ensure_index(corpus, idx, rcfg, use_ray=False)
    assert meta["count"] == len(CORPUS) + 1 and index_status(idx, corpus, rcfg) is None
    assert [p.name for p in idx.iterdir() if p.name.startswith(".build-")] == []


def test_prebuilt_faiss_index_is_used_unchanged(corpus_file, tmp_path, minilm):
    """Search-R1's layout: a FAISS file built elsewhere + the wiki-18 jsonl it was built on."""
    import faiss
    contents = [json.loads(line)["contents"] for line in open(corpus_file)]
    index = faiss.IndexFlatIP(384)
    index.add(minilm.encode_passages(contents))
    prebuilt = tmp_path / "e5_Flat.index"
    faiss.write_index(index, str(prebuilt))
    stamp = prebuilt.stat().st_mtime
    rcfg = RetrieverConfig(faiss_index_path=str(prebuilt))
    meta = build_index(corpus_file, tmp_path / "idx", rcfg, use_ray=False)
    assert meta["index"]["type"] == "prebuilt" and meta["count"] == len(CORPUS)
    assert not (tmp_path / "idx" / "index.faiss").exists() and prebuilt.stat().st_mtime == stamp
    assert index_status(tmp_path / "idx", corpus_file, rcfg) is None
    hits = Searcher(tmp_path / "idx", rcfg).search(["Who wrote The Copper Lantern?"], 1)
    assert hits[0][0]["document"]["id"] == "p3"
    short = tmp_path / "short.jsonl"
    short.write_text("".join(open(corpus_file).readlines()[:5]))
    with pytest.raises(ValueError, match="holds 8 vectors but the corpus has 5"):
        build_index(short, tmp_path / "idx2", rcfg, use_ray=False)


def test_passage_store_reads_rows_across_record_batches(tmp_path):
    import pyarrow as pa

    from searche1_ray.retrieval.index import PASSAGE_SCHEMA
    path = tmp_path / "p.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, PASSAGE_SCHEMA) as w:
        for start in (0, 3, 5):
            n = {0: 3, 3: 2, 5: 4}[start]
            w.write_batch(pa.record_batch([pa.array([str(i) for i in range(start, start + n)]),
                                           pa.array([f"text {i}" for i in range(start, start + n)],
                                                    pa.large_string())], schema=PASSAGE_SCHEMA))
    store = PassageStore(path)
    assert len(store) == 9
    assert store.get([8, 0, 3, 4, 2]) == [{"id": str(i), "contents": f"text {i}"} for i in (8, 0, 3, 4, 2)]
    with pytest.raises(IndexError, match="out of range"):
        store.get([9])


def test_corpus_rows_with_title_and_text_and_bad_rows(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": 7, "title": "Seld", "text": "A river."}) + "\n\n")
    rcfg = RetrieverConfig(encoder="bm25")
    build_index(corpus, tmp_path / "idx", rcfg, use_ray=False)
    assert PassageStore(tmp_path / "idx" / "passages.arrow").get([0]) == \
        [{"id": "7", "contents": "\"Seld\"\nA river."}]
    corpus.write_text(json.dumps({"id": "1", "body": "x"}) + "\n")
    with pytest.raises(ValueError, match="'contents'"):
        build_index(corpus, tmp_path / "idx2", rcfg, use_ray=False)
    corpus.write_text("{not json\n")
    with pytest.raises(ValueError, match="c.jsonl:1"):
        build_index(corpus, tmp_path / "idx3", rcfg, use_ray=False)


def test_missing_index_and_wrong_dimension_are_explained(corpus_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="jobs.build_index"):
        Searcher(tmp_path / "nothing", RetrieverConfig())
    with pytest.raises(ValueError, match="retriever.pq_m must divide"):
        build_index(corpus_file, tmp_path / "idx", RetrieverConfig(index_type="ivfpq", pq_m=7),
                    use_ray=False)


# --- Search-R1 request validation ----------------------------------------------------------

def _status(body, max_queries=4):
    try:
        parse_request(body, max_queries=max_queries, default_topk=3)
    except RequestError as e:
        return e.status, e.message
    return 200, ""


def test_valid_requests():
    r = parse_request(b'{"queries": ["a", "b"], "topk": 5, "return_scores": true}', 4, 3)
    assert (r.queries, r.topk, r.return_scores) == (["a", "b"], 5, True)
    r = parse_request({"queries": ["a"]}, 4, 3)          # Search-R1 defaults
    assert (r.topk, r.return_scores) == (3, False)
    assert parse_request({"queries": ["a"], "topk": None}, 4, 3).topk == 3
    assert parse_request({"queries": ["a"], "topk": 2.0}, 4, 3).topk == 2


@pytest.mark.faults("malformed retriever requests")
@pytest.mark.parametrize("body, status, words", [
    (b"{oops", 400, "must be JSON"),
    (b"\xff\xfe", 400, "must be JSON"),
    (b'["a"]', 422, "JSON object"),
    (b'{"topk": 3}', 422, "'queries' is required"),
    (b'{"queries": "who?"}', 422, "list of strings, got str"),
    (b'{"queries": []}', 422, "is empty"),
    (b'{"queries": ["a", 3]}', 422, "queries[1] must be a string, got int"),
    (b'{"queries": ["a", "  "]}', 422, "queries[1] is empty"),
    (b'{"queries": ["a", "b\\ud800c"]}', 422, "queries[1] is not valid Unicode text: surrogates not "
                                            "allowed '\\ud800' at character 1"),
    (b'{"queries": ["a"], "topk": 0}', 422, "between 1 and 100, got 0"),
    (b'{"queries": ["a"], "topk": 101}', 422, "between 1 and 100"),
    (b'{"queries": ["a"], "topk": "3"}', 422, "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": true}', 422, "'topk' must be an integer"),
    (b'{"queries": ["a"], "return_scores": "yes"}', 422, "'return_scores'"),
    (b'{"queries": ["a", "b", "c", "d", "e"]}', 413, "5 > 4 (retriever.max_queries_per_request)"),
    # found by the HTTP fuzz test (issue 20): these raised past the parser (a 500)
    (b"[" * 100_000, 400, "nested too deeply"),
    (b'{"queries": ["a"], "topk": ' + b"9" * 5000 + b"}", 400, "must be JSON"),
    (b'{"queries": ["a"], "topk": NaN}', 422, "'topk' must be an integer, got float nan"),
])
def test_bad_requests_get_a_status_and_a_reason(body, status, words):
    got, message = _status(body)
    assert got == status and words in message


def test_the_handle_path_refuses_lone_surrogates_too():
    assert check_queries(["a", " "], 4, allow_blank=True) == ["a", " "]
    with pytest.raises(RequestError, match=r"queries\[2\] is not valid Unicode") as e:
        check_queries(["a", "b", "\udfff"], 4, allow_blank=True)
    assert e.value.status == 422


# --- one bad call in a batch fails alone ---------------------------------------------------

def test_a_failing_call_does_not_fail_the_calls_batched_with_it():
    searched = []

    def search(queries, topk):
        searched.append(list(queries))
        if "boom" in queries:
            raise TypeError("TextEncodeInput must be Union[...]")
        return [[{"document": {"id": f"{q}{i}", "contents": q}, "score": 1.0 - i / 10} for i in range(topk)]
                for q in queries]

    out = search_calls(search, [(["a", "b"], 2), (["boom"], 3), (["c"], 1)])
    assert [[h["document"]["id"] for h in per_q] for per_q in out[0]] == [["a0", "a1"], ["b0", "b1"]]
    assert isinstance(out[1], TypeError) and [[h["document"]["id"] for h in q] for q in out[2]] == [["c0"]]
    assert searched == [["a", "b", "boom", "c"], ["a", "b"], ["boom"], ["c"]]  # the batch, then alone
    searched.clear()
    ok = search_calls(search, [(["a"], 1), (["c"], 3)])  # no failure: one search, each cut to its top-k
    assert searched == [["a", "c"]] and [len(ok[0][0]), len(ok[1][0])] == [1, 3]
    assert isinstance(search_calls(search, [(["boom"], 1)])[0], TypeError)


def test_a_lone_surrogate_fails_only_its_own_call_in_a_real_searcher(corpus_file, tmp_path):
    rcfg = RetrieverConfig()
    build_index(corpus_file, tmp_path / "idx", rcfg, use_ray=False)
    s = Searcher(tmp_path / "idx", rcfg)
    with pytest.raises(Exception):  # the tokenizer refuses it, and with it the whole batch
        s.search(["Where was Idra Moss born?", "\ud800"], 1)
    out = search_calls(s.search, [(["Where was Idra Moss born?"], 1), (["\ud800"], 1),
                                  (["Which river flows through Quellan?"], 1)])
    assert out[0][0][0]["document"]["id"] == "p1" and out[2][0][0]["document"]["id"] == "p7"
    assert isinstance(out[1], Exception)


def test_response_shapes():
    hits = [[{"document": {"id": "1", "contents": "x"}, "score": 0.5}], []]
    assert format_response(hits, True) == {"result": hits}
    assert format_response(hits, False) == {"result": [[{"id": "1", "contents": "x"}], []]}
