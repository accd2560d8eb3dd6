"""Library commands (no service needed): model prepare, phonebook, fact-set, plan, train, compare,
calibrate."""

import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

from memupdate.cli.common import Base, add_model_args, parse_ints
from memupdate.memory.adapter import (
    params_per_rank,
)
from memupdate.memory.base_model import (
    load_model,
    model_identity,
    prepare_default_model,
)
from memupdate.memory.calibration import MIN_TRAINING_STEPS, training_point
from memupdate.memory.encoding import fact_count, sequence_length
from memupdate.memory.fact_sets import KINDS, phonebook_facts
from memupdate.memory.facts import FactError, write_facts
from memupdate.memory.law import FORMS as LAW_FORMS
from memupdate.memory.law import LENGTHS as LAW_LENGTHS
from memupdate.memory.law import LawError
from memupdate.memory.locality import measure_locality, retain_set
from memupdate.memory.memft import DEFAULT_MARGIN, MODES, Progress, TrainSettings, train_adapter
from memupdate.memory.novelty import novel_share
from memupdate.memory.planning import DEFAULT_MAX_RANK, record_training
from memupdate.memory.recall import greedy_check, greedy_continuation, measure_recall
from memupdate.memory.tiny_model import prepare_tiny_model


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown fact-set kind(s) {unknown}; choose from {sorted(KINDS)}")
    return kinds


def cmd_model_prepare(args) -> int:
    folder = prepare_tiny_model() if args.tiny else prepare_default_model()
    print(f"{folder}  {model_identity(folder).to_dict()}")
    return 0


def cmd_phonebook(args) -> int:
    write_facts(phonebook_facts(args.count, seed=args.seed, digits=args.digits), args.out)
    print(f"wrote {args.count} phonebook facts to {args.out}")
    return 0


def cmd_fact_set(args) -> int:
    facts = KINDS[args.kind](args.count, seed=args.seed)
    write_facts(facts, args.out)
    print(f"wrote {len(facts)} {args.kind} facts to {args.out}")
    return 0


def cmd_plan(args) -> int:
    base = Base(args.model)
    facts = base.encode(args.facts, args.max_facts)
    family = base.family(args)
    report = base.plan(facts, family, args).budgeted()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    predicted = (
        "n/a (no law)"
        if report.predicted_fact_recall is None
        else f"{report.predicted_fact_recall:.3f}"
    )
    posted = fact_count(facts)
    print(f"facts:                   {posted} ({report.facts} sequences: every form of each)")
    print(f"sequence length ℓ:       {report.sequence_length} target tokens")
    if report.novel_share is not None:
        print(
            f"novel tokens:            {report.novel_share:.2f} of ℓ (wrong even with other facts "
            f"in context); the law counts {report.law_length}"
        )
    sample = (
        f" (on a sample of {report.loss_measured_on} sequences)"
        if report.loss_measured_on < report.facts
        else ""
    )
    print(f"base loss on targets:    {report.loss_before_nats:.3f} nats/token{sample}")
    print(f"chosen rank:             {report.rank}  (serving limit {args.max_rank})")
    print(f"adapter parameters:      {report.adapter_params:,}")
    print(f"target fact recall:      {report.target_recall}")
    print(f"predicted fact recall:   {predicted}")
    print(f"training budget:         {report.training_steps} steps")
    print(f"law:                     {report.law}")
    return 0


