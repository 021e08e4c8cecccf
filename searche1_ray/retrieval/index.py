"""Retrieval index: build (Ray Data encode -> FAISS) or load an index directory, and search it.

An index directory holds
    passages.arrow   the corpus as an Arrow IPC file (id, contents), memory-mapped at load so a
                     21M-passage corpus never becomes Python objects; row i = FAISS id i
    index.faiss      Flat inner product (default), HNSW or IVF-PQ over L2-normalised embeddings
                     (score = cosine similarity); or bm25/ for the lexical back end
    meta.json        encoder, dim, count, index type + parameters, the corpus file's path, size
                     and mtime; written last, so its presence means the build finished, and any
                     difference from the current settings marks the index stale (rebuilt)

Search-R1's published ``e5_Flat.index`` + ``wiki-18.jsonl`` are used unchanged: give the index
as ``retriever.faiss_index_path`` and only the passages store is derived from the jsonl.
Searching an index directory: search.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from searche1_ray.config import RetrieverConfig
from searche1_ray.retrieval.encoders import EncoderSpec, load_encoder, resolve_encoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PASSAGES_FILE = "passages.arrow"
INDEX_FILE = "index.faiss"
BM25_DIR = "bm25"
META_FILE = "meta.json"
PASSAGE_SCHEMA = pa.schema([("id", pa.string()), ("contents", pa.large_string())])


# --- settings an index depends on ---------------------------------------------------------

def _corpus_stamp(corpus_path: Path) -> dict:
    st = corpus_path.stat()
    return {"path": str(corpus_path.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def index_params(rcfg: RetrieverConfig) -> dict:
    """The config values that shape the index (a change means rebuilding)."""
    if rcfg.faiss_index_path:
        p = Path(rcfg.faiss_index_path).expanduser()
        return {"type": "prebuilt", "path": str(p.resolve()),
                **({"size": p.stat().st_size, "mtime": p.stat().st_mtime} if p.is_file() else {})}
    spec = resolve_encoder(rcfg.encoder)
    if spec.kind == "bm25":
        return {"type": "bm25"}
    if rcfg.index_type == "hnsw":
        return {"type": "hnsw", "m": rcfg.hnsw_m}
    if rcfg.index_type == "ivfpq":
        return {"type": "ivfpq", "nlist": rcfg.ivf_nlist, "pq_m": rcfg.pq_m}
    return {"type": "flat"}


def index_status(index_dir: str | os.PathLike, corpus_path: str | os.PathLike,
                 rcfg: RetrieverConfig) -> str | None:
    """None when ``index_dir`` holds a finished index for this corpus and these settings, else
    the reason it must be (re)built."""
    folder = Path(index_dir).expanduser()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return f"no {META_FILE} in {folder}"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return f"{meta_path} is not valid JSON"
    if meta.get("format") != FORMAT_VERSION:
        return f"index format {meta.get('format')} != {FORMAT_VERSION}"
    spec = resolve_encoder(rcfg.encoder)
    if meta.get("encoder") != spec.fingerprint():
        return f"encoder changed: {meta.get('encoder', {}).get('name')!r} -> {spec.name!r}"
    if meta.get("index") != index_params(rcfg):
        return f"index settings changed: {meta.get('index')} -> {index_params(rcfg)}"
    corpus = Path(corpus_path).expanduser()
    if not corpus.is_file():
        return f"corpus file missing: {corpus}"
    if meta.get("corpus") != _corpus_stamp(corpus):
        return f"corpus changed: {corpus} (size or mtime differ from the indexed one)"
    needed = [PASSAGES_FILE] + ([BM25_DIR] if meta["index"]["type"] == "bm25" else
                                [] if meta["index"]["type"] == "prebuilt" else [INDEX_FILE])
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        return f"files missing in {folder}: {missing}"
    return None


# --- passages store -----------------------------------------------------------------------

class PassageStore:
    """Row-addressable, memory-mapped view of ``passages.arrow`` (row i = FAISS id i)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        self.table = pa.ipc.open_file(self._source).read_all()   # zero-copy over the mmap
        ids, contents = self.table.column("id"), self.table.column("contents")
        self._ids, self._contents = ids.chunks, contents.chunks
        self._starts = np.cumsum([0] + [len(c) for c in self._ids])[:-1]

    def __len__(self) -> int:
        return self.table.num_rows

    def get(self, rows: Sequence[int]) -> list[dict[str, str]]:
        """``{"id", "contents"}`` for each row number."""
        out = []
        for r in rows:
            if not 0 <= r < len(self):
                raise IndexError(f"passage row {r} out of range 0..{len(self) - 1} in {self.path}")
            c = int(np.searchsorted(self._starts, r, side="right") - 1)
            j = int(r - self._starts[c])
            out.append({"id": self._ids[c][j].as_py(), "contents": self._contents[c][j].as_py()})
        return out


