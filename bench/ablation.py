"""The Search-E1 ablation at testbed scale: does OPSD add on top of GRPO? Paired, over several draws.

    python -m bench.ablation                    # 3 draws (resumable; see the estimate below)
    python -m bench.ablation --draws 1          # a quick look
    python -m bench.ablation --draws 1 --set opsd.lr=3e-4   # reruns G+O only: G, G+G are reused
    python -m bench.ablation --draws 1 --first-draw 1 --include bench/results/ablation \
        --archive bench/results/ablation                      # add draw 1 to the archived draw 0

From one cached warm start (SFT on oracle trajectories, as bench/grpo_learning.py; cached under
~/.cache/searche1_ray/warmstart/<hash of its settings>), per draw d (a sample seed: which training
questions each step draws, the rollouts' sampling seeds, which questions feed the OPSD pool):

    G     the warm start + --grpo-steps GRPO steps                       (searche1_ray/grpo_round.py)
    G+O   G's final policy + one OPSD round: K rollouts of --opsd-questions training questions,
          pairs mined, LoRA self-distillation, the best-validation-EM checkpoint kept
          (validation = the first --dev dev questions; training/opsd_round.py)
    G+G   G's final policy + as many more GRPO steps as the OPSD pool has rollouts
          (equal rollout budget: ceil(opsd questions x K / (questions per step x G)))

Every arm and the warm start are scored greedily on the same --eval held-out test questions
(never trained on, never validated on), per question type and overall. The report (printed and
written to runs/<name>/ablation.md with ablation.png) has: a table like the paper's Table 1
(rows: warm start, G, G+O, G+G; columns: the question types, their unweighted average; mean ±
sd over draws), and per comparison the wrong→right / right→wrong counts pooled over draws with
an exact two-sided sign test (searche1_ray/paired.py), the OPSD diagnostics (pairs per type, KL
first → last step, clip fraction, kept step, greedy answers changed) and the wall-clock of each arm.
The last three lines are the means over draws, in EM points:

    grpo_gain=<G − warm start>  opsd_gain_over_grpo=<G+O − G>  opsd_vs_more_grpo=<G+O − G+G>

Resumable per arm: an arm lives in runs/<name>/draw<d>/<arm>-<hash of the settings it depends
on>; one whose ``arm.json`` exists is read back, an unfinished one is rerun from its start (a
crash costs one arm). A sweep of an OPSD lever (``--set opsd.lr=…``) therefore reruns only G+O
and reuses the draws' G and G+G. Step counts are fixed, never cut by a wall-clock budget.

Draws across sessions: a draw needs its warm start and G's checkpoint, so it is run whole in one
go, but its report needs only the answers. ``--archive DIR`` copies what the report reads
(arm.json, the test and validation parquets: ~1 MB a draw) and ``--include DIR`` reads such an
archive back, so draws run in different sessions (or on different machines) pool into one report.
Each draw carries its own warm start's evaluation (draw<d>/warm-<key>) and every comparison is
paired within a draw, so a draw whose warm start was trained on another machine (bf16 here, fp32
there) is still a fair draw; the table's "mean ± sd over draws" then also spans that. The
project's own draws are archived in bench/results/ablation/ (what the closing notes quote).

Time, measured 2026-12-08 (AVX512-BF16 EPYC, 2 cores, bf16; --draws 1 with the defaults, nothing
else running): 91.4 min in all — warm start 20 min (38 steps of 8, 26-40 s each), its index 1 min,
test evaluation 300 questions 5-6.5 min per policy (1.0-1.3 s a question), G 8 GRPO steps 22 min
(109-192 s a step: rollout 40-58 s, train 68-139 s), G+O 14 min (pool of 160 rollouts 129 s, dev
validation 100 questions 98-141 s x 3, LoRA steps 28-50 s), G+G 4 steps 10 min. So ~63 min a
draw after the warm start: the 3-draw defaults take ~3.5 h on this kind of machine, over the
issue's 150 min; one draw a session, pooled with --archive / --include, is what fits.

Earlier estimate, from the per-step figures measured on 2026-12-07 (AVX2 EPYC, 2 cores, fp32; not a
timed run of the defaults): the warm start ~31 min once (cached), greedy evaluation ~2.3-3.3 s per
question (300 questions: 12-16 min per arm), a GRPO step of 8 questions ~4.8 min. Per draw: G ~38 min
+ eval, G+O ~20 min + eval, G+G 4 steps ~19 min + eval: ~2 h a draw, ~6-7 h for the defaults.
The session-13 quick look (--draws 1 --eval 120 --dev 60 --grpo-steps 3) is ~1 h a draw once warm.

Memory: on a 24 GiB machine run nothing else beside it. 2026-12-07 (AVX2 EPYC, fp32): with
train.micro_batch_size=2 the G arm peaked at ~24 GB (train ranks 6.5 + 5.9 GB, vLLM worker 5.1 GB,
Serve + the bench process the rest) and Ray's memory monitor killed a train rank in GRPO step 3;
the bench now trains one sequence per micro-batch.

What each lever did (record here; EM points on the --eval questions):
  - 2026-12-06, an AVX2-only EPYC (fp32; ~2-3x slower than the AMX machines of earlier sessions),
    a reduced quick look that fit the session: --draws 1 --eval 60 --dev 24 --grpo-steps 3,
    warm start 48 examples at lr 2e-4, OPSD pool 12 questions x K=5, 4 LoRA steps at opsd.lr 5e-4
    (36.6 min in all; warm start 331 s, G 622 + 93 s eval, G+O 459 + 80, G+G 321 + 95).
    Test EM (type average): warm start 12.7, G 19.6 (7 up / 3 down, p=0.34), G+O 19.6, G+G 25.2.
    OPSD: 7 pairs (6 incorrect students; single_hop 5 of them), KL 0.127 -> 0.059 (clip fraction
    2e-8: tau_clip never binds), dev EM 0.542 -> 0.500 -> 0.500 on 24 questions, so validation
    kept step 0 and G+O = G (no test answer changed). At lr 1e-4 (earlier smoke runs) the KL had
    not moved at all (0.109 -> 0.108); 5e-4 moves it but 7 pairs are too few to generalise.
    Budget note: G+G ran 2 whole GRPO steps = 80 rollouts against the OPSD pool's 60.
    Same run, OPSD lever only (G, G+G reused): opsd.lr 1e-3, 8 steps, validation every 4: the
    pool drew 10 pairs this time (the CPU engine drops per-request seeds, so pools differ between
    runs), KL 0.101 -> 0.039, dev EM 0.542 -> 0.417 -> 0.417: distilling towards the teacher
    cost 3 of 24 dev questions; validation again kept step 0 (G+O = G). 11.7 min in all.
  - 2026-12-07, same machine and settings (G, G+G reused), lever opsd.action_weight=10 (the
    student's query and answer tokens weigh 10x in each trajectory's mean: bench/opsd_signal.py
    had found 0.2 % of the KL on the answer while the teacher's golden-answer log-prob led the
    student's by +1.4 nats/token), opsd.lr 5e-4, 4 steps: 9 pairs (6 incorrect students), KL
    0.117 -> 0.047, dev EM 0.542 -> 0.500 -> 0.458: worse than the paper weighting at the same
    lr (0.500 at step 4); validation kept step 0 (G+O = G). 11 min.
  - 2026-12-07, same, lever opsd.questions_per_round=48 (paper weighting, lr 5e-4, 4 steps of 8
    pairs): 240 pool rollouts in 376 s (reward 0.317), 32 pairs (28 incorrect students, 16
    questions without a correct rollout), KL 0.295 -> 0.175 -> 0.102 -> 0.152 (a new batch each
    step), clip fraction ~1e-7, dev EM 0.542 -> 0.500 -> 0.500; validation kept step 0. Stopped
    after the OPSD round (G+G would have rerun for the larger budget). 14 min.
  - 2026-12-07 (session 12), same machine, nothing else running after the first 20 min:
    --draws 1 --eval 120 --dev 60 --grpo-steps 3, warm start 48 examples at lr 2e-4, OPSD pool
    48 questions x K=5, 16 LoRA steps of 8 pairs at opsd.lr 2e-4, validation every 4 steps.
    72 min in all (G 889 s train + 147 s eval, G+O 1720 + 180, G+G 816 + 148; GRPO steps took
    340-357 s while tests ran beside them, 106-153 s alone). Test EM (type average / overall):
    warm start 16.7 / 20.0, G 21.3 / 26.7, G+O 23.7 / 29.2, G+G 31.4 / 35.8.
    The first OPSD round that raised held-out EM: 30 pairs (24 incorrect students; 18 of 48
    questions without a correct rollout), KL 0.186 -> 0.070, clip fraction 5e-8, dev EM
    0.350 -> 0.333 -> 0.350 -> 0.383 -> 0.400 (steps 0-16; still rising), kept step 16; on the
    test questions G+O vs G 7 up / 4 down (p = 0.55), 43 greedy answers changed. But equal-budget
    GRPO did more: G+G vs G 14 up / 3 down (p = 0.013), G+O vs G+G 3 / 11 (p = 0.057).
    GRPO drives the multi-hop types to 0: bridge 17.9 -> 0.0 and two_hop 10.0 -> 0.0 after three
    steps (single_hop 39.0 -> 70.7, comparison 0 -> 14.3); searches per question stay ~1.0, so
    the policy answers after one search, which cannot reach a two-hop answer. OPSD did not bring
    them back (pairs: bridge 2 of 10 questions, two_hop 3 of 12 — the pool rarely has a correct
    multi-hop rollout to teach from). grpo_gain=4.5 opsd_gain_over_grpo=2.4 opsd_vs_more_grpo=-7.8.
    Same settings + grpo.loss_agg=seq_mean (G arm only): test EM 0.308 vs 0.267 (10 up / 5 down),
    bridge 7 % and two_hop 3 % instead of 0, greedy searches ~1.1; one-search rollouts 14 -> 27 -> 29
    of 40 over the three steps (token_mean 14 -> 31 -> 29): it slows the collapse, not stops it.
  - 2026-12-07 (session 13), same warm start, G arm only, seq_mean + grpo.kl_coef=0.001 +
    grpo.questions_per_step=16 + grpo.warmup_steps=3 (lr 1e-5, 2e-5, 3e-5: Adam's first update is
    ~lr x sign(grad) on every weight, the largest move of a round, and at 8 questions it followed
    3 groups): steps 581 / 423 / 369 s. Mean searches per rollout, step 0 -> 1 -> 2: single_hop
    2.06 -> 1.73 -> 1.08, multi-hop 1.64 -> 1.47 -> 1.09, comparison 2.25 -> 1.60 -> 1.35; rollout
    reward on multi-hop 0.04 / 0.07 / 0.03 (T = 0.7). Test EM 29.2 overall (avg 23.7; 21 up / 10
    down vs the warm start, p = 0.071): single_hop 75.6, comparison 19.0, bridge 0.0, two_hop 0.0,
    greedy searches 1.0. The collapse is not an lr or batch effect: multi-hop rollouts of this warm
    start are almost never right, so GRPO has no multi-hop signal, while single-hop groups reward
    answering after the first search (the warm start searched 1.85 times on single-hop questions).
  - 2026-12-07 (session 13), the bench's own warm start (no warmstart.* overrides: 300 oracle
    trajectories, lr 1e-4, batch 8; 38 steps in 31 min here, loss 0.87 -> 0.07): test EM 60.8
    overall (bridge 71.4, comparison 61.9, single_hop 70.7, two_hop 36.7; searches 1.5-2.2) against
    20.0 for the 48-example warm start above. Its rollouts carry signal: GRPO groups with a reward
    spread 75 / 75 / 62 % (38-44 % before), multi-hop rollout reward 0.20 -> 0.27 -> 0.67 over the
    three steps, searches stay 1.7-1.9: no collapse. But at the GRPO settings above (lr 3e-5, no KL,
    8 questions per step, 3 steps of 270-321 s) the greedy policy got worse: test EM 60.8 -> 48.3
    (14 up / 29 down, p = 0.032), single_hop 70.7 -> 46.3 with searches 1.49 -> 2.02, two_hop
    36.7 -> 26.7, bridge 71.4 -> 75.0. Three sign-like Adam updates of 3e-5 knock a sharp SFT
    optimum off; the lr that worked from the weak warm start is too large for a strong one.
    Same, grpo.lr=1e-5 (now the bench's default; steps 272 / 288 / 289 s): rollout reward on
    multi-hop 0.20 -> 0.47 -> 0.80, searches 1.5-1.9. Test EM 60.8 -> 62.5 overall (13 up / 11
    down, p = 0.84), type average 60.2 -> 64.3: two_hop 36.7 -> 53.3, comparison 61.9 -> 76.2,
    bridge 71.4 -> 71.4, but single_hop 70.7 -> 56.1 (searches 1.49 -> 1.80). Multi-hop learns,
    single-hop pays: one draw, not a result. Stopped after G's evaluation (G+O, G+G not run).
  - 2026-12-07 (session 14), G+O on that G (lr 1e-5), --set opsd.questions_per_round=48
    opsd.steps=16 opsd.lr=2e-4 opsd.eval_every=4, nothing else running: 240 pool rollouts in 648 s
    (reward 0.500), 44 pairs of 48 questions (40 incorrect students, 4 correct fallbacks, 4
    questions without a correct rollout), LoRA steps 55-79 s, KL 0.10-0.14 -> 0.06-0.14 (a new
    batch each step; clip fraction ~5e-8). Dev EM by step 0/4/8/12/16: 0.617 / 0.483 / 0.283 /
    0.350 / 0.533, searches 1.83 / 1.35 / 1.07 / 1.25 / 1.50, and dev answers *named before the
    first search* 0 / 1 / 15 / 13 / 2 of 60 — every one of them wrong. Validation kept step 0, so
    G+O = G (test EM 62.5 again). Where it fails: the teacher has read the reference, so at the
    student's first thought (nothing retrieved yet) it already predicts the answer and prefers
    fewer searches; distilling that teaches the 135M student to state an answer it cannot know
    ("The Pilgrim of Raven was recorded by ... Tina Turner", then search, then answer its own
    guess) and to stop searching. The round partly recovers by step 16 (2 guesses, EM 0.533).
    G+G (6 more GRPO steps at lr 1e-5 = the pool's 240 rollouts; 232-543 s a step, the slow ones
    beside a bench.opsd_signal run): test EM 61.7 overall, type average 59.3 (G 64.3): single_hop
    56.1 -> 78.0 (11 up / 2 down) but comparison 76.2 -> 47.6 (0 / 6) and two_hop 53.3 -> 40.0
    (3 / 7); G+G vs G 15 up / 16 down. At 8 questions a step GRPO moves EM between the types
    step to step (what it rewards depends on the 2 questions of each type drawn) and the sum
    stays flat: grpo_gain +4.1, opsd_gain_over_grpo 0.0, opsd_vs_more_grpo +5.0 on one draw of
    120 questions, none of them significant (sign tests p = 0.84, 1, 1). 92 min in all.
    Same, OPSD lever opsd.action_weight=1e6 (the loss is, in effect, the mean over the student's
    query and answer tokens only: no thinking tokens, no search/answer decision tags), 8 steps,
    validation every 4, on the same pool (reused: 44 pairs, identical): KL 0.017 -> 0.002, dev EM
    0.617 -> 0.650 -> 0.650 with 1.83 searches and 0 answers named before searching at every step
    (the leak is gone), kept step 4. But on the test questions G+O vs G: 0 up / 5 down (p = 0.063),
    58.3 overall (comparison 76.2 -> 61.9); 10 greedy answers changed. 2 dev questions of 60 is
    within validation noise: the step it picked did not generalise. 24 min (pool reused).
  - 2026-12-08 (session 15), a new machine kind (AVX512-BF16 EPYC: bf16 training and rollouts),
    nothing cached from earlier sessions, so a new warm start (same settings; test EM 52.7, not
    60.8: another machine's bf16 numerics and draw of noise). The bench's DEFAULTS, --draws 1:
    --grpo-steps 8, --eval 300, --dev 100, OPSD = the paper form (Eq. 7 over every policy token,
    teacher shown the whole reference), opsd.lr 1e-4, 32 pool questions x K=5, 8 LoRA steps.
    Archived in bench/results/ablation/draw0 (python -m bench.ablation --report-only --include
    bench/results/ablation rebuilds the report).

        policy      bridge  comparison  single_hop  two_hop   avg   overall  searches
        warm start   67.6      36.7        62.0       39.2    51.3   52.7     1.87
        G            70.3      40.0        62.0       40.5    53.2   54.3     1.88
        G+O          55.4      35.0        68.5       33.8    48.2   50.0     1.69
        G+G          73.0      36.7        59.8       43.2    53.2   54.3     1.87

    G vs warm start 7 up / 2 down (p = 0.18; no type down): 8 steps at lr 1e-5 change only 9 of
    300 greedy answers, nearly all for the better — GRPO at this lr is safe but slow. G+G vs G
    5 / 5 (p = 1). G+O vs G 11 up / 24 down (p = 0.041): bridge 1/12, two_hop 1/6, comparison
    1/4, single_hop 8/2; G+O vs G+G 12 / 25 (p = 0.047). grpo_gain +1.8, opsd_gain_over_grpo -5.0,
    opsd_vs_more_grpo -5.0. OPSD: 26 pairs of 32 questions (23 incorrect students), KL 0.100 ->
    0.090, clip fraction 3.5e-8, dev EM 0.59 / 0.60 / 0.51 at steps 0 / 4 / 8 with searches
    1.81 / 1.61 / 1.34; validation kept step 4 (+1 dev question: noise) and the test paid 4.3
    points. No answer was named before searching at lr 1e-4 (session 14's leak needed 2e-4 and
    8+ steps); what OPSD taught here is to SEARCH LESS: test searches 1.88 -> 1.69, on every type.
    Why, from pairs.parquet: 12 of the 26 pairs are single-hop (every single-hop question gave a
    pair; 46 % of pairs against 31 % of the test), and their references — the correct rollout
    with the fewest searches, the paper's rule — searched once (11 of 12), while 9 of those 12
    students searched more than their reference (2-3 times). The multi-hop references searched
    twice (two_hop 2-3, bridge 2), i.e. were not lucky shortcuts. So the loudest lesson in the batch is "answer after one search", and the
    135M student applies it to every type: the multi-hop questions that need the second search
    are lost.
    Same draw, lever opsd.student_searches=at_most_reference (only pairs whose student searched
    no more often than its reference; same pool, G and G+G reused; 7.5 min for the round): 12 of
    the 26 pairs kept (single_hop 3, bridge 3, two_hop 5, comparison 1), KL 0.154 -> 0.100, dev
    EM 0.59 / 0.57 / 0.48 at steps 0 / 4 / 8 with searches 1.81 / 1.65 / 1.38 — the same fall
    as with every pair. So the pair mix is not the main cause; what is left points at the
    teacher itself: having read a reference whose <information> blocks hold the facts (Eq. 4),
    it prefers answering to searching at the student's decision points, and distilling it
    teaches the student to search less (not yet measured token by token: bench/opsd_signal.py
    on these pairs would show the teacher's vs the student's probability of "<search>" there).
    Validation kept step 0 (G+O = G). Next levers: the teacher shown the reference without its
    <information> (opsd.teacher_reference=policy_text), or the KL left off the search/answer
    decision tokens; a search agent's teacher must not be better informed than its own actions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.grpo_learning import GRPO_SETTINGS, WARMSTART_SETTINGS  # noqa: E402
from searche1_ray.paired import em_by_type, paired_changes, pooled, question_types  # noqa: E402
from searche1_ray.trajectory import answer_before_search  # noqa: E402

log = logging.getLogger("searche1.bench.ablation")

ABLATION_OVERRIDES = [
    "run.name=ablation",
    "run.dashboard=false",
    # 2,000 questions: test split 400 (the --eval questions), dev 200 (OPSD validation), train 1,400
    "data.world.num_questions=2000",
    # the warm start of bench/grpo_learning.py: 300 oracle trajectories, lr 1e-4, batch 8, 1 epoch
    *WARMSTART_SETTINGS,
    # GRPO as the grpo_learning bench found it learns at this scale: lr 3e-5, 8 questions per step
    # drawn evenly from the 4 types (smoke.yaml's stratify_by), G = 5, T = 0.7, no KL, groups with
    # equal rewards left out (they carry no policy gradient)
    *GRPO_SETTINGS,
    # ... but at lr 1e-5: from this (strong) warm start 3 steps at 3e-5 cut test EM 60.8 -> 48.3,
    # at 1e-5 it went to 62.5 (session 13, draw 0; the docstring's lever list)
    "grpo.lr=1e-5",
    "rollout.questions_per_batch=64",    # greedy evaluation: 64 sequences in flight, not 16
    # one sequence per micro-batch (the same gradient: micro-batches are token-weighted): at 2 the
    # G arm's train ranks reached 6.5 + 5.9 GB beside a 5.1 GB engine and Ray's memory monitor
    # killed a rank at 95 % of 24 GiB in GRPO step 3 (2026-12-07, twice in session 10 as well)
    "train.micro_batch_size=1",
    # OPSD: K = 5 rollouts of 32 questions (= 4 GRPO steps of rollouts), 8 LoRA steps of 8 pairs,
    # validation at steps 0, 4, 8 on the --dev questions
    "opsd.samples_per_question=5", "opsd.questions_per_round=32", "opsd.steps=8", "opsd.batch_size=8",
    "opsd.eval_every=4", "opsd.lr=1e-4", "opsd.lora_r=16", "opsd.lora_alpha=32",
]

# OPSD levers added after draws were archived (bench/results/ablation): at these values (the
# paper's behaviour) they are left out of the G+O key, so archived arms keep their folders
NEUTRAL_OPSD = {"student_searches": "any"}

ARMS = ("G", "G+O", "G+G")
ROWS = ("warm start", "G", "G+O", "G+G")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (after the bench's own settings)")
    p.add_argument("--name", help="run name (default 'ablation'): results in runs/<name>/")
    p.add_argument("--draws", type=int, default=3, help="how many draws (default 3)")
    p.add_argument("--first-draw", type=int, default=0,
                   help="the first draw's sample seed (default 0): draws first..first+draws-1, so a "
                        "later session can add draw 1 to an archived draw 0")
    p.add_argument("--archive", metavar="DIR",
                   help="after the run, copy what the report reads (arm.json, eval and validation "
                        "parquets; ~1 MB a draw, no checkpoints) to DIR/draw<d>/...")
    p.add_argument("--include", metavar="DIR", action="append", default=[],
                   help="also read finished arms from DIR (an --archive of another run, another "
                        "machine's or session's); the report pools the draws --first-draw/--draws "
                        "name wherever they are found; repeatable")
    p.add_argument("--grpo-steps", type=int, default=8, help="GRPO steps of arm G (default 8)")
    p.add_argument("--eval", type=int, default=300, help="held-out test questions scored (default 300)")
    p.add_argument("--dev", type=int, default=100, help="dev questions for OPSD's validation (default 100)")
    p.add_argument("--warmstart-dir", help="start from this policy folder instead of the cached warm start")
    p.add_argument("--report-only", action="store_true", help="rebuild ablation.md from finished arms")
    args = p.parse_args(argv)
    for name in ("draws", "grpo_steps", "eval", "dev"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.first_draw < 0:
        p.error(f"--first-draw must be >= 0, got {args.first_draw}")
    for d in args.include:
        if not Path(d).expanduser().is_dir():
            p.error(f"--include {d}: no such folder")
    return args


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def arm_key(cfg, args, name: str) -> str:
    """A short hash of the settings arm ``name`` depends on: an arm folder is reused only by a
    run with the same settings, so a sweep of an OPSD lever (``--set opsd.lr=…``) reruns G+O
    alone and shares the draws' G (and G+G) with earlier runs."""
    import hashlib

    d = cfg.to_dict()
    base = {k: d[k] for k in ("model", "data", "retriever", "rollout", "train", "warmstart", "grpo")}
    # how the rollout is scheduled (async / rounds, in-flight cap) does not change what is
    # sampled, nor do timeouts, restarts after failures, GPU shares, whether checkpoints keep the
    # optimizer state, or whether a Serve app over another index may be replaced
    base["rollout"] = {k: v for k, v in base["rollout"].items()
                       if k not in ("loop", "max_inflight", "batch_timeout_s")}
    base["retriever"] = {k: v for k, v in base["retriever"].items() if k not in ("call_timeout_s", "replace_app")}
    base["train"] = {k: v for k, v in base["train"].items()
                     if k not in ("command_timeout_s", "max_failures", "gpus_per_worker")}
    base["grpo"] = {k: v for k, v in base["grpo"].items() if k != "save_optimizer"}
    base.update(seed=d["run"]["seed"], grpo_steps=args.grpo_steps, warm=args.warmstart_dir or "", version=1)
    if name == "warm start":  # the cached policy (warmstart, max_seq_len) and its greedy evaluation
        blob: dict = {k: base[k] for k in ("model", "data", "warmstart", "warm", "rollout", "retriever", "train")}
    elif name == "G":
        blob = base
    elif name == "G+O":
        opsd = {k: v for k, v in d["opsd"].items() if NEUTRAL_OPSD.get(k, object()) != v}
        blob = {**base, "opsd": opsd, "dev": args.dev}
    else:
        blob = {**base, "budget": [d["opsd"]["questions_per_round"], d["opsd"]["samples_per_question"]]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:8]


