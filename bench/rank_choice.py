"""Does the law's rank meet its promise on facts it has not seen? For each case (kind of fact,
ℓ, target fact recall), on seeded facts not used in calibration: the planner's rank (what a job
would train), the oracle rank (the smallest ladder rank that reaches the target with the law's
own family and budget), the fact recall achieved at the chosen rank against the law's
prediction, and bits stored per adapter parameter at the oracle rank.

The oracle search starts at the chosen rank and walks down while the target is still met, or up
until it is; it assumes that a rank that misses the target is not beaten by a smaller one (each
training at a large ℓ costs minutes here). `--full-sweep` trains every ladder rank from 1 up
instead, the oracle's literal definition. `--points FILE` appends every training as a law point
(calibration's format), so the cases can later join a calibration folder; once they do, they are
no longer held out. A training already in that file for the same case (kind, rank, ℓ, seed) is
reused, not retrained: a stopped run resumes, and two processes sharing one file (one with
`--start-rank` lower on the ladder) split a case's trainings between cores. `--plan-only` prints
each case's base loss, choice and prediction without training: what another law (`--law`) would
choose for the same facts.

    cd bench && ../.venv/bin/python rank_choice.py --cases phonebook:200:1.0,counterfactual:800:0.9
    (default law: the one shipped for the default model and family, which a fresh install plans
    with; the planner's copy in $MEMUPDATE_HOME/laws drifts with every job this machine ran)
"""

import math
from pathlib import Path

from common import parser, setup

from memupdate.memory.adapter import RANK_LADDER, AdapterFamily, default_family, params_per_rank
from memupdate.memory.base_model import model_identity
from memupdate.memory.calibration import (
    append_point,
    budget_steps,
    fact_set_source,
    load_points,
    run_key,
    training_point,
)
from memupdate.memory.encoding import (
    encode_facts,
    fact_count,
    model_context_length,
    sequence_length,
)
from memupdate.memory.fact_sets import fact_bits
from memupdate.memory.law import ParametricMemoryLaw
from memupdate.memory.locality import retain_set
from memupdate.memory.memft import Progress, TrainSettings, train_adapter
from memupdate.memory.novelty import novel_share
from memupdate.memory.planning import shipped_law_path
from memupdate.memory.recall import measure_recall

