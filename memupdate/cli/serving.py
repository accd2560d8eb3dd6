"""Serving commands without the service: publish an adapter through vLLM, check serving recall,
roll back, list knowledge bases."""

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

from memupdate.cli.common import Base, add_model_args
from memupdate.home import home
from memupdate.memory.adapter import (
    check_adapter_for_model,
)
from memupdate.memory.base_model import (
    resolve_model_dir,
)
from memupdate.memory.facts import FactError, load_facts


def _registry(args):
    """The registry folder; its index in Postgres when MEMUPDATE_DATABASE_URL names one (as the
    service's does across hosts), else registry.db inside it."""
    from memupdate.serving.registry import Registry

    folder = Path(args.registry) if args.registry else home() / "registry"
    return Registry(folder, os.environ.get("MEMUPDATE_DATABASE_URL") or None)


@contextmanager
def _backend(args, model_folder: Path):
    """External replicas from --vllm-url (or MEMUPDATE_VLLM_URLS), else a managed local server
    that lives for this command."""
    from memupdate.serving.backends import ExternalBackend, ManagedBackend
    from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig

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
    from memupdate.serving.backends import verify_and_go_live

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
    from memupdate.serving.vllm_client import serving_recall

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
    from memupdate.serving.backends import rollback

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


def add_commands(sub) -> None:
    pub = sub.add_parser("publish", help="publish an adapter, verify it through vLLM, go live")
    pub.add_argument("kb", help="knowledge base name (the model name clients ask vLLM for)")
    pub.add_argument("adapter", help="adapter folder written by `train`")
    pub.add_argument("facts", help="every fact the adapter holds (the whole knowledge base)")
    pub.add_argument(
        "--target-recall", type=float, default=1.0, help="serving fact recall required to go live"
    )
    add_model_args(pub)
    _add_serving_args(pub)
    pub.set_defaults(func=cmd_publish)

    check = sub.add_parser("serve-check", help="serving recall of a live knowledge base")
    check.add_argument("kb")
    add_model_args(check)
    _add_serving_args(check)
    check.set_defaults(func=cmd_serve_check)

    back = sub.add_parser("rollback", help="serve the previous verified version again")
    back.add_argument("kb")
    add_model_args(back)
    _add_serving_args(back)
    back.set_defaults(func=cmd_rollback)

    kbs = sub.add_parser("kbs", help="list knowledge bases and their versions")
    kbs.add_argument("--registry")
    kbs.set_defaults(func=cmd_kbs)
