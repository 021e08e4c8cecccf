"""The run report: ``report.md`` with the EM table per split and stage, EM per question type and
the wrong→right / right→wrong changes between consecutive stages, timings, and PNG plots of the
reward and EM curves; written from ``state.json`` and the per-question evaluation Parquets
(``eval/<stage>/<split>.parquet``), so it can be regenerated."""

from __future__ import annotations

from pathlib import Path

from searche1_ray.durable import atomic_write, atomic_write_with
from searche1_ray.paired import em_by_type, paired_changes
from searche1_ray.run_state import RunState


def _eval_rows(run_dir: Path, label: str, split: str) -> list[dict] | None:
    path = run_dir / "eval" / label / f"{split}.parquet"
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    cols = [c for c in ("question_id", "em", "type") if c in table.column_names]
    return table.select(cols).to_pylist()


def _by_type_tables(state: RunState, run_dir: Path) -> list[str]:
    """Per split: EM per question type for every evaluated policy, then the paired changes from
    each policy to the next one (same questions, greedy; exact two-sided sign test)."""
    lines: list[str] = []
    splits = sorted({s for v in state.evals.values() for s in v})
    for split in splits:
        loaded = [(lab, rows) for lab in state.evals if (rows := _eval_rows(run_dir, lab, split)) is not None]
        if not loaded:
            continue
        types = {str(r["question_id"]): (r.get("type") or "all") for _, rows in loaded for r in rows}
        kinds = sorted(set(types.values()))
        cols = kinds + (["avg"] if len(kinds) > 1 else [])
        lines += [f"### {split}: EM per question type", "",
                  "| policy | " + " | ".join(cols) + " | n |", "|---|" + "---:|" * (len(cols) + 1)]
        for lab, rows in loaded:
            em = em_by_type(rows, types)
            lines.append(f"| {lab} | " + " | ".join(f"{em[c]:.3f}" if c in em else "–" for c in cols)
                         + f" | {len(rows)} |")
        if len(loaded) > 1:
            lines += ["", f"### {split}: what changed from one policy to the next", "",
                      "| from → to | wrong→right | right→wrong | sign test p | per type (up/down) |",
                      "|---|---:|---:|---:|---|"]
            for (la, a), (lb, b) in zip(loaded, loaded[1:]):
                c = paired_changes(a, b, types)
                lines.append(f"| {la} → {lb} | {c['up']} | {c['down']} | {c['p']:.3g} | "
                             + ", ".join(f"{k} {v['up']}/{v['down']}" for k, v in c["by_type"].items()) + " |")
        lines.append("")
    return lines


def _eval_table(state: RunState) -> list[str]:
    labels = list(state.evals)
    if not labels:
        return ["(no evaluation yet)"]
    splits = sorted({s for v in state.evals.values() for s in v})
    lines = ["| policy | " + " | ".join(f"{s} EM" for s in splits)
             + " | answered (format) | mean searches |",
             "|---|" + "---|" * (len(splits) + 2)]

    def mean(row: dict, key: str, fmt: str) -> str:
        xs = [row[s].get(key) for s in splits if s in row]
        return format(sum(xs) / len(xs), fmt) if xs and None not in xs else "–"

    for label in labels:
        row = state.evals[label]
        ems = [f"{row[s]['em']:.3f}" if s in row else "–" for s in splits]
        lines.append(f"| {label} | " + " | ".join(ems)
                     + f" | {mean(row, 'answered', '.3f')} | {mean(row, 'num_searches', '.2f')} |")
    return lines


def _plot(state: RunState, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    made = []
    steps = [h for h in state.history if "rollout/reward_mean" in h]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        # x = the step's place in the run; GRPO steps as a line, an OPSD round's K-sample pool
        # (its rollouts are not a GRPO step) as its own marker
        kind = [str(h.get("stage") or h.get("key", "")) for h in steps]
        grpo = [(i, h["rollout/reward_mean"]) for i, (h, k) in enumerate(zip(steps, kind), start=1)
                if not k.startswith("opsd")]
        pool = [(i, h["rollout/reward_mean"]) for i, (h, k) in enumerate(zip(steps, kind), start=1)
                if k.startswith("opsd")]
        if grpo:
            ax.plot(*zip(*grpo), marker="o", label="GRPO step (G rollouts per question)")
        if pool:
            ax.plot(*zip(*pool), linestyle="none", marker="*", markersize=12, color="tab:red",
                    label="OPSD pool (K rollouts per question)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step of the run (all cycles)")
        ax.set_ylabel("mean reward (EM)")
        ax.set_title("Rollout reward")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write_with(out / "reward.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        made.append("reward.png")
    if state.evals:
        labels = list(state.evals)
        splits = sorted({s for v in state.evals.values() for s in v})
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for s in splits:
            ax.plot(labels, [state.evals[l].get(s, {}).get("em", float("nan")) for l in labels],
                    marker="o", label=s)
        ax.set_ylabel("exact match")
        ax.set_title("EM after each stage")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write_with(out / "em.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        made.append("em.png")
    return made


def write_report(state: RunState, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    images = _plot(state, run_dir)
    total = sum(state.timings.values())
    lines = [f"# Run `{state.run}`", "",
             f"Status: **{state.status}** — policy version {state.policy_version}, "
             f"{len(state.history)} logged steps, {total / 60:.1f} min of stage time.", "",
             "## Exact match", "", *_eval_table(state), "", *_by_type_tables(state, run_dir),
             "## Time per stage", "", "| stage | seconds |", "|---|---|",
             *[f"| {k} | {v:.0f} |" for k, v in state.timings.items()], ""]
    if images:
        lines += ["## Curves", ""] + [f"![{img[:-4]}]({img})" for img in images] + [""]
    lines += ["Files: `state.json` (schedule and metrics), `config.yaml` (resolved config), "
              "`rollouts/` (Parquet), `tb/` (TensorBoard), `checkpoints/`.", ""]
    return atomic_write(run_dir / "report.md", "\n".join(lines))