def pool_dir(out: Path, cfg, args, d: int) -> Path:
    """``runs/<name>/draw<d>/pool-<key>``: G's OPSD pool (rollouts.parquet), G's dev evaluation
    (dev_step0.parquet) and start.json, keyed by G's settings and what the pool depends on
    (questions per round, K, the dev questions): every OPSD training setting shares it."""
    import hashlib

    o = cfg.to_dict()["opsd"]
    blob = [arm_key(cfg, args, "G"), o["questions_per_round"], o["samples_per_question"], args.dev]
    return out / f"draw{d}" / f"pool-{hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:8]}"


def arm_dir(out: Path, cfg, args, d: int | None, name: str) -> Path:
    """``runs/<name>/warm-<key>`` or ``runs/<name>/draw<d>/<arm>-<key>``."""
    slug = {"warm start": "warm", "G": "G", "G+O": "GpO", "G+G": "GpG"}[name]
    where = out if d is None else out / f"draw{d}"
    return where / f"{slug}-{arm_key(cfg, args, name)}"


def _read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(str(path), columns=["question_id", "question", "em", "answer", "num_searches",
                                             "response"]).to_pylist()


_CFG_CACHE: dict[tuple, Any] = {}


def _draw_cfg(args, d: int | None = None):
    """The bench's config (run.seed = the draw's sample seed when ``d`` is given), read once per
    run: an edit of the YAML file while the bench runs does not change its later arms."""
    import copy

    from searche1_ray.config import load_config

    # keyed by what the config is read from: an ``id(args)`` key handed a freed args' config to a
    # new args object that reused its address (the arm-key unit test failed once in six runs here)
    key = (args.config, tuple(args.overrides), args.name, d)
    if key not in _CFG_CACHE:
        _CFG_CACHE[key] = load_config(args.config, ABLATION_OVERRIDES + list(args.overrides)
                                      + ([f"run.name={args.name}"] if args.name else [])
                                      + ([f"run.seed={d}"] if d is not None else []))
    return copy.deepcopy(_CFG_CACHE[key])


