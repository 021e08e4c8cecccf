"""Evaluation as in the paper's Table 1: greedy rollouts per dataset, exact match, the report.

    EM(dataset) = mean_q exact_match(answer_q, golden_answers_q)      (one greedy rollout per q)
    Avg.        = unweighted mean of the per-dataset EMs (the paper's "Avg." column)

Datasets come from one of three layouts (``discover_datasets``):
  * FlashRAG: ``DIR/<name>/test.jsonl``, else ``dev.jsonl`` (the paper's protocol) for the seven
    benchmarks nq, triviaqa, popqa (single-hop) and hotpotqa, 2wikimultihopqa, musique, bamboogle
    (multi-hop);
  * Search-R1's merged test parquet (``test.parquet`` or a ``.parquet`` path), split by
    ``data_source``;
  * the synthetic world (``test.jsonl`` of a world folder), split by ``metadata.type``
    (single_hop | two_hop, comparison, bridge).

``evaluate`` writes into ``out_dir``: ``datasets/<name>.json`` per finished dataset (a rerun
skips them: resumable), ``trajectories/<name>.parquet`` (one row per question), ``eval.json``,
``table.md`` and ``em.png``. The pool is anything with ``generate(questions, n, temperature)``
returning rollout rows (``actors.rollout_worker.RolloutPool``); no Ray import here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from searche1_ray.data.published_layout import MULTI_HOP, SINGLE_HOP
from searche1_ray.durable import atomic_write, atomic_write_with
from searche1_ray.paired import em_by_type, question_types
from searche1_ray.rewards import exact_match

log = logging.getLogger(__name__)

BENCHMARKS = SINGLE_HOP + MULTI_HOP
DISPLAY = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
           "2wikimultihopqa": "2Wiki", "musique": "Musique", "bamboogle": "Bamboogle"}
SYNTHETIC_SINGLE_HOP = ("single_hop",)
SYNTHETIC_MULTI_HOP = ("two_hop", "comparison", "bridge")

# The paper's Search-E1 rows (Table 1). Only what we could read is filled in: the stored copy of
# arXiv 2605.22511v2 available to us shows the abstract only, which states the 3B average EM
# (0.440). Per-dataset cells and the 7B row are None until someone copies them from the paper.
PAPER_ROWS: list[dict[str, Any]] = [
    {"label": "Search-E1 (paper, Qwen2.5-3B)", "source": "arXiv 2605.22511v2, abstract",
     "em": {}, "average": 0.440},
    {"label": "Search-E1 (paper, Qwen2.5-7B)", "source": "not available to us: placeholder",
     "em": {}, "average": None},
]

TRAJECTORY_COLUMNS = ("question_id", "dataset", "question", "golden_answers", "answer", "em",
                      "reward", "num_searches", "queries", "response", "response_tokens",
                      "finish_reason", "policy_version")


@dataclass
class EvalDataset:
    name: str
    group: str                 # "single-hop" | "multi-hop" | "other"
    source: str                # the file it was read from
    questions: list[dict]      # rows of read_qa: id, question, golden_answers, metadata, data_source


def group_of(name: str) -> str:
    if name in SINGLE_HOP or name in SYNTHETIC_SINGLE_HOP:
        return "single-hop"
    if name in MULTI_HOP or name in SYNTHETIC_MULTI_HOP:
        return "multi-hop"
    return "other"


def _order(names: Iterable[str]) -> list[str]:
    known = BENCHMARKS + SYNTHETIC_SINGLE_HOP + SYNTHETIC_MULTI_HOP
    names = list(dict.fromkeys(names))
    return [n for n in known if n in names] + sorted(n for n in names if n not in known)


# --- discovery -----------------------------------------------------------------------------

def _split_by(rows: list[dict], key) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _read_search_r1_merged(path: Path) -> dict[str, list[dict]]:
    """Search-R1's merged test parquet, split by data_source. Its ``id`` values (FlashRAG's
    ``test_0``…) repeat across sources; ``read_qa`` keys such rows ``<data_source>/<id>``."""
    from searche1_ray.data.readers import read_qa

    return _split_by(read_qa(path), lambda r: r["data_source"])


def _flashrag_file(folder: Path) -> Path | None:
    for split in ("test", "dev"):
        for suffix in (".jsonl", ".jsonl.gz"):
            p = folder / f"{split}{suffix}"
            if p.is_file():
                return p
    return None


def discover_datasets(path: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, EvalDataset]:
    """Find the evaluation datasets under ``path`` (see the module docstring for the layouts),
    ordered as in Table 1. ``names`` keeps only those datasets (each must exist)."""
    from searche1_ray.data.readers import read_qa

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"eval: no such data path {p}")
    found: dict[str, tuple[str, list[dict]]] = {}
    if p.is_file() and p.name.endswith(".parquet"):
        found = {k: (str(p), v) for k, v in _read_search_r1_merged(p).items()}
    elif p.is_file():
        rows = read_qa(p)
        if rows and all(isinstance(r["metadata"].get("type"), str) for r in rows):
            found = {k: (str(p), v) for k, v in _split_by(rows, lambda r: r["metadata"]["type"]).items()}
        else:
            found = {k: (str(p), v) for k, v in _split_by(rows, lambda r: r["data_source"]).items()}
    else:
        wanted = list(names) if names else None
        candidates = [d for d in sorted(p.iterdir()) if d.is_dir()
                      and (d.name in BENCHMARKS or (wanted and d.name in wanted))]
        for d in candidates:
            f = _flashrag_file(d)
            if f is not None:
                found[d.name] = (str(f), read_qa(f, data_source=d.name))
        if not found:
            for split in ("test", "dev"):
                if (p / f"{split}.parquet").is_file():
                    return discover_datasets(p / f"{split}.parquet", names)
            for split in ("test", "dev"):
                if (p / f"{split}.jsonl").is_file():
                    return discover_datasets(p / f"{split}.jsonl", names)
    if not found:
        raise FileNotFoundError(
            f"eval: no datasets found in {p}. Expected one of: FlashRAG folders "
            f"{p}/<name>/test.jsonl (or dev.jsonl) for {', '.join(BENCHMARKS)}; Search-R1's "
            f"merged {p}/test.parquet; a synthetic world folder with test.jsonl")
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise FileNotFoundError(f"eval: dataset(s) {', '.join(missing)} not found in {p}; "
                                    f"found: {', '.join(_order(found))}")
        found = {n: found[n] for n in names}
    return {n: EvalDataset(n, group_of(n), found[n][0], found[n][1]) for n in _order(found)}


# --- running -------------------------------------------------------------------------------

def _trajectory_row(row: dict, question: dict, dataset: str, qtype: str = "") -> dict:
    golden = list(question["golden_answers"])
    return {"question_id": str(question["id"]), "dataset": dataset, "type": qtype,
            "question": question["question"],
            "golden_answers": golden, "answer": row.get("answer"),
            "em": exact_match(row.get("answer"), golden), "reward": float(row.get("reward", 0.0)),
            "num_searches": int(row.get("num_searches", 0)), "queries": list(row.get("queries") or []),
            "response": row.get("response", ""), "response_tokens": len(row.get("response_ids") or []),
            "finish_reason": str(row.get("finish_reason", "")),
            "policy_version": int(row.get("policy_version", 0))}


def _write_trajectories(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("question_id", pa.string()), ("dataset", pa.string()),
                        ("type", pa.string()),  # metadata.type of the question ("" if none)
                        ("question", pa.string()),
                        ("golden_answers", pa.list_(pa.string())), ("answer", pa.string()),
                        ("em", pa.float64()), ("reward", pa.float64()), ("num_searches", pa.int64()),
                        ("queries", pa.list_(pa.string())), ("response", pa.string()),
                        ("response_tokens", pa.int64()), ("finish_reason", pa.string()),
                        ("policy_version", pa.int64())])
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))


def evaluate_split(pool: Any, questions: Sequence[dict], out_path: str | os.PathLike | None,
                   temperature: float = 0.0, batch_size: int = 32, desc: str = "eval",
                   dataset: str = "", progress: bool = True) -> dict[str, Any]:
    """One greedy rollout per question through ``pool``; returns ``{"em", "n", "num_searches",
    "seconds", "questions_per_s", ...}`` and writes the per-question Parquet to ``out_path``."""
    from tqdm.auto import tqdm

    qs = [{"id": str(q["id"]), "question": q["question"], "golden_answers": list(q["golden_answers"])}
          for q in questions]
    by_id = {q["id"]: q for q in qs}
    # a question's type: metadata.type (the synthetic world), else its data_source when the split
    # mixes sources (Search-R1's merged test set), so the report's per-type table and ``avg`` are
    # the paper's per-dataset columns and their unweighted mean
    types = question_types(questions, default="")
    sources = {str(q["id"]): str(q.get("data_source") or "") for q in questions}
    if len(set(sources.values())) > 1:
        types = {k: v or sources[k] for k, v in types.items()}
    out_rows: list[dict] = []
    t0 = time.time()
    bar = tqdm(total=len(qs), desc=desc, unit="q", disable=not progress, leave=False)
    try:
        for start in range(0, len(qs), max(1, batch_size)):
            chunk = qs[start:start + batch_size]
            rows = pool.generate(chunk, n=1, temperature=temperature)
            got = {str(r["question_id"]): r for r in rows}
            missing = [q["id"] for q in chunk if q["id"] not in got]
            if missing:
                raise RuntimeError(f"eval: the rollout pool returned no row for question(s) "
                                   f"{missing[:5]} of {dataset or desc}")
            out_rows.extend(_trajectory_row(got[q["id"]], by_id[q["id"]], dataset, types[q["id"]]) for q in chunk)
            bar.update(len(chunk))
            if out_rows:
                bar.set_postfix(em=f"{sum(r['em'] for r in out_rows) / len(out_rows):.3f}")
    finally:
        bar.close()
    seconds = time.time() - t0
    if out_path is not None:
        _write_trajectories(out_rows, Path(out_path))
    n = len(out_rows)
    by_type = em_by_type(out_rows, {k: v or "all" for k, v in types.items()}) if n else {}
    extra = ({"avg": by_type["avg"], "by_type": {k: v for k, v in by_type.items() if k not in ("avg", "overall")}}
             if len(by_type) > 3 else {})   # more than one type: their unweighted mean (the paper's Avg.)
    return {"em": sum(r["em"] for r in out_rows) / n if n else 0.0, "n": n, **extra,
            "num_searches": sum(r["num_searches"] for r in out_rows) / n if n else 0.0,
            "answered": sum(r["answer"] is not None for r in out_rows) / n if n else 0.0,
            "response_tokens": sum(r["response_tokens"] for r in out_rows) / n if n else 0.0,
            "seconds": seconds, "questions_per_s": n / seconds if seconds > 0 else 0.0}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _eval_batch_size(cfg: Any, pool: Any) -> int:
    workers = getattr(pool, "num_workers", None) or cfg.rollout.num_workers or 1
    return max(1, cfg.rollout.questions_per_batch * workers)


def _as_datasets(datasets: dict[str, EvalDataset] | dict[str, list[dict]]) -> dict[str, EvalDataset]:
    return {n: d if isinstance(d, EvalDataset) else EvalDataset(n, group_of(n), "", list(d))
            for n, d in datasets.items()}


def _done(out: Path, name: str, n: int, model: str) -> dict | None:
    """The saved result of ``name`` when it is for the same model and question count."""
    f = out / "datasets" / f"{_slug(name)}.json"
    if not f.is_file():
        return None
    try:
        prev = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    if prev.get("n") == n and prev.get("model", "") == model:
        return prev
    log.warning("eval: %s will be redone: the saved result is for %s questions of model %r",
                name, prev.get("n"), prev.get("model"))
    return None


def pending(datasets: dict[str, EvalDataset] | dict[str, list[dict]], out_dir: str | os.PathLike,
            limit: int = 0, model: str = "") -> list[str]:
    """Names of the datasets ``evaluate`` would still run (the others are done in ``out_dir``)."""
    out = Path(out_dir)
    return [n for n, d in _as_datasets(datasets).items()
            if _done(out, n, len(d.questions[:limit] if limit else d.questions), model) is None]


def evaluate(cfg: Any, pool: Any, datasets: dict[str, EvalDataset] | dict[str, list[dict]],
             out_dir: str | os.PathLike, limit: int = 0, model: str = "", progress: bool = True,
             paper_rows: list[dict] | None = None) -> dict[str, Any]:
    """Evaluate every dataset (first ``limit`` questions each; 0 = all) and write the report.

    A dataset whose ``datasets/<name>.json`` already exists for the same model and question
    count is not run again (``pool`` may be None when nothing is pending). Returns the
    content of ``eval.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = _as_datasets(datasets)
    temperature = cfg.eval.temperature
    results: dict[str, dict] = {}
    for i, (name, ds) in enumerate(sets.items()):
        qs = ds.questions[:limit] if limit else ds.questions
        prev = _done(out, name, len(qs), model)
        if prev is not None:
            log.info("eval: %s already done (EM %.3f on %d questions), skipped", name, prev["em"], prev["n"])
            results[name] = prev
            continue
        if pool is None:
            raise ValueError(f"eval: {name} is not done in {out} and no rollout pool was given")
        log.info("eval: %s (%d/%d): %d questions from %s", name, i + 1, len(sets), len(qs), ds.source or "memory")
        r = evaluate_split(pool, qs, out / "trajectories" / f"{_slug(name)}.parquet", temperature=temperature,
                           batch_size=_eval_batch_size(cfg, pool), desc=f"{name} ({i + 1}/{len(sets)})",
                           dataset=name, progress=progress)
        r.update({"dataset": name, "group": ds.group, "source": ds.source, "model": model,
                  "temperature": temperature})
        atomic_write(out / "datasets" / f"{_slug(name)}.json", json.dumps(r, indent=2))
        log.info("eval: %s EM %.3f, %.2f searches, %.2f questions/s", name, r["em"], r["num_searches"],
                 r["questions_per_s"])
        results[name] = r
    summary = summarize(results, model=model, limit=limit)
    write_report(summary, out, paper_rows=paper_rows)
    return summary