def _normalise_batch(batch: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(ids as strings, contents) from a corpus batch; wiki-18 rows have id + contents, other
    dumps title + text (joined the wiki-18 way: ``"Title"\\ntext``)."""
    if "contents" in batch:
        contents = [str(c) for c in batch["contents"]]
    elif "text" in batch:
        titles = batch["title"] if "title" in batch else [None] * len(batch["text"])
        contents = [str(x) if t is None else f"\"{t}\"\n{x}" for t, x in zip(titles, batch["text"])]
    else:
        raise ValueError(f"corpus rows need a 'contents' (or 'title' + 'text') field; got "
                         f"fields {sorted(batch)}")
    if "id" in batch:
        ids = [str(i) for i in batch["id"]]
    else:
        raise ValueError(f"corpus rows need an 'id' field; got fields {sorted(batch)}")
    return ids, contents


class EncodePassages:
    """Ray Data ``map_batches`` UDF (one per actor): passages -> embeddings."""

    def __init__(self, spec: EncoderSpec | None, batch_size: int = 64, num_threads: int = 0):
        self.encoder = None
        if spec is not None:   # None = pass the passages through (bm25, prebuilt index)
            import torch
            if num_threads > 0:
                torch.set_num_threads(num_threads)
            self.encoder = load_encoder(spec, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, contents = _normalise_batch(batch)
        out = {"id": np.array(ids, dtype=object), "contents": np.array(contents, dtype=object)}
        if self.encoder is not None:
            out["embedding"] = self.encoder.encode_passages(contents)
        return out


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


# --- FAISS --------------------------------------------------------------------------------

def _faiss_index(rcfg: RetrieverConfig, emb: np.ndarray):
    """A FAISS index over the rows of ``emb`` (inner product on normalised vectors)."""
    import faiss

    n, dim = emb.shape
    if rcfg.index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif rcfg.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, rcfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        if dim % rcfg.pq_m:
            raise ValueError(f"config: retriever.pq_m must divide the embedding size {dim}, "
                             f"got {rcfg.pq_m}")
        nlist = max(1, min(rcfg.ivf_nlist, n // 39))   # faiss wants >= 39 points per centroid
        nbits = max(1, min(8, int(math.log2(max(2, n)))))
        if nlist != rcfg.ivf_nlist or nbits != 8:
            log.warning("ivfpq: %d passages are few for nlist=%d; using nlist=%d, %d bits",
                        n, rcfg.ivf_nlist, nlist, nbits)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, rcfg.pq_m, nbits,
                                 faiss.METRIC_INNER_PRODUCT)
        sample = emb[np.random.default_rng(0).permutation(n)[:max(256 * nlist, 2 ** nbits * 64)]]
        index.train(np.ascontiguousarray(sample))
    step = 65536
    for start in range(0, n, step):
        index.add(np.ascontiguousarray(emb[start:start + step]))
    return index


# --- build --------------------------------------------------------------------------------

def _ray_batches(corpus: Path, spec: EncoderSpec | None, rcfg: RetrieverConfig,
                 encode_workers: int) -> Iterator[dict[str, np.ndarray]]:
    """Corpus batches in file order, encoded by a Ray Data actor pool (``spec`` None: not
    encoded). One actor per GPU when the retriever asks for GPUs, else ``encode_workers`` (1)."""
    import ray

    ds = ray.data.read_json(str(corpus))
    if spec is None:
        ds = ds.map_batches(EncodePassages, fn_constructor_args=(None,), batch_format="numpy",
                            batch_size=4096, compute=ray.data.ActorPoolStrategy(size=1))
    else:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if rcfg.num_gpus > 0 else 0
        workers = gpus or encode_workers or 1
        threads = 0 if gpus else max(1, (os.cpu_count() or 1) // workers)
        ds = ds.map_batches(EncodePassages, fn_constructor_args=(spec, rcfg.encode_batch_size, threads),
                            batch_format="numpy", batch_size=rcfg.encode_batch_size * 4,
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    # row i of the store = FAISS id i = corpus line i (a prebuilt index counts on it). A Dataset
    # runs with the copy of the DataContext it was created with: the global one is not read here.
    ds.context.execution_options.preserve_order = True
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _local_batches(corpus: Path, spec: EncoderSpec | None, rcfg: RetrieverConfig,
                   batch_size: int = 1024) -> Iterator[dict[str, np.ndarray]]:
    """The same batches computed in this process (small corpora, tests)."""
    udf = EncodePassages(spec, rcfg.encode_batch_size)
    rows: list[dict] = []

    def flush():
        batch = {k: np.array([r.get(k) for r in rows], dtype=object) for k in rows[0]}
        rows.clear()
        return udf(batch)

    with open(corpus, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{corpus}:{lineno}: not a JSON object ({e})") from None
            if len(rows) == batch_size:
                yield flush()
    if rows:
        yield flush()


def build_index(corpus_path: str | os.PathLike, out_dir: str | os.PathLike,
                rcfg: RetrieverConfig, encode_workers: int = 0, use_ray: bool = True) -> dict:
    """Encode ``corpus_path`` (wiki-18 jsonl) and write an index directory; return its meta.

    With ``use_ray`` (the default) Ray Data reads the jsonl and ``map_batches`` encodes it on an
    actor pool (one actor per GPU, or ``encode_workers`` CPU actors; Ray must be initialised or
    a local one starts); without, this process does it. The driver collects the rows in corpus
    order into the passages store and an embeddings memmap, from which FAISS is built.
    """
    from tqdm import tqdm

    corpus = Path(corpus_path).expanduser()
    if not corpus.is_file():
        raise FileNotFoundError(f"build_index: corpus file not found: {corpus}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    spec = resolve_encoder(rcfg.encoder)
    prebuilt = bool(rcfg.faiss_index_path)
    encode = None if prebuilt or spec.kind == "bm25" else spec
    t0 = time.perf_counter()
    total = _count_lines(corpus)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        batches = (_ray_batches(corpus, encode, rcfg, encode_workers) if use_ray
                   else _local_batches(corpus, encode, rcfg))
        emb = None
        n = 0
        with pa.OSFile(str(tmp / PASSAGES_FILE), "wb") as sink, \
                pa.ipc.new_file(sink, PASSAGE_SCHEMA) as writer, \
                tqdm(total=total, desc=f"index {corpus.name} ({spec.name})", unit="psg",
                     mininterval=2.0) as bar:
            for batch in batches:
                k = len(batch["id"])
                writer.write_batch(pa.record_batch(
                    [pa.array(list(batch["id"]), pa.string()),
                     pa.array(list(batch["contents"]), pa.large_string())], schema=PASSAGE_SCHEMA))
                if "embedding" in batch:
                    vecs = np.asarray(batch["embedding"], dtype=np.float32)
                    if emb is None:
                        emb = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+",
                                                        dtype=np.float32,
                                                        shape=(max(total, n + k), vecs.shape[1]))
                    emb[n:n + k] = vecs
                n += k
                bar.update(k)
        if n == 0:
            raise ValueError(f"build_index: corpus {corpus} has no passages")
        encode_s = time.perf_counter() - t0
        dim = 0
        if prebuilt:
            dim = _check_prebuilt(rcfg.faiss_index_path, n)
        elif spec.kind == "bm25":
            _build_bm25(PassageStore(tmp / PASSAGES_FILE), tmp / BM25_DIR)
        else:
            import faiss
            dim = int(emb.shape[1])
            index = _faiss_index(rcfg, emb[:n])
            faiss.write_index(index, str(tmp / INDEX_FILE))
            del index
        if emb is not None:
            del emb
            (tmp / "embeddings.npy").unlink()
        meta = {"format": FORMAT_VERSION, "encoder": spec.fingerprint(), "dim": dim, "count": n,
                "index": index_params(rcfg), "corpus": _corpus_stamp(corpus),
                "built_with": "ray.data" if use_ray else "local",
                "encode_seconds": round(encode_s, 2),
                "build_seconds": round(time.perf_counter() - t0, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / META_FILE).unlink(missing_ok=True)      # the old index is invalid from here on
        for item in tmp.iterdir():
            dest = out / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
        _write_json_atomic(out / META_FILE, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("index built: %d passages, %s, %.1fs -> %s", n, meta["index"]["type"],
             meta["build_seconds"], out)
    return meta


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _check_prebuilt(faiss_index_path: str, count: int) -> int:
    path = Path(faiss_index_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"retriever.faiss_index_path: no file at {path}")
    index = read_faiss(path)
    if index.ntotal != count:
        raise ValueError(f"retriever.faiss_index_path: {path} holds {index.ntotal} vectors but "
                         f"the corpus has {count} passages; give the corpus the index was built on")
    return int(index.d)


def read_faiss(path: Path):
    import faiss
    try:   # large flat indexes stay on disk
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return faiss.read_index(str(path))


def bm25_tokenize(texts: Sequence[str]):
    import bm25s
    return bm25s.tokenize(list(texts), stopwords="en", show_progress=False)


def _build_bm25(store: PassageStore, folder: Path) -> None:
    try:
        import bm25s
    except ImportError:
        raise ImportError("retriever.encoder='bm25' needs the PyPI package bm25s "
                          "(pip install bm25s)") from None
    contents = store.table.column("contents").to_pylist()
    model = bm25s.BM25()
    model.index(bm25_tokenize(contents), show_progress=False)
    model.save(str(folder))


def ensure_index(corpus_path: str | os.PathLike, index_dir: str | os.PathLike,
                 rcfg: RetrieverConfig, force: bool = False, use_ray: bool = True) -> dict:
    """Build the index unless ``index_dir`` already holds a current one; return its meta."""
    from filelock import FileLock

    folder = Path(index_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".build.lock")):
        reason = "rebuild requested" if force else index_status(folder, corpus_path, rcfg)
        if reason is None:
            log.info("index in %s is current", folder)
            return json.loads((folder / META_FILE).read_text())
        log.info("building the index in %s: %s", folder, reason)
        return build_index(corpus_path, folder, rcfg, use_ray=use_ray)