class Ablation:
    """The arms of one ablation run over a shared pool, retriever and warm start."""

    def __init__(self, args, cfg, out: Path, train, dev, test, pool, warm: str):
        self.args, self.cfg, self.out = args, cfg, out
        self.train, self.dev, self.test = train, dev, test
        self.pool, self.warm = pool, warm
        self.version = 0
        self._warm_done: Path | None = None   # a folder holding this run's warm-start evaluation

    def _serve(self, policy: str) -> None:
        self.version += 1
        self.pool.update_weights(policy, self.version)

    def _eval(self, arm_dir: Path, label: str) -> dict:
        from searche1_ray.evaluation import evaluate_split

        r = evaluate_split(self.pool, self.test, arm_dir / "eval.parquet", temperature=0.0, batch_size=64,
                           desc=f"test EM {label}")
        log.info("%s: test EM %.3f on %d questions (%.0f s)", label, r["em"], r["n"], r["seconds"])
        return r

    def _draw_cfg(self, d: int):
        return _draw_cfg(self.args, d)

    def _grpo(self, cfg, start: str, arm_dir: Path, steps: int, first_step: int, d: int) -> dict:
        """``steps`` GRPO steps from ``start``; the policy saved to ``arm_dir/policy``."""
        from searche1_ray.data.sampling import step_questions
        from searche1_ray.grpo_round import grpo_step
        from searche1_ray.training.runner import TrainRunner
        from searche1_ray.training.tasks import GRPOTask

        self._serve(start)
        history = []
        runner = TrainRunner(cfg, start, GRPOTask(cfg), arm_dir / "train")
        try:
            for k in range(first_step, first_step + steps):
                qs = step_questions(self.train, cfg.grpo.questions_per_step, f"{d}-ablation-grpo-{k}",
                                    cfg.grpo.stratify_by)
                self.version += 1
                m = grpo_step(cfg, self.pool, runner, None, qs, arm_dir / "rollouts" / f"step{k:04d}.parquet",
                              version=self.version, seed=zlib.crc32(f"{d}-{k}".encode()))
                history.append({"step": k, **{key: v for key, v in m.items() if isinstance(v, (int, float))}})
                log.info("draw %d GRPO step %d: reward %.3f (signal in %.0f%% of groups), %.0f s "
                         "(rollout %.0f, train %.0f)", d, k + 1, m["rollout/reward_mean"],
                         100 * m["rollout/groups_with_signal"], m["perf/step_s"], m["perf/rollout_s"],
                         m.get("perf/train_s", 0.0))
            runner.save_checkpoint(str(arm_dir / "policy"))
        finally:
            runner.stop()
        return {"grpo_history": history, "rollouts": sum(int(h["rollout/trajectories"]) for h in history)}

    def warm_arm(self, d: int) -> dict:
        """The warm start's test evaluation, recorded in every draw's folder (a draw archived on
        another machine or in another session carries its own warm start's answers, and each
        draw's comparisons are paired within it); evaluated once per run, copied to later draws."""
        where = arm_dir(self.out, self.cfg, self.args, d, "warm start")
        rec = self._scored(where)
        if rec is not None:
            self._warm_done = where
            return rec
        legacy = arm_dir(self.out, self.cfg, self.args, None, "warm start")  # one folder for all draws (before session 15)
        if self._warm_done is None and self._scored(legacy) is not None:
            self._warm_done = legacy
        where.mkdir(parents=True, exist_ok=True)
        if self._warm_done is not None:  # the same warm policy, scored already in this run folder
            shutil.copy(self._warm_done / "eval.parquet", where / "eval.parquet")
            rec = self._scored(self._warm_done)
        else:
            self.version = 1
            self._serve(self.warm)
            r = self._eval(where, "warm start")
            rec = {"arm": "warm start", "policy": self.warm, "eval_s": r["seconds"], "em": r["em"], "n": r["n"]}
        _atomic_json(where / "arm.json", {**rec, "draw": d})
        self._warm_done = where
        return rec

    def _scored(self, folder: Path) -> dict | None:
        """``folder``'s arm.json when it holds a score on this run's test questions, else None."""
        f = folder / "arm.json"
        rec = json.loads(f.read_text()) if f.is_file() else None
        return rec if rec is not None and rec.get("n") == len(self.test) else None

    def arm(self, d: int, name: str) -> dict:
        """Run (or read back) arm ``name`` of draw ``d``."""
        cfg = self._draw_cfg(d)
        where = arm_dir(self.out, cfg, self.args, d, name)
        done = where / "arm.json"
        # policy versions (and with them the OPSD question sample) depend only on (draw, arm), so a
        # resumed arm repeats exactly what an uninterrupted run would have done
        self.version = 10_000 * (d + 1) + 1_000 * ARMS.index(name)
        if done.is_file():
            rec = json.loads(done.read_text())
            if rec.get("n") == len(self.test):
                log.info("draw %d %s: done already (%s)", d, name, done)
                return rec
            log.info("draw %d %s: trained already; evaluating on %d test questions", d, name, len(self.test))
            self._serve(rec["policy"])
            r = self._eval(where, f"draw {d} {name}")
            rec.update(eval_s=r["seconds"], em=r["em"], num_searches=r["num_searches"], answered=r["answered"],
                       n=r["n"])
            _atomic_json(done, rec)
            return rec
        if where.exists():  # a crashed attempt: start the arm over
            shutil.rmtree(where)
        where.mkdir(parents=True)
        arm_dir_ = where
        g_policy = str(arm_dir(self.out, cfg, self.args, d, "G") / "policy")
        t0 = time.time()
        if name == "G":
            rec = self._grpo(cfg, self.warm, arm_dir_, self.args.grpo_steps, 0, d)
        elif name == "G+O":
            rec = self._opsd(cfg, g_policy, arm_dir_, d)
        else:
            o = cfg.opsd
            steps = math.ceil(o.questions_per_round * o.samples_per_question
                              / (cfg.grpo.questions_per_step * cfg.rollout.group_size))
            rec = self._grpo(cfg, g_policy, arm_dir_, steps, self.args.grpo_steps, d)
        train_s = time.time() - t0
        policy = rec.pop("policy", str(arm_dir_ / "policy"))
        g_done = Path(g_policy).parent / "arm.json"
        g = json.loads(g_done.read_text()) if name == "G+O" and policy == g_policy and g_done.is_file() else {}
        if g.get("n") == len(self.test):
            # validation kept step 0: G+O is G's policy, whose greedy answers are scored already
            shutil.copy(Path(g_policy).parent / "eval.parquet", arm_dir_ / "eval.parquet")
            r = {"seconds": 0.0, **{k: g[k] for k in ("em", "num_searches", "answered", "n")}}
            log.info("draw %d G+O: validation kept G's policy; its test evaluation is G's", d)
        else:
            self._serve(policy)
            r = self._eval(arm_dir_, f"draw {d} {name}")
        rec.update({"arm": name, "draw": d, "policy": policy, "train_s": train_s, "eval_s": r["seconds"],
                    "em": r["em"], "num_searches": r["num_searches"], "answered": r["answered"], "n": r["n"],
                    "key": arm_key(cfg, self.args, name)})
        _atomic_json(done, rec)
        return rec

    def _opsd(self, cfg, g_policy: str, arm_dir: Path, d: int) -> dict:
        import pyarrow.parquet as pq

        from searche1_ray.training.opsd_round import run_opsd_round

        self._serve(g_policy)
        # the K samples per question of G's policy and its step-0 dev EM, shared by every G+O run of
        # this draw with the same pool settings: a sweep of an OPSD training lever trains on the
        # same pairs (a paired comparison) and skips ~11 min of rollouts and ~3 min of validation
        shared = pool_dir(self.out, cfg, self.args, d)
        rollouts = start = None
        if (shared / "start.json").is_file():
            rollouts = pq.read_table(str(shared / "rollouts.parquet")).to_pylist()
            start = json.loads((shared / "start.json").read_text())
            (arm_dir / "opsd" / "eval").mkdir(parents=True, exist_ok=True)
            shutil.copy(shared / "dev_step0.parquet", arm_dir / "opsd" / "eval" / "step0000.parquet")
            log.info("draw %d G+O: the OPSD pool of %s (%d rollouts, step-0 dev EM %.3f)", d, shared,
                     len(rollouts), start["em"])
        policy, m = run_opsd_round(cfg, self.pool, g_policy, self.train, self.dev, arm_dir / "opsd",
                                   version=self.version, progress=False, start_eval=start, rollouts=rollouts)
        step0 = arm_dir / "opsd" / "eval" / "step0000.parquet"
        first = next((e for e in m.get("opsd/evals", []) if e["step"] == 0), None)
        if rollouts is None and first is not None and step0.is_file():
            shared.mkdir(parents=True, exist_ok=True)
            shutil.copy(arm_dir / "opsd" / "rollouts.parquet", shared / "rollouts.parquet")
            shutil.copy(step0, shared / "dev_step0.parquet")
            _atomic_json(shared / "start.json", {k: first[k] for k in ("em", "n", "num_searches")}
                         | {"from": str(arm_dir)})  # written last: the folder is complete
        types = question_types(self.train)
        by_type: dict[str, dict[str, int]] = {}
        pairs_path = arm_dir / "opsd" / "pairs.parquet"
        if pairs_path.is_file():
            for r in pq.read_table(str(pairs_path), columns=["question_id", "status", "student_kind"]).to_pylist():
                t = by_type.setdefault(types.get(str(r["question_id"]), "all"),
                                       {"questions": 0, "pairs": 0, "incorrect_student": 0})
                t["questions"] += 1
                if r["status"] == "pair":
                    t["pairs"] += 1
                    t["incorrect_student"] += r["student_kind"] == "incorrect"
        keep = ("opsd/pairs", "opsd/samples", "opsd/dropped_no_correct", "opsd/incorrect_student",
                "opsd/correct_fallback", "opsd/kl_first", "opsd/kl_last", "opsd/clip_frac", "opsd/best_step",
                "eval/em", "eval/em_start", "rollout/reward_mean", "perf/opsd_rollout_s", "perf/opsd_train_s",
                "perf/opsd_eval_s")
        return {"policy": policy, "opsd": {k: m.get(k) for k in keep}, "opsd_evals": m.get("opsd/evals", []),
                "opsd_history": [{k: v for k, v in h.items() if isinstance(v, (int, float))}
                                 for h in m.get("opsd/history", [])],
                "pairs_by_type": dict(sorted(by_type.items())),
                "rollouts": int(cfg.opsd.questions_per_round * cfg.opsd.samples_per_question),
                "pool_reused_from": (start or {}).get("from", "")}