# --- summary and report --------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(results: dict[str, dict], model: str = "", limit: int = 0) -> dict[str, Any]:
    """The content of ``eval.json`` from per-dataset results (each with em, n, num_searches,
    seconds; group optional)."""
    names = _order(results)
    ems = {n: results[n]["em"] for n in names}
    groups = {n: results[n].get("group") or group_of(n) for n in names}
    n_total = sum(results[n]["n"] for n in names)
    seconds = sum(results[n].get("seconds", 0.0) for n in names)
    return {
        "model": model, "limit": limit, "datasets": {n: results[n] for n in names},
        "average": _mean(list(ems.values())),
        "single_hop_average": _mean([ems[n] for n in names if groups[n] == "single-hop"]),
        "multi_hop_average": _mean([ems[n] for n in names if groups[n] == "multi-hop"]),
        "micro_em": (sum(results[n]["em"] * results[n]["n"] for n in names) / n_total) if n_total else None,
        "num_searches": (sum(results[n]["num_searches"] * results[n]["n"] for n in names) / n_total)
        if n_total else None,
        "questions": n_total, "seconds": seconds,
        "questions_per_s": n_total / seconds if seconds > 0 else None,
        "paper_reference": PAPER_ROWS if _is_benchmark(names) else [],
    }


def _is_benchmark(names: Iterable[str]) -> bool:
    return any(n in BENCHMARKS for n in names)


