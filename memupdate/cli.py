"""`memupdate` command line: prepare the model, plan an update, train an adapter."""

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from memupdate.adapter import (
    AdapterFamily,
    check_adapter_for_model,
    choose_family,
    params_per_rank,
)
from memupdate.base_model import (
    ModelError,
    load_model,
    model_identity,
    prepare_default_model,
    resolve_model_dir,
)
from memupdate.encoding import encode_facts, model_context_length, sequence_length
from memupdate.facts import DEFAULT_MAX_FACTS, FactError, load_facts, write_facts
from memupdate.home import home
from memupdate.jobs import JobStoreError
from memupdate.law import LawError, LawPoint
from memupdate.memft import DEFAULT_MARGIN, MODES, Progress, TrainSettings, train_adapter
from memupdate.phonebook import phonebook_facts
from memupdate.planning import DEFAULT_MAX_RANK, plan_update, record_training
from memupdate.recall import greedy_check, greedy_continuation, locality, measure_recall
from memupdate.tiny_model import prepare_tiny_model
from memupdate.vllm_client import ServingError


class Base:
    """A loaded base model with what every command needs beside it."""

    def __init__(self, model_arg: str | None):
        self.folder = resolve_model_dir(model_arg)
        self.identity = model_identity(self.folder)
        self.model, self.tokenizer = load_model(self.folder)
        self.pad_id = self.tokenizer.pad_token_id

    def encode_facts(self, facts):
        return encode_facts(facts, self.tokenizer, model_context_length(self.model))

    def encode(self, path: str, max_facts: int):
        return self.encode_facts(load_facts(path, max_facts=max_facts))

    def family(self, args) -> AdapterFamily:
        layers = "default"
        if args.layers:
            layers = None if args.layers == "all" else tuple(int(x) for x in args.layers.split(","))
        modules = tuple(args.modules.split(",")) if args.modules else None
        return choose_family(self.model.config.num_hidden_layers, modules, layers, args.lr)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model folder (default: SmolLM2-135M)")
    p.add_argument("--max-facts", type=int, default=DEFAULT_MAX_FACTS)
    p.add_argument("--layers", help="layers to adapt: comma list or 'all' (default: 2/3 depth)")
    p.add_argument("--lr", type=float, help="learning rate (default: the family's)")
    p.add_argument(
        "--modules",
        help="projections to adapt, comma list (default: all attention and MLP projections)",
    )


def cmd_model_prepare(args) -> int:
    folder = prepare_tiny_model() if args.tiny else prepare_default_model()
    print(f"{folder}  {model_identity(folder).to_dict()}")
    return 0


def cmd_phonebook(args) -> int:
    write_facts(phonebook_facts(args.count, seed=args.seed, digits=args.digits), args.out)
    print(f"wrote {args.count} phonebook facts to {args.out}")
    return 0