# ------------------------------------------------------------------------------------ report


def searches_by_type(rows: list[dict], types: dict[str, str]) -> dict[str, float]:
    """Mean ``num_searches`` per question type of ``rows`` (and ``overall``)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(types.get(r["question_id"], "?"), []).append(r["num_searches"])
    out = {k: statistics.mean(v) for k, v in by.items()}
    out["overall"] = statistics.mean(r["num_searches"] for r in rows) if rows else float("nan")
    return out


def _guessed(row: dict) -> bool:
    return answer_before_search(row.get("response") or "", row.get("answer"), row.get("question") or "")


def _mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def build_report(locate, test: list[dict], draws: list[int], out: Path) -> tuple[list[str], dict[str, float]]:
    """Markdown lines of the ablation report and the three headline figures (EM points).
    ``locate(d, arm)`` is the folder of draw ``d``'s arm (its warm start: arm "warm start")."""
    types = question_types(test)
    warm_of: dict[int, list[dict]] = {}   # each draw's warm-start answers
    rows_of: dict[tuple[int, str], list[dict]] = {}
    recs: dict[tuple[int, str], dict] = {}
    for d in draws:
        if (locate(d, "warm start") / "arm.json").is_file():
            warm_of[d] = _read_rows(locate(d, "warm start") / "eval.parquet")
        for a in ARMS:
            where = locate(d, a)
            if (where / "arm.json").is_file():
                recs[(d, a)] = json.loads((where / "arm.json").read_text())
                rows_of[(d, a)] = _read_rows(where / "eval.parquet")
    kinds = sorted({t for t in types.values()})
    cols = kinds + ["avg"]
    table: dict[str, dict[str, list[float]]] = {r: {c: [] for c in cols + ["overall"]} for r in ROWS}
    for d in draws:
        warm_em = em_by_type(warm_of[d], types) if d in warm_of else {}
        for c in cols + ["overall"]:
            table["warm start"][c].append(warm_em.get(c, float("nan")))
        for a in ARMS:
            if (d, a) in rows_of:
                em = em_by_type(rows_of[(d, a)], types)
                for c in cols + ["overall"]:
                    table[a][c].append(em.get(c, float("nan")))
    n_test = len(next(iter(warm_of.values()), test))
    lines = [f"# Search-E1 ablation on the CPU testbed ({len(draws)} draw(s), {n_test} held-out test questions)", "",
             "Greedy EM (%) per question type; avg = the unweighted mean over the types; mean ± sd over draws.", "",
             "| policy | " + " | ".join(cols) + " | overall |", "|---|" + "---:|" * (len(cols) + 1)]
    for r in ROWS:
        lines.append(f"| {r} | " + " | ".join(_mean_sd(table[r][c]) for c in cols + ["overall"]) + " |")

    # how often each policy searches per type: a policy that answers after one search cannot
    # reach a two-hop answer (GRPO's collapse on this testbed, session 12)
    lines += ["", "Searches per question (greedy, mean over draws) per question type:", "",
              "| policy | " + " | ".join(kinds) + " | overall |", "|---|" + "---:|" * (len(kinds) + 1)]
    def runs_of(r: str) -> list[list[dict]]:  # a policy's evaluation rows, one list per draw
        if r == "warm start":
            return [warm_of[d] for d in draws if d in warm_of]
        return [rows_of[(d, r)] for d in draws if (d, r) in rows_of]

    for r in ROWS:
        runs = runs_of(r)
        if runs:
            per = [searches_by_type(x, types) for x in runs]
            lines.append(f"| {r} | " + " | ".join(
                f"{statistics.mean(p[k] for p in per if k in p):.2f}" if any(k in p for p in per) else "–"
                for k in kinds + ["overall"]) + " |")

    # answers named in the first thought, before any search (trajectory.answer_before_search):
    # what distilling a teacher that reads the reference taught the student (session 14)
    lines += ["", "Answers named before the first search (greedy; mean over draws): share of the questions, "
              "and how many of those were right:", "",
              "| policy | named before searching | of them right |", "|---|---:|---:|"]
    for r in ROWS:
        runs = runs_of(r)
        if runs:
            flagged = [[x for x in rows if _guessed(x)] for rows in runs]
            share = statistics.mean(100 * len(f) / max(1, len(rows)) for f, rows in zip(flagged, runs))
            right = sum(sum(x["em"] for x in f) for f in flagged)
            lines.append(f"| {r} | {share:.1f} % | {right:.0f} of {sum(len(f) for f in flagged)} |")

    comparisons = [("G", "warm start"), ("G+O", "G"), ("G+G", "G"), ("G+O", "G+G")]
    lines += ["", "Paired changes on the same questions, pooled over draws (exact two-sided sign test):", "",
              "| comparison | wrong→right | right→wrong | p | per type (up/down) |", "|---|---:|---:|---:|---|"]
    for after, before in comparisons:
        per_draw = []
        for d in draws:
            b = warm_of.get(d) if before == "warm start" else rows_of.get((d, before))
            a = rows_of.get((d, after))
            if a is not None and b is not None:
                per_draw.append(paired_changes(b, a, types))
        if not per_draw:
            continue
        p = pooled(per_draw)
        bt = {}
        for c in per_draw:
            for k, v in c["by_type"].items():
                bt.setdefault(k, [0, 0])
                bt[k][0] += v["up"]
                bt[k][1] += v["down"]
        lines.append(f"| {after} vs {before} | {p['up']} | {p['down']} | {p['p']:.3g} | "
                     + ", ".join(f"{k} {u}/{dn}" for k, (u, dn) in sorted(bt.items())) + " |")

    lines += ["", "Per draw: EM (%) overall, wall-clock (train + eval), rollouts:", "",
              "| draw | arm | EM | searches | train s | eval s | rollouts |", "|---|---|---:|---:|---:|---:|---:|"]
    for d in draws:
        for a in ARMS:
            rec = recs.get((d, a))
            if rec:
                lines.append(f"| {d} | {a} | {100 * rec['em']:.1f} | {rec['num_searches']:.2f} | "
                             f"{rec['train_s']:.0f} | {rec['eval_s']:.0f} | {rec.get('rollouts', 0)} |")

    lines += ["", "OPSD diagnostics per draw:", ""]
    for d in draws:
        rec = recs.get((d, "G+O"))
        if not rec:
            continue
        o = {k: (v if v is not None else float("nan")) for k, v in rec["opsd"].items()}
        changed = "–"
        if (d, "G") in rows_of:
            g = {r["question_id"]: r["answer"] for r in rows_of[(d, "G")]}
            changed = str(sum(1 for r in rows_of[(d, "G+O")] if g.get(r["question_id"]) != r["answer"]))
        lines.append(f"- draw {d}: {o.get('opsd/pairs')} pairs ({o.get('opsd/incorrect_student')} with an incorrect "
                     f"student, {o.get('opsd/correct_fallback')} correct fallbacks; {o.get('opsd/dropped_no_correct')} "
                     f"questions without a correct rollout; pool reward {o.get('rollout/reward_mean', 0):.3f}); "
                     f"KL {o.get('opsd/kl_first', 0):.4f} → {o.get('opsd/kl_last', 0):.4f}, clip fraction "
                     f"{o.get('opsd/clip_frac', 0):.2e}; dev EM by step "
                     f"{[(e['step'], round(e['em'], 3)) for e in rec.get('opsd_evals', [])]}, kept step "
                     f"{o.get('opsd/best_step')}; greedy test answers changed vs G: {changed}"
                     + (f" (pool of {rec['pool_reused_from']})" if rec.get("pool_reused_from") else ""))
        lines.append("  pairs per type: " + ", ".join(f"{k} {v['pairs']}/{v['questions']}"
                                                        for k, v in rec.get("pairs_by_type", {}).items()))
        steps = sorted((locate(d, "G+O") / "opsd" / "eval").glob("step*.parquet"))
        if steps:
            per_step = []
            for f in steps:
                rows = _read_rows(f)
                n = max(1, len(rows))
                per_step.append(f"step {int(f.stem[4:])}: EM {sum(r['em'] for r in rows) / n:.3f}, "
                                f"{sum(r['num_searches'] for r in rows) / n:.2f} searches, "
                                f"{sum(map(_guessed, rows))}/{len(rows)} named before searching")
            lines.append("  dev questions by validation step: " + "; ".join(per_step))

    def mean_gap(a: str, b: str) -> float:
        gaps = [100 * (x - y) for x, y in zip(table[a]["avg"], table[b]["avg"]) if x == x and y == y]
        return statistics.mean(gaps) if gaps and len(table[a]["avg"]) == len(table[b]["avg"]) else float("nan")

    figures = {"grpo_gain": mean_gap("G", "warm start"), "opsd_gain_over_grpo": mean_gap("G+O", "G"),
               "opsd_vs_more_grpo": mean_gap("G+O", "G+G")}
    lines += ["", "Means over draws of the type-averaged EM, in points: "
              + ", ".join(f"{k} {v:+.1f}" for k, v in figures.items()), ""]
    _plot(out / "ablation.png", table, cols)
    lines.append("![EM per question type](ablation.png)")
    return lines, figures


