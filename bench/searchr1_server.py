"""The bench's baseline: Search-R1's retrieval server design, re-implemented here (no Ray).

What it keeps from Search-R1's ``search_r1/search/retrieval_server.py`` (its design, not its code):

  * a FastAPI app with one **synchronous** ``POST /retrieve`` endpoint, so concurrent requests run
    on FastAPI's worker-thread pool, each doing its own encode and search (nothing shared
    between requests, no batching across them);
  * per request: the whole request's queries tokenised together (``padding=True``, truncation at
    256 tokens) and encoded in one forward pass (chunks of 512 queries), mean-pooled over the
    attention mask and L2-normalised, then **one** FAISS search for the chunk;
  * the encoder in fp32, or in fp16 through ``model.half()`` as the real server is configured
    (``retrieval_use_fp16=True``); torch and FAISS at their default thread counts (no tuning);
  * passages looked up one row at a time from an Arrow-backed table (Search-R1 indexes a
    ``datasets`` table, also Arrow), then the response built as Search-R1's: a list of hits
    per query, ``{"document": row, "score": s}`` when ``return_scores`` else the bare row.

Run by ``bench/retriever.py`` in its own process:
``python -m bench.searchr1_server --index-dir DIR --port P [--fp16]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY_MAX_LENGTH = 256     # Search-R1's retrieval_query_max_length
CHUNK = 512                # Search-R1's retrieval_batch_size (queries per forward pass)


class QueryRequest(BaseModel):      # Search-R1's request body
    queries: list[str]
    topk: Optional[int] = None
    return_scores: bool = False


class SearchR1Retriever:
    """Encoder + FAISS index + passages, as the real server holds them."""

    def __init__(self, index_dir: str | Path, fp16: bool = False):
        import faiss
        import torch
        from transformers import AutoModel, AutoTokenizer

        from searche1_ray.retrieval.encoders import EncoderSpec
        from searche1_ray.retrieval.index import INDEX_FILE, META_FILE, PASSAGES_FILE, PassageStore

        folder = Path(index_dir)
        meta = json.loads((folder / META_FILE).read_text())
        spec = EncoderSpec(**meta["encoder"])
        self.prefix = spec.query_prefix
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model, use_fast=True)
        self.model = AutoModel.from_pretrained(spec.model).eval()
        if fp16:
            self.model = self.model.half()
        self.torch = torch
        self.index = faiss.read_index(str(folder / INDEX_FILE))
        self.passages = PassageStore(folder / PASSAGES_FILE)

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            enc = self.tokenizer([self.prefix + q for q in queries], max_length=QUERY_MAX_LENGTH,
                                 padding=True, truncation=True, return_tensors="pt")
            hidden = self.model(**enc, return_dict=True).last_hidden_state
            mask = enc["attention_mask"]
            hidden = hidden.masked_fill(~mask[..., None].bool(), 0.0)
            emb = hidden.sum(dim=1) / mask.sum(dim=1)[..., None]
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.float().numpy().astype(np.float32, order="C")

    def batch_search(self, queries: list[str], k: int) -> tuple[list[list[dict]], list[list[float]]]:
        docs, scores = [], []
        for start in range(0, len(queries), CHUNK):
            emb = self.encode(queries[start:start + CHUNK])
            s, rows = self.index.search(emb, k)
            flat = [self.passages.get([int(r)])[0] for r in rows.reshape(-1)]   # row by row
            docs += [flat[i * k:(i + 1) * k] for i in range(len(rows))]
            scores += s.tolist()
        return docs, scores


def answer(request: QueryRequest, retriever: Any, default_topk: int = 3) -> dict:
    """The endpoint's body: search the request's queries, shape the Search-R1 response."""
    topk = request.topk or default_topk
    docs, scores = retriever.batch_search(request.queries, topk)
    if request.return_scores:
        return {"result": [[{"document": d, "score": s} for d, s in zip(per_docs, per_scores)]
                           for per_docs, per_scores in zip(docs, scores)]}
    return {"result": docs}


def make_app(retriever: Any, default_topk: int = 3):
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/retrieve")
    def retrieve(request: QueryRequest):      # sync: FastAPI runs it on its thread pool
        return answer(request, retriever, default_topk)

    @app.get("/health")
    def health():
        return {"ok": True}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.searchr1_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--index-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--fp16", action="store_true", help="encoder in fp16 (model.half()), as the real server")
    args = p.parse_args(argv)
    import uvicorn
    app = make_app(SearchR1Retriever(args.index_dir, fp16=args.fp16), args.topk)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