CASES = (
    "phonebook:150:1.0,phonebook:600:0.9,phonebook:1500:1.0,phonebook:3000:0.9,"
    "biography:150:1.0,biography:600:1.0,biography:1500:0.9,biography:3000:0.9,"
    "counterfactual:150:1.0,counterfactual:600:0.9,counterfactual:1500:1.0,counterfactual:3000:0.9"
)
FRESH_SEED = 1000  # calibration used seeds 0..; these facts are new to the law


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--law", help="law.json (default: the shipped law of the default family)")
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--full-sweep", action="store_true", help="train every rank from 1 up")
    p.add_argument("--first-seed", type=int, default=FRESH_SEED, help="case i uses seed first+i")
    p.add_argument("--cases", default=CASES, help="kind:ℓ:target fact recall, comma-separated")
    p.add_argument("--points", type=Path, help="append each training's law point to this file")
    p.add_argument("--start-rank", type=int, help="start the oracle walk here, not at the choice")
    p.add_argument("--plan-only", action="store_true", help="print each case's choice, no training")
    args = p.parse_args()
    folder, load = setup(args)
    model, tok = load()
    where = args.law or shipped_law_path(
        model_identity(folder), default_family(model.config.num_hidden_layers)
    )
    law = ParametricMemoryLaw.load(where)
    family = AdapterFamily.from_dict(law.family)
    context = model_context_length(model)
    per_rank = params_per_rank(model, family)
    ladder = [r for r in RANK_LADDER if r <= args.max_rank]

    def encode(facts):
        return encode_facts(facts, tok, context)

    def progress(p: Progress) -> None:  # a training at ℓ 5,000 takes most of an hour here
        if p.step % 100 == 0:
            print(f"      step {p.step}/{p.max_steps}: fact recall {p.fact_recall:.2f}", flush=True)

    def fact_recall(facts, rank, kind, seed, share):
        source = "rank-choice:" + run_key(kind, rank, sequence_length(facts), seed)
        done = load_points(args.points) if args.points else {}
        if source in done:
            recall = done[source].fact_recall
            print(f"    rank {rank}: fact recall {recall:.3f} (from {args.points})")
            return recall
        m, t = load()
        steps = budget_steps(law.training, len(facts))
        _, res = train_adapter(
            m,
            facts,
            t.pad_token_id,
            TrainSettings(rank=rank, family=family, max_steps=steps),
            progress,
            retain=retain_set(m, t, family),
        )
        print(f"    rank {rank}: fact recall {res.recall.fact_recall:.3f} in {res.seconds:.0f} s")
        if args.points:
            point = training_point(
                res, rank, rank * per_rank, source, len(facts), kind=kind, novel_share=share
            )
            append_point(args.points, point)
        return res.recall.fact_recall

    def find_oracle(facts, target, start, results, kind, seed, share):
        """Smallest ladder rank reaching `target`, walking from `start`; fills `results`."""

        def met(rank):
            if rank not in results:
                results[rank] = fact_recall(facts, rank, kind, seed, share)
            return results[rank] >= target

        if args.full_sweep:
            return next((r for r in ladder if met(r)), None)
        i = ladder.index(start)
        if met(start):
            while i > 0 and met(ladder[i - 1]):
                i -= 1
            return ladder[i]
        return next((r for r in ladder[i + 1 :] if met(r)), None)

    budget = {k: law.training[k] for k in ("steps", "epochs", "min_steps") if law.training.get(k)}
    print(f"law {where}: response {law.response}, alpha={law.alpha:.3f} beta={law.beta:.3f}")
    print(f"budget {budget}; ladder {ladder}")
    rows = []
    for case, text in enumerate(args.cases.split(",")):
        kind, ell, target = text.split(":")
        ell, target = int(ell), float(target)
        seed = args.first_seed + case
        facts = fact_set_source(encode, kind, seed, ell)
        ell = sequence_length(facts)
        loss_before = measure_recall(model, facts, tok.pad_token_id).mean_loss_nats
        share = novel_share(model, facts, tok.pad_token_id)
        size = law.size(ell, share)
        plan, reached = law.plan(size, target, loss_before, max_rank=args.max_rank)  # as jobs do
        chosen = plan.rank
        fallback = "" if reached else " (law: no rank reaches it; best effort)"
        predicted = law.predict(chosen, size, loss_before)[1]
        print(
            f"{kind} ℓ={ell} (novel share {share:.3f}) L0={loss_before:.2f} target {target}: "
            f"chosen rank {chosen}{fallback}, "
            f"predicted {predicted:.3f}",
            flush=True,
        )
        if args.plan_only:
            continue
        results: dict[int, float] = {}
        oracle = find_oracle(facts, target, args.start_rank or chosen, results, kind, seed, share)
        if chosen not in results:
            results[chosen] = fact_recall(facts, chosen, kind, seed, share)
        bits = (
            results[oracle] * fact_count(facts) * fact_bits(kind) / (oracle * per_rank)
            if oracle
            else math.nan
        )
        rows.append((kind, ell, target, chosen, oracle, predicted, results[chosen], bits))
        print(
            f"| {kind} | {ell} | {target} | {chosen} | {oracle} | {predicted:.3f} | "
            f"{results[chosen]:.3f} | {bits:.3f} |",
            flush=True,
        )

    if not rows:
        return
    print("columns: | kind | ℓ | target | chosen | oracle | predicted | achieved | bits/param |")
    met = sum(1 for r in rows if r[6] >= r[2])
    near = sum(
        1 for r in rows if r[4] and r[3] >= r[4] and ladder.index(r[3]) - ladder.index(r[4]) <= 1
    )
    error = sum(abs(r[5] - r[6]) for r in rows) / len(rows)
    print(
        f"totals: {len(rows)} cases; target met one-shot at the chosen rank in {met} "
        f"({met / len(rows):.0%}); chosen rank the oracle or one ladder step above in {near} "
        f"({near / len(rows):.0%}); mean |predicted − achieved fact recall| {error:.3f}; "
        f"oracle beyond rank {args.max_rank} in {sum(1 for r in rows if r[4] is None)}"
    )


if __name__ == "__main__":
    main()