def _plot(path: Path, table: dict, cols: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(ROWS)
    for i, r in enumerate(ROWS):
        means = [100 * statistics.mean(v) if (v := [x for x in table[r][c] if x == x]) else 0.0 for c in cols]
        sds = [100 * statistics.stdev(v) if len(v := [x for x in table[r][c] if x == x]) > 1 else 0.0 for c in cols]
        ax.bar([j + (i - (len(ROWS) - 1) / 2) * width for j in range(len(cols))], means, width, yerr=sds,
               label=r, capsize=3)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("greedy EM on held-out test questions (%)")
    ax.set_title("Search-E1 ablation (mean ± sd over draws)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main


def make_locate(args, cfg, out: Path):
    """``locate(d, arm)``: draw ``d``'s arm folder — the first of ``out`` and the ``--include``
    folders that holds it finished, else ``out``'s (where this run writes it). ``d`` None: the
    warm start's one folder of runs made before per-draw warm-start folders (session 15)."""
    roots = [out] + [Path(x).expanduser().resolve() for x in args.include]

    def locate(d: int | None, name: str) -> Path:
        rel = arm_dir(Path(), cfg if d is None else _draw_cfg(args, d), args, d, name)
        for root in roots:
            if (root / rel / "arm.json").is_file():
                return root / rel
        if name == "warm start" and d is not None:
            legacy = locate(None, name)
            if (legacy / "arm.json").is_file():
                return legacy
        return out / rel

    return locate


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from searche1_ray.data.prepare import prepare_data
    from searche1_ray.data.readers import read_qa

    cfg = _draw_cfg(args)
    out = cfg.run_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg)
    train, dev, test = read_qa(data.train), read_qa(data.dev)[: args.dev], read_qa(data.test)
    if len(test) < args.eval:
        raise SystemExit(f"bench.ablation: --eval {args.eval} but the test split has {len(test)} questions "
                         f"(raise data.world.num_questions)")
    test = test[: args.eval]
    draws = list(range(args.first_draw, args.first_draw + args.draws))
    locate = make_locate(args, cfg, out)

    if args.report_only:
        return _finish(out, test, draws, locate, args.archive)

    from actors.retriever import default_index_dir, start_retriever
    from bench.grpo_learning import warm_policy
    from jobs._cli import init_ray, interrupt_on_sigterm, shutdown_ray
    from searche1_ray.model_store import resolve_model

    t_all = time.time()
    base = resolve_model(cfg.model.name, cfg.model.cache_dir, cfg.model.dtype)
    init_ray(cfg, None)
    interrupt_on_sigterm()  # kill <pid> stops like Ctrl-C: arms/steps cleaned up, Ray shut down
    pool = None
    try:
        if args.warmstart_dir:
            warm, ws_s = str(Path(args.warmstart_dir).expanduser().resolve()), 0.0
        else:
            warm, ws_s = warm_policy(cfg, base, data)
        from actors.rollout_worker import RolloutPool

        retriever, _ = start_retriever(cfg, str(data.corpus), str(default_index_dir(cfg, data.dir)))
        pool = RolloutPool(cfg, warm, retriever)
        ab = Ablation(args, cfg, out, train, dev, test, pool, warm)
        for d in draws:
            ab.warm_arm(d)
            for a in ARMS:
                ab.arm(d, a)
    finally:
        if pool is not None:
            pool.shutdown()
        shutdown_ray()
    log.info("ablation finished in %.1f min (warm start %.0f s, 0 = cached)", (time.time() - t_all) / 60, ws_s)
    return _finish(out, test, draws, locate, args.archive)


def archive(locate, draws: list[int], dest: Path) -> int:
    """Copy what ``build_report`` reads of every finished arm — ``arm.json``, ``eval.parquet``
    and the OPSD validation parquets — to ``dest/draw<d>/<arm folder>/``; returns the number of
    arms copied. Checkpoints stay behind (a report needs none)."""
    n = 0
    for d in draws:
        for name in ("warm start", *ARMS):
            src = locate(d, name)
            if not (src / "arm.json").is_file():
                continue
            to = dest / f"draw{d}" / src.name
            if to.resolve() == src.resolve():
                continue
            files = [src / "arm.json", src / "eval.parquet", *sorted((src / "opsd" / "eval").glob("step*.parquet"))]
            for f in files:
                target = to / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, target)
            if name == "warm start":  # a legacy shared folder: record which draw this copy is
                rec = json.loads((to / "arm.json").read_text())
                _atomic_json(to / "arm.json", {**rec, "draw": d})
            n += 1
    return n


def _finish(out: Path, test: list[dict], draws: list[int], locate, archive_to: str | None = None) -> int:
    if archive_to:
        dest = Path(archive_to).expanduser().resolve()
        log.info("archived %d finished arms to %s", archive(locate, draws, dest), dest)
    lines, figures = build_report(locate, test, draws, out)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"report: {out / 'ablation.md'}")
    for k, v in figures.items():
        print(f"{k}={v:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