def cmd_train(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FactError(f"{out} exists; pass --force to replace it")
    base = Base(args.model)
    facts = base.encode(args.facts, args.max_facts)
    family = base.family(args)
    plan = None
    if args.rank is None:
        plan = base.plan(facts, family, args)
        print(f"law chose rank {plan.rank} for ℓ={plan.sequence_length} ({plan.law})")
    rank = args.rank or plan.rank
    max_steps = args.max_steps or (plan.budgeted().training_steps if plan else MIN_TRAINING_STEPS)
    settings = TrainSettings(
        rank=rank,
        family=family,
        mode=args.mode,
        margin=args.margin,
        batch_size=args.batch_size,
        max_steps=max_steps,
        max_seconds=args.max_seconds,
        seed=args.seed,
    )
    from tqdm import tqdm

    bar = tqdm(total=max_steps, desc=f"{args.mode} r={rank}", unit="step", disable=args.quiet)

    def show(p: Progress) -> None:
        bar.update(p.step - bar.n)
        bar.set_postfix(
            epoch=p.epoch,
            active=p.active_facts,
            fact_recall=f"{p.fact_recall:.3f}",
            left="?" if p.eta_seconds is None else f"~{p.eta_seconds:.0f}s",
        )

    # Before the training: it adds the adapter's layers to base.model in place.
    share = plan.novel_share if plan else novel_share(base.model, facts, base.pad_id)
    retain = retain_set(base.model, base.tokenizer, family, seed=args.seed)
    peft_model, result = train_adapter(
        base.model, facts, base.pad_id, settings, show, retain=retain
    )
    bar.close()
    greedy = greedy_check(peft_model, facts, base.pad_id, limit=args.greedy_sample)
    locality = measure_locality(peft_model, base.tokenizer)
    report = {
        "success": result.success,
        "stop_reason": result.stop_reason,
        "base_model": base.identity.to_dict(),
        "family": family.to_dict(),
        "mode": args.mode,
        "rank": rank,
        "adapter_params": rank * params_per_rank(base.model, family),
        "margin": args.margin,
        "plan": plan.to_dict() if plan else None,
        "steps": result.steps,
        "step_precision": "bf16" if result.bf16_steps else "fp32",
        "tokens_processed": result.tokens_processed,
        "seconds": round(result.seconds, 2),
        "sequence_length": result.sequence_length,
        "loss_before_nats": result.loss_before_nats,
        "loss_after_nats": result.recall.mean_loss_nats,
        "recall": result.recall.to_dict(),  # token_recall / fact_recall at p > 0.5
        "greedy": {
            "checked": greedy.checked,
            "exact": greedy.exact,
            "mismatches": greedy.mismatches,
        },
        "locality": locality.to_dict(),
        "history": result.history,
    }
    # Written next to the destination and renamed: a crash never leaves a half adapter.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    peft_model.save_pretrained(tmp)
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    law_file = record_training(
        base.identity,
        family,
        training_point(
            result,
            rank,
            report["adapter_params"],
            f"train:{out.name}",
            len(facts),
            locality.token_agreement,
            novel_share=share,
        ),
    )
    if law_file:
        print(f"law refined with this run's point: {law_file}")
    r = result.recall
    verdict = "every target token passed" if result.success else "NOT all facts recalled"
    print(
        f"{verdict}: fact recall {r.fact_recall:.3f}, token recall {r.token_recall:.3f}, "
        f"lowest p {r.min_prob:.3f} ({r.min_prob_fact})"
    )
    print(
        "by form: "
        + ", ".join(f"{k} {v['fact_recall']:.3f} of {v['facts']}" for k, v in r.forms.items())
    )
    print(
        f"steps {result.steps} ({'bf16' if result.bf16_steps else 'fp32'}), "
        f"tokens {result.tokens_processed:,}, {result.seconds:.1f} s; "
        f"greedy exact {greedy.exact}/{greedy.checked}"
    )
    print(locality.line())
    if not result.success:
        print(f"still missing ({len(r.failing)} facts): {', '.join(r.failing[:10])}")
    print(f"adapter and report.json in {out}")
    return 0 if result.success else 3


def cmd_compare(args) -> int:
    """Side by side: the base model's greedy answer and the adapter's, for each fact."""
    from peft import PeftModel

    base = Base(args.model)
    facts = base.encode(args.facts, args.max_facts)
    model = PeftModel.from_pretrained(base.model, args.adapter)
    model.eval()
    exact = 0
    for fact in facts[: args.limit]:
        n = len(fact.target_ids)
        with model.disable_adapter():
            before = greedy_continuation(model, fact.prompt_ids, n, base.pad_id)
        after = greedy_continuation(model, fact.prompt_ids, n, base.pad_id)
        target = list(fact.target_ids)
        exact += after == target
        verdict = "✓" if after == target else f"✗ expected {base.tokenizer.decode(target)!r}"
        print(f"{fact.form}: {fact.asked}")
        print(f"  base:    {base.tokenizer.decode(before)!r}")
        print(f"  updated: {base.tokenizer.decode(after)!r}  {verdict}")
    shown = min(len(facts), args.limit)
    report = measure_recall(model, facts, base.pad_id)
    print(
        f"greedy verbatim: {exact}/{shown} facts; teacher-forced fact recall "
        f"{report.fact_recall:.3f}, token recall {report.token_recall:.3f}, "
        f"lowest p {report.min_prob:.3f}"
    )
    return 0 if exact == shown else 3


def cmd_calibrate(args) -> int:
    from tqdm import tqdm

    from memupdate.memory.calibration import (
        Grid,
        calibrate,
        fact_set_source,
        file_source,
        fill_novel_shares,
        fit_with_holdout,
        folder_points,
        load_points,
        plot,
    )
    from memupdate.memory.planning import shipped_law_path, user_law_path

    base = Base(args.model)
    family = base.family(args)
    grid = Grid(
        ranks=parse_ints(args.ranks),
        lengths=parse_ints(args.lengths),
        seeds=parse_ints(args.seeds),
        steps=None if args.epochs else args.steps,
        epochs=args.epochs,
        min_steps=args.min_steps,
        kinds=(f"file:{Path(args.facts).name}",) if args.facts else parse_kinds(args.kinds),
    )
    if args.facts:  # read and checked once, before any training
        user_facts = base.encode(args.facts, args.max_facts)
        if sequence_length(user_facts) < max(grid.lengths):
            raise LawError(
                f"{args.facts} holds {sequence_length(user_facts)} target tokens, fewer than "
                f"the largest ℓ asked for ({max(grid.lengths)})"
            )
        source = partial(file_source, user_facts)
    else:
        source = partial(fact_set_source, base.encode_facts)

    out = Path(args.out)
    bar = tqdm(
        total=len(list(grid.runs())), desc="calibration runs", unit="run", disable=args.quiet
    )

    steps = tqdm(desc="  steps", unit="step", position=1, leave=False, disable=args.quiet)

    def on_run(key, point):
        bar.update(1)
        bar.set_postfix(
            run=key, dL=f"{point.loss_reduction:.3f}", fact_recall=f"{point.fact_recall:.2f}"
        )

    def on_progress(key, p: Progress):
        if steps.total != p.max_steps or p.step < steps.n:  # a new run
            steps.reset(total=p.max_steps)
            steps.set_description(f"  {key}")
        steps.update(p.step - steps.n)
        steps.set_postfix(fact_recall=f"{p.fact_recall:.2f}", active=p.active_facts)

    points = calibrate(
        lambda: load_model(base.folder),
        family,
        grid,
        out,
        source,
        on_run,
        on_progress,
    )
    steps.close()
    bar.close()
    if args.length == "novel":  # points recorded before the share was measured
        filled = fill_novel_shares(out / "points.jsonl", base.model, base.pad_id, source)
        if filled:
            print(f"measured the novel share of {filled} earlier point(s)")
        done = load_points(out / "points.jsonl")
        points = [done[p.source] for p in points]
    training = grid.training()
    if args.fit_all:  # the law holds for the kinds its points came from, not this part's alone
        points = folder_points(out, grid)
        training["facts"] = ",".join(dict.fromkeys(p.kind for p in points))
    law = fit_with_holdout(
        points,
        args.response,
        args.length,
        base_model=base.identity.to_dict(),
        family=family.to_dict(),
        training=training,
    )
    law.save(out / "law.json")
    plot(law, out / "law.png")
    print(
        f"law: C={law.C:.4g} alpha={law.alpha:.3f} beta={law.beta:.3f} b={law.b:.4f} "
        f"L50={law.L50:.3f} k={law.k:.2f}; fit {law.fit}"
    )
    print(f"wrote {out / 'law.json'} and {out / 'law.png'}")
    if args.install:
        target = user_law_path(base.identity, family)
        law.save(target)
        print(f"installed for planning: {target}")
    if args.ship:
        target = shipped_law_path(base.identity, family)
        law.save(target)
        print(f"shipped with the package: {target}")
    return 0


def add_commands(sub) -> None:
    model = sub.add_parser("model", help="base model management")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser("prepare", help="convert the embedded default model once")
    prepare.add_argument("--tiny", action="store_true", help="build the tiny test model instead")
    prepare.set_defaults(func=cmd_model_prepare)

    pb = sub.add_parser("phonebook", help="write seeded synthetic phonebook facts")
    pb.add_argument("--count", type=int, required=True)
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--digits", type=int, default=10)
    pb.add_argument("--out", required=True)
    pb.set_defaults(func=cmd_phonebook)

    fs = sub.add_parser("fact-set", help="write a seeded fact set of one kind (for benchmarks)")
    fs.add_argument("kind", choices=sorted(KINDS))
    fs.add_argument("--count", type=int, required=True)
    fs.add_argument("--seed", type=int, default=0)
    fs.add_argument("--out", required=True)
    fs.set_defaults(func=cmd_fact_set)

    plan = sub.add_parser("plan", help="choose a rank with the law (dry run)")
    plan.add_argument("facts")
    plan.add_argument("--target-recall", type=float, required=True, help="fact recall in (0, 1]")
    plan.add_argument(
        "--max-rank",
        type=int,
        default=DEFAULT_MAX_RANK,
        help="serving limit (vLLM --max-lora-rank)",
    )
    plan.add_argument("--json", action="store_true")
    add_model_args(plan)
    plan.set_defaults(func=cmd_plan)

    train = sub.add_parser("train", help="train an adapter with MemFT (or the uniform baseline)")
    train.add_argument("facts")
    train.add_argument("--out", required=True)
    how = train.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int)
    how.add_argument("--target-recall", type=float, help="let the law choose the rank")
    train.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK)
    train.add_argument("--mode", choices=MODES, default="memft")
    train.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument(
        "--max-steps",
        type=int,
        help=f"step budget (default: the law's budget for these facts, at least "
        f"{MIN_TRAINING_STEPS})",
    )
    train.add_argument("--max-seconds", type=float)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--greedy-sample",
        type=int,
        default=64,
        help="facts checked by greedy decoding after training",
    )
    train.add_argument("--force", action="store_true", help="replace an existing --out folder")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(train)
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="base vs adapter greedy answers for each fact")
    compare.add_argument("facts")
    compare.add_argument("--adapter", required=True, help="adapter folder written by `train`")
    compare.add_argument("--limit", type=int, default=20, help="facts to show")
    add_model_args(compare)
    compare.set_defaults(func=cmd_compare)

    cal = sub.add_parser("calibrate", help="fit the law from a grid of trainings (resumable)")
    cal.add_argument("--ranks", default="1,2,4,8,16")
    cal.add_argument("--lengths", default="110,220,440,880", help="ℓ values, target tokens")
    cal.add_argument("--seeds", default="0")
    cal.add_argument(
        "--kinds",
        default="phonebook",
        help=f"seeded fact sets to calibrate on, comma list of {', '.join(KINDS)}",
    )
    cal.add_argument(
        "--facts",
        help="your own fact file, sliced to each ℓ (shuffled by seed), instead of --kinds",
    )
    cal.add_argument(
        "--response",
        choices=list(LAW_FORMS),
        default="relative",
        help="what the law's power term predicts: ΔL/L0 (relative) or ΔL (absolute)",
    )
    cal.add_argument(
        "--length",
        choices=list(LAW_LENGTHS),
        default="novel",
        help="what the law's ℓ counts: every target token, or those the base model cannot "
        "predict with other facts in context (novel; measured for earlier points that lack it)",
    )
    budget = cal.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=150, help="training budget per run (steps)")
    budget.add_argument(
        "--epochs", type=int, help="training budget per run in passes over its facts"
    )
    cal.add_argument(
        "--min-steps",
        type=int,
        default=MIN_TRAINING_STEPS,
        help="an epoch budget's floor in steps (jobs get the same)",
    )
    cal.add_argument("--out", required=True, help="folder for points.jsonl, law.json, law.png")
    cal.add_argument(
        "--fit-all",
        action="store_true",
        help="fit every point in the folder's points.jsonl (a calibration run in parts, with "
        "the same family and budget), not only this grid's",
    )
    cal.add_argument(
        "--install",
        action="store_true",
        help="also install the law in $MEMUPDATE_HOME/laws for `plan`",
    )
    cal.add_argument(
        "--ship",
        action="store_true",
        help="also write it into the package data/laws (developers, for a release)",
    )
    cal.add_argument("--quiet", action="store_true")
    add_model_args(cal)
    cal.set_defaults(func=cmd_calibrate)
