"""Generate the seeded synthetic world (wiki-18 corpus + FlashRAG QA splits) into a directory.

    python -m jobs.make_world --out data/world [--seed 0] [--num-questions 1000]

Writes corpus.jsonl, train.jsonl, dev.jsonl, test.jsonl and world.json (seed, sizes, counts
per type and split); ``--parquet`` also writes Search-R1 style train/dev/test.parquet;
``--published`` also writes the world in the real data's published layout (wiki-18.jsonl,
nq_hotpotqa_train/{train,test}.parquet, flashrag/<benchmark>/test.jsonl: see
searche1_ray/data/published_layout.py) to rehearse the paper configs. The same seed and sizes
always give byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from searche1_ray.data.published_layout import write_published_layout
from searche1_ray.data.readers import search_r1_rows, write_parquet
from searche1_ray.data.world import QUESTION_TYPES, SPLITS, generate_world

log = logging.getLogger("make_world")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.make_world",
        description="Generate the seeded synthetic world: a fictional wiki-18 corpus (one "
                    "passage per entity plus look-alike distractors) and single-hop, two-hop, "
                    "comparison and bridge questions split into train/dev/test.",
        epilog="example: python -m jobs.make_world --out data/world --seed 0 --num-questions 1000",
    )
    p.add_argument("--out", required=True, type=Path,
                   help="directory to write corpus.jsonl, {train,dev,test}.jsonl and world.json "
                        "into (created if missing; existing files are replaced)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--num-questions", type=int, default=1000,
                   help="questions over all splits (default: 1000; split 70/10/20)")
    p.add_argument("--num-entities", type=int, default=None,
                   help="entities (people, places, organisations, works); default: "
                        "max(60, 1.2 x num-questions)")
    p.add_argument("--distractor-ratio", type=float, default=2 / 3,
                   help="distractor passages per entity passage (default: 0.667)")
    p.add_argument("--parquet", action="store_true",
                   help="also write Search-R1 style {train,dev,test}.parquet")
    p.add_argument("--published", action="store_true",
                   help="also write the world as the real data is published: wiki-18.jsonl, Search-R1's "
                        "merged nq_hotpotqa_train/{train,test}.parquet (ids repeat across sources) and "
                        "FlashRAG's flashrag/<benchmark>/test.jsonl for the seven benchmarks")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_questions < 1:
        parser.error(f"--num-questions must be >= 1, got {args.num_questions}")
    if args.num_entities is not None and args.num_entities < 60:
        parser.error(f"--num-entities must be >= 60, got {args.num_entities}")
    if args.distractor_ratio < 0:
        parser.error(f"--distractor-ratio must be >= 0, got {args.distractor_ratio}")

    t0 = time.perf_counter()
    try:
        world = generate_world(args.seed, num_questions=args.num_questions,
                               num_entities=args.num_entities,
                               distractor_ratio=args.distractor_ratio)
    except ValueError as e:
        parser.error(str(e))
    gen_s = time.perf_counter() - t0
    try:
        world.write(args.out)
        if args.parquet:
            for split in SPLITS:
                write_parquet(search_r1_rows(world.splits[split], split), args.out / f"{split}.parquet")
        if args.published:
            paths = write_published_layout(world, args.out)
            log.info("published layout: %s", ", ".join(f"{k} {v}" for k, v in paths.items()))
    except OSError as e:
        print(f"make_world: cannot write the world to {args.out}: {e.strerror or e}. "
              f"Pass a writable directory with --out.", file=sys.stderr)
        return 2

    info = world.info
    log.info("world seed=%d: %d passages (%d entities, %d distractors), %d questions; "
             "generated in %.2fs, written to %s", world.seed, info["num_passages"],
             info["num_entity_passages"], info["num_distractor_passages"], info["num_questions"],
             gen_s, args.out)
    log.info("passages per kind: %s", ", ".join(f"{k}={v}" for k, v in
                                                info["passages_per_kind"].items()))
    header = f"{'split':<6}" + "".join(f"{t:>12}" for t in QUESTION_TYPES) + f"{'total':>8}"
    log.info("questions per split and type:\n%s", "\n".join(
        [header] + [f"{s:<6}" + "".join(f"{info['questions_per_split_type'][s].get(t, 0):>12}"
                                        for t in QUESTION_TYPES)
                    + f"{info['questions_per_split'][s]:>8}" for s in SPLITS]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
