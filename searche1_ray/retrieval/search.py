"""Search an index directory: encode the queries, one FAISS (or BM25) search for the batch, and
look the passages up in the memory-mapped store.

    score(q, p) = <e(q), e(p)>  = cosine similarity (embeddings are L2-normalised)

Results are Search-R1 hits ``{"document": {"id", "contents"}, "score"}``, best first.
``search_calls`` serves a batch of callers with one search and keeps a failing caller's error
its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from searche1_ray.config import RetrieverConfig
from searche1_ray.retrieval.encoders import EncoderSpec, load_encoder
from searche1_ray.retrieval.index import (BM25_DIR, INDEX_FILE, META_FILE, PASSAGES_FILE,
                                          PassageStore, bm25_tokenize, read_faiss)

log = logging.getLogger(__name__)

HNSW_EF_SEARCH = 128
IVF_NPROBE = 32


def tune_faiss(num_threads: int = 1, blas_threshold: int = 4) -> None:
    """Batched-search settings measured on CPU (MEASURED.md): few OpenMP threads, BLAS early."""
    import faiss
    faiss.omp_set_num_threads(max(1, num_threads))
    faiss.cvar.distance_compute_blas_threshold = blas_threshold


def _to_gpu(index):
    """Shard the index over every visible GPU in fp16 when faiss has GPU support."""
    import faiss
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        log.info("faiss has no GPU here; searching on CPU")
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.shard, co.useFloat16 = True, True
    log.info("faiss: index sharded over %d GPUs (fp16)", faiss.get_num_gpus())
    return faiss.index_cpu_to_all_gpus(index, co=co)


class Searcher:
    """Encoder + index + passages: ``search(queries, topk)`` -> Search-R1 hits per query.

    A hit is ``{"document": {"id", "contents"}, "score": float}``, best first. A blank query
    gets no hits. Queries longer than the encoder's maximum are truncated. ``use_gpu`` puts the
    encoder on CUDA; ``faiss_gpu`` (None = ``use_gpu``) moves the index to the GPUs too.
    """

    def __init__(self, index_dir: str | os.PathLike, rcfg: RetrieverConfig,
                 use_gpu: bool = False, faiss_threads: int = 1, faiss_gpu: bool | None = None):
        folder = Path(index_dir).expanduser()
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no index in {folder} ({META_FILE} missing); build it with "
                                    "`python -m jobs.build_index --config <yaml>`")
        self.meta = json.loads(meta_path.read_text())
        self.passages = PassageStore(folder / PASSAGES_FILE)
        kind = self.meta["index"]["type"]
        self.encoder = None
        self.bm25 = None
        if kind == "bm25":
            import bm25s
            self.bm25 = bm25s.BM25.load(str(folder / BM25_DIR), mmap=True)
            self.max_length = 0
            return
        import torch
        spec = EncoderSpec(**self.meta["encoder"])
        self.encoder = load_encoder(spec, device="cuda" if use_gpu and torch.cuda.is_available()
                                    else "cpu", batch_size=rcfg.encode_batch_size)
        self.max_length = self.encoder.max_length
        path = Path(self.meta["index"]["path"]) if kind == "prebuilt" else folder / INDEX_FILE
        index = read_faiss(path)
        if index.d != self.encoder.dim:
            raise ValueError(f"index {path} has dimension {index.d} but encoder "
                             f"{spec.name!r} gives {self.encoder.dim}; use the encoder the index "
                             "was built with (retriever.encoder)")
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        if hasattr(index, "nprobe"):
            index.nprobe = min(IVF_NPROBE, index.nlist)
        tune_faiss(faiss_threads)
        self.index = _to_gpu(index) if (use_gpu if faiss_gpu is None else faiss_gpu) else index

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, queries: Sequence[str], topk: int) -> list[list[dict]]:
        live = [i for i, q in enumerate(queries) if q and q.strip()]
        results: list[list[dict]] = [[] for _ in queries]
        if not live:
            return results
        texts = [queries[i] for i in live]
        k = max(1, min(int(topk), len(self.passages)))
        if self.bm25 is not None:
            rows, scores = self._bm25_search(texts, k)
        else:
            emb = self.encoder.encode_queries(texts)
            scores, rows = self.index.search(emb, k)
        for i, row_ids, row_scores in zip(live, rows, scores):
            keep = [(int(r), float(s)) for r, s in zip(row_ids, row_scores) if r >= 0]
            docs = self.passages.get([r for r, _ in keep])
            results[i] = [{"document": d, "score": s} for d, (_, s) in zip(docs, keep)]
        return results

    def _bm25_search(self, texts: list[str], k: int):
        tokens = bm25_tokenize([t[:20000] for t in texts])
        rows = np.full((len(texts), k), -1, dtype=np.int64)
        scores = np.zeros((len(texts), k), dtype=np.float32)
        vocab_inv = {v: w for w, v in tokens.vocab.items()}
        for i, ids in enumerate(tokens.ids):
            words = [vocab_inv[t] for t in ids]
            if not words:
                continue
            r, s = self.bm25.retrieve([words], k=k, show_progress=False)
            good = s[0] > 0
            rows[i, :good.sum()] = r[0][good]
            scores[i, :good.sum()] = s[0][good]
        return rows, scores


Hits = list[list[dict]]


def search_calls(search: Callable[[list[str], int], Hits],
                 calls: Sequence[tuple[Sequence[str], int]]) -> list[Hits | Exception]:
    """Serve a batch of calls ``(queries, topk)``: one ``search`` over all their queries with the
    largest top-k, each call then gets its own queries cut to its own top-k.

    If that search raises (text the tokenizer refuses, say), every call is searched on its own, so
    one bad call cannot fail the callers batched with it: a call that fails alone gets its
    exception in its place of the result (the caller raises it), the others their hits.
    """
    queries = [q for qs, _ in calls for q in qs]
    try:
        hits = search(queries, max(topk for _, topk in calls))
    except Exception as e:
        if len(calls) == 1:
            return [e]
        log.warning("a batch of %d calls failed (%s: %s); searching each call alone", len(calls),
                    type(e).__name__, e)
        out: list[Hits | Exception] = []
        for qs, topk in calls:
            try:
                out.append(search(list(qs), topk))
            except Exception as alone:
                out.append(alone)
        return out
    out, start = [], 0
    for qs, topk in calls:
        out.append([h[:topk] for h in hits[start:start + len(qs)]])
        start += len(qs)
    return out