def _cell(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def markdown_table(summary: dict[str, Any], paper_rows: list[dict] | None = None, label: str = "") -> str:
    """Table 1's layout: single-hop columns | multi-hop columns | Avg., our row first, then the
    paper's Search-E1 rows (benchmarks only), then per-dataset details."""
    results = summary["datasets"]
    names = _order(results)
    single = [n for n in names if (results[n].get("group") or group_of(n)) == "single-hop"]
    multi = [n for n in names if (results[n].get("group") or group_of(n)) == "multi-hop"]
    other = [n for n in names if n not in single and n not in multi]
    cols = single + multi + other
    benchmark = _is_benchmark(cols)
    if benchmark:  # keep the paper's seven columns even when only some were evaluated
        cols = list(SINGLE_HOP) + list(MULTI_HOP) + other
        single, multi = list(SINGLE_HOP), list(MULTI_HOP)
    head = [DISPLAY.get(n, n) for n in cols]
    ours = label or f"ours ({Path(summary.get('model') or 'model').name})"
    lines = ["Exact match (EM). "
             + (f"Single-hop: {', '.join(DISPLAY.get(n, n) for n in single)}" if single else "")
             + (" | " if single and multi else "")
             + (f"Multi-hop: {', '.join(DISPLAY.get(n, n) for n in multi)}" if multi else "")
             + " | Avg. = unweighted mean over the evaluated datasets.", "",
             "| Method | " + " | ".join(head) + " | Avg. |",
             "|---|" + "---:|" * (len(cols) + 1)]
    lines.append(f"| {ours} | " + " | ".join(_cell(results[n]["em"]) if n in results else "—" for n in cols)
                 + f" | {_cell(summary.get('average'))} |")
    notes = []
    if benchmark:
        for row in (paper_rows if paper_rows is not None else PAPER_ROWS):
            em = row.get("em") or {}
            lines.append(f"| {row['label']} | " + " | ".join(_cell(em.get(n)) for n in cols)
                         + f" | {_cell(row.get('average'))} |")
            notes.append(f"{row['label']}: {row.get('source', '')}")
        notes.append("— = not available: the paper's per-dataset numbers were not in the stored copy of "
                     "arXiv 2605.22511 we could read (abstract only); fill PAPER_ROWS in "
                     "searche1_ray/evaluation.py from the paper's Table 1. Never guessed.")
        if len([n for n in BENCHMARKS if n in results]) < len(BENCHMARKS):
            notes.append("Our Avg. covers only the datasets evaluated here, so it is not comparable "
                         "with the paper's seven-dataset Avg.")
    else:
        notes.append("Synthetic world (or non-benchmark data): the paper's rows do not apply.")
    if summary.get("limit"):
        notes.append(f"--limit {summary['limit']}: the first {summary['limit']} questions of each dataset.")
    lines += [""] + [f"- {n}" for n in notes] + ["", "| dataset | group | questions | EM | mean searches | "
                                                   "answered | questions/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for n in names:
        r = results[n]
        lines.append(f"| {DISPLAY.get(n, n)} | {r.get('group') or group_of(n)} | {r['n']} | {r['em']:.3f} | "
                     f"{r['num_searches']:.2f} | {r.get('answered', float('nan')):.2f} | "
                     f"{r.get('questions_per_s') or 0:.2f} |")
    lines.append(f"| all | | {summary['questions']} | {_cell(summary.get('micro_em'))} (micro) | "
                 f"{(summary.get('num_searches') or 0):.2f} | | {(summary.get('questions_per_s') or 0):.2f} |")
    return "\n".join(lines) + "\n"


def plot_em(summary: dict[str, Any], path: str | os.PathLike, paper_rows: list[dict] | None = None) -> Path:
    """Bar chart of EM per dataset and Avg. (ours; the paper's where known)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["datasets"]
    names = _order(results)
    labels = [DISPLAY.get(n, n) for n in names] + ["Avg."]
    ours = [results[n]["em"] for n in names] + [summary.get("average") or 0.0]
    series = [(f"ours ({Path(summary.get('model') or 'model').name})", ours)]
    if _is_benchmark(names):
        for row in (paper_rows if paper_rows is not None else PAPER_ROWS):
            em = row.get("em") or {}
            vals = [em.get(n) for n in names] + [row.get("average")]
            if any(v is not None for v in vals):
                series.append((row["label"], [math.nan if v is None else v for v in vals]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.4))
    for k, (name, vals) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, vals, width=width, label=name)
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, max(0.05, max((v for _, vs in series for v in vs if not math.isnan(v)), default=0) * 1.2))
    ax.set_title("EM per dataset")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def write_report(summary: dict[str, Any], out_dir: str | os.PathLike, paper_rows: list[dict] | None = None) -> dict[str, Path]:
    """``eval.json``, ``table.md`` and ``em.png`` in ``out_dir``."""
    out = Path(out_dir)
    paths = {"json": out / "eval.json", "table": out / "table.md", "plot": out / "em.png"}
    atomic_write(paths["json"], json.dumps(summary, indent=2))
    atomic_write(paths["table"], markdown_table(summary, paper_rows))
    plot_em(summary, paths["plot"], paper_rows)
    return paths