def cmd_plan(args) -> int:
    base = Base(args.model)
    facts = base.encode(args.facts, args.max_facts)
    family = base.family(args)
    report = plan_update(
        base.model,
        facts,
        base.pad_id,
        base.identity,
        family,
        args.target_recall,
        max_rank=args.max_rank,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    predicted = (
        "n/a (no law)"
        if report.predicted_fact_recall is None
        else f"{report.predicted_fact_recall:.3f}"
    )
    print(f"facts:                   {report.facts}")
    print(f"sequence length ℓ:       {report.sequence_length} target tokens")
    print(f"base loss on targets:    {report.loss_before_nats:.3f} nats/token")
    print(f"chosen rank:             {report.rank}  (serving limit {args.max_rank})")
    print(f"adapter parameters:      {report.adapter_params:,}")
    print(f"target fact recall:      {report.target_recall}")
    print(f"predicted fact recall:   {predicted}")
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
        plan = plan_update(
            base.model,
            facts,
            base.pad_id,
            base.identity,
            family,
            args.target_recall,
            max_rank=args.max_rank,
        )
        print(f"law chose rank {plan.rank} for ℓ={plan.sequence_length} ({plan.law})")
    rank = args.rank or plan.rank
    settings = TrainSettings(
        rank=rank,
        family=family,
        mode=args.mode,
        margin=args.margin,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        max_seconds=args.max_seconds,
        seed=args.seed,
    )
    from tqdm import tqdm

    bar = tqdm(total=args.max_steps, desc=f"{args.mode} r={rank}", unit="step", disable=args.quiet)

    def show(p: Progress) -> None:
        bar.update(p.step - bar.n)
        bar.set_postfix(
            loss=f"{p.loss:.3f}",
            token_recall=f"{p.token_recall:.3f}",
            fact_recall=f"{p.fact_recall:.3f}",
            active=p.active_facts,
        )

    peft_model, result = train_adapter(base.model, facts, base.pad_id, settings, show)
    bar.close()
    greedy = greedy_check(peft_model, facts, base.pad_id, limit=args.greedy_sample)
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
        "locality": locality(peft_model, base.tokenizer),
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
        LawPoint(
            rank=rank,
            sequence_length=result.sequence_length,
            loss_before_nats=result.loss_before_nats,
            loss_after_nats=result.recall.mean_loss_nats,
            fact_recall=result.recall.fact_recall,
            token_recall=result.recall.token_recall,
            params=report["adapter_params"],
            source=f"train:{out.name}",
            steps=result.steps,
            facts=len(facts),
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
        f"steps {result.steps}, tokens {result.tokens_processed:,}, {result.seconds:.1f} s; "
        f"greedy exact {greedy.exact}/{greedy.checked}; locality {report['locality']:.2f}"
    )
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
        print(f"prompt:  {base.tokenizer.decode(list(fact.prompt_ids))}")
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

    from memupdate.calibration import (
        Grid,
        calibrate,
        file_source,
        fit_with_holdout,
        phonebook_source,
        plot,
    )
    from memupdate.planning import shipped_law_path, user_law_path

    base = Base(args.model)
    family = base.family(args)
    grid = Grid(
        ranks=_ints(args.ranks),
        lengths=_ints(args.lengths),
        seeds=_ints(args.seeds),
        steps=None if args.epochs else args.steps,
        epochs=args.epochs,
        facts=f"file:{Path(args.facts).name}" if args.facts else "phonebook",
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
        source = partial(phonebook_source, base.encode_facts)

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
    law = fit_with_holdout(
        points,
        base_model=base.identity.to_dict(),
        family=family.to_dict(),
        training=grid.training(),
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


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _registry(args):
    from memupdate.registry import Registry

    return Registry(Path(args.registry) if args.registry else home() / "registry")


@contextmanager
def _backend(args, model_folder: Path):
    """External replicas from --vllm-url (or MEMUPDATE_VLLM_URLS), else a managed local server
    that lives for this command."""
    from memupdate.serving import ExternalBackend, ManagedBackend
    from memupdate.vllm_server import ManagedVLLM, ServerConfig

    urls = args.vllm_url or [u for u in os.environ.get("MEMUPDATE_VLLM_URLS", "").split(",") if u]
    if urls:
        yield ExternalBackend(urls, args.max_lora_rank)
        return
    server = ManagedVLLM(
        ServerConfig(model=model_folder, max_lora_rank=args.max_lora_rank),
        log_path=home() / "vllm.log",
    )
    print(f"starting a managed vLLM on 127.0.0.1:{server.port} (log: {home() / 'vllm.log'})")
    with server:
        yield ManagedBackend(server)


def _print_serving(result_per_replica) -> None:
    for url, r in result_per_replica.items():
        rec = r.recall
        print(
            f"  {url}: fact recall {rec.fact_recall:.3f}, token recall {rec.token_recall:.3f}, "
            f"lowest p {rec.min_prob:.3f} ({rec.min_prob_fact}); greedy exact "
            f"{r.greedy_exact}/{r.greedy_checked}"
        )


def cmd_publish(args) -> int:
    from memupdate.serving import verify_and_go_live

    base = Base(args.model)
    facts = load_facts(args.facts, max_facts=args.max_facts)
    encoded = base.encode_facts(facts)
    registry = _registry(args)
    report_file = Path(args.adapter) / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    rank = check_adapter_for_model(args.adapter, base.folder)  # before starting any server
    with _backend(args, base.folder) as backend:
        backend.check_rank(rank)
        version = registry.publish(
            args.kb,
            Path(args.adapter),
            {"base_model": base.identity.to_dict(), "training": report},
            facts,
        )
        print(f"published {args.kb} v{version.version} ({version.path})")
        result = verify_and_go_live(
            registry,
            backend,
            version,
            encoded,
            base.tokenizer,
            args.target_recall,
            greedy_limit=args.greedy_sample,
        )
        _print_serving(result.per_replica)
        print(result.reason)
    return 0 if result.live else 3


def cmd_serve_check(args) -> int:
    from memupdate.vllm_client import serving_recall

    registry = _registry(args)
    live = registry.live(args.kb)
    if live is None:
        raise FactError(f"knowledge base {args.kb!r} has no live version")
    base = Base(args.model)
    encoded = base.encode_facts(live.facts())
    with _backend(args, base.folder) as backend:
        backend.ensure_up(registry)
        print(f"{args.kb} v{live.version}: {len(encoded)} facts, serving recall through vLLM:")
        results = {
            c.url: serving_recall(c, args.kb, encoded, base.tokenizer, args.greedy_sample)
            for c in backend.replicas()
        }
        _print_serving(results)
    return 0 if all(r.recall.fact_recall == 1.0 for r in results.values()) else 3


def cmd_rollback(args) -> int:
    from memupdate.serving import rollback

    registry = _registry(args)
    base_folder = resolve_model_dir(args.model)
    with _backend(args, base_folder) as backend:
        previous = rollback(registry, backend, args.kb)
    print(f"{args.kb}: v{previous.version} is live again")
    return 0


def cmd_kbs(args) -> int:
    registry = _registry(args)
    for kb in registry.knowledge_bases():
        live = registry.live(kb)
        versions = registry.versions(kb)
        print(
            f"{kb}: live v{live.version if live else '-'}; versions "
            + ", ".join(
                f"v{v.version}(r={v.rank}{', verified' if v.serving else ''})" for v in versions
            )
        )
    return 0


def cmd_serve(args) -> int:
    from memupdate.config import ServiceConfig
    from memupdate.logs import configure
    from server.app import serve

    configure()
    config = ServiceConfig.load(
        args.config,
        data_dir=args.data_dir,
        model=args.model,
        grpc_host=args.grpc_host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        vllm_urls=args.vllm_url,
        max_lora_rank=args.max_lora_rank,
        probe_interval_s=args.probe_interval,
        vllm_host=args.vllm_host,
        vllm_port=args.vllm_port,
        adapter_modules=args.adapter_modules.split(",") if args.adapter_modules else None,
        adapter_learning_rate=args.adapter_lr,
    )
    serve(config)
    return 0


def _add_serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", help="registry folder (default: $MEMUPDATE_HOME/registry)")
    p.add_argument(
        "--vllm-url",
        action="append",
        help="an existing vLLM replica (repeat for several); default: "
        "$MEMUPDATE_VLLM_URLS, else a managed local server",
    )
    p.add_argument("--max-lora-rank", type=int, default=64, help="the servers' --max-lora-rank")
    p.add_argument(
        "--greedy-sample",
        type=int,
        default=64,
        help="facts checked by greedy generation through serving",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memupdate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    _add_model_args(plan)
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
    train.add_argument("--max-steps", type=int, default=2000)
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
    _add_model_args(train)
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="base vs adapter greedy answers for each fact")
    compare.add_argument("facts")
    compare.add_argument("--adapter", required=True, help="adapter folder written by `train`")
    compare.add_argument("--limit", type=int, default=20, help="facts to show")
    _add_model_args(compare)
    compare.set_defaults(func=cmd_compare)

    cal = sub.add_parser("calibrate", help="fit the law from a grid of trainings (resumable)")
    cal.add_argument("--ranks", default="1,2,4,8,16")
    cal.add_argument("--lengths", default="110,220,440,880", help="ℓ values, target tokens")
    cal.add_argument("--seeds", default="0")
    cal.add_argument(
        "--facts",
        help="your own fact file, sliced to each ℓ (shuffled by seed); default: phonebook facts",
    )
    budget = cal.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=150, help="training budget per run (steps)")
    budget.add_argument(
        "--epochs", type=int, help="training budget per run in passes over its facts"
    )
    cal.add_argument("--out", required=True, help="folder for points.jsonl, law.json, law.png")
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
    _add_model_args(cal)
    cal.set_defaults(func=cmd_calibrate)

    pub = sub.add_parser("publish", help="publish an adapter, verify it through vLLM, go live")
    pub.add_argument("kb", help="knowledge base name (the model name clients ask vLLM for)")
    pub.add_argument("adapter", help="adapter folder written by `train`")
    pub.add_argument("facts", help="every fact the adapter holds (the whole knowledge base)")
    pub.add_argument(
        "--target-recall", type=float, default=1.0, help="serving fact recall required to go live"
    )
    _add_model_args(pub)
    _add_serving_args(pub)
    pub.set_defaults(func=cmd_publish)

    check = sub.add_parser("serve-check", help="serving recall of a live knowledge base")
    check.add_argument("kb")
    _add_model_args(check)
    _add_serving_args(check)
    check.set_defaults(func=cmd_serve_check)

    back = sub.add_parser("rollback", help="serve the previous verified version again")
    back.add_argument("kb")
    _add_model_args(back)
    _add_serving_args(back)
    back.set_defaults(func=cmd_rollback)

    srv = sub.add_parser("serve", help="run the gRPC knowledge-update service")
    srv.add_argument("--config", help="JSON file of settings (MEMUPDATE_* env vars also work)")
    srv.add_argument("--data-dir")
    srv.add_argument("--model", help="local HF model folder (default: SmolLM2-135M-Instruct)")
    srv.add_argument("--grpc-host")
    srv.add_argument("--grpc-port", type=int)
    srv.add_argument("--metrics-port", type=int)
    srv.add_argument("--vllm-url", action="append", help="external vLLM replica (repeatable)")
    srv.add_argument("--max-lora-rank", type=int)
    srv.add_argument("--vllm-host", help="managed vLLM's OpenAI API host (default 127.0.0.1)")
    srv.add_argument("--vllm-port", type=int, help="managed vLLM's port (default: a free one)")
    srv.add_argument(
        "--probe-interval", type=float, help="seconds between recall probes (0 = on demand only)"
    )
    srv.add_argument(
        "--adapter-modules",
        help="projections each adapter trains, comma list (default: all attention and MLP); "
        "the law is looked up for this family",
    )
    srv.add_argument("--adapter-lr", type=float, help="the adapter family's learning rate")
    srv.set_defaults(func=cmd_serve)

    kbs = sub.add_parser("kbs", help="list knowledge bases and their versions")
    kbs.add_argument("--registry")
    kbs.set_defaults(func=cmd_kbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FactError, LawError, ModelError, ServingError, JobStoreError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
