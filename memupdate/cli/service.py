"""`memupdate serve` (the gRPC knowledge-update service) and `memupdate worker` (a training
worker on another host, sharing the server's Postgres job store and registry)."""

from memupdate.cli.common import parse_ints


def _config(args):
    from memupdate.service.config import ServiceConfig

    serve_only = {"workers", "grpc_port", "probe_interval", "vllm_host", "vllm_port"}
    for name in serve_only:  # `memupdate worker` has no such flags
        setattr(args, name, getattr(args, name, None))
    return ServiceConfig.load(
        args.config,
        database_url=args.database_url,
        registry_dir=args.registry_dir,
        workers=args.workers,
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
        adapter_layers=parse_ints(args.adapter_layers) if args.adapter_layers else None,
        adapter_learning_rate=args.adapter_lr,
        adapter_locality_weight=args.adapter_locality_weight,
        adapter_norm_weight=args.adapter_norm_weight,
        adapter_train_until=args.adapter_train_until,
        gate=args.gate,
        adapter_per_update=args.adapter_per_update,
    )


def cmd_serve(args) -> int:
    from memupdate.logs import configure
    from server.app import serve

    configure()
    serve(_config(args))
    return 0


def cmd_worker(args) -> int:
    from memupdate.logs import configure
    from memupdate.service.worker import run_worker_process

    configure()
    run_worker_process(_config(args))
    return 0


def _shared_options(cmd) -> None:
    """Options of both `serve` and `worker` (a worker reads the same settings)."""
    cmd.add_argument("--config", help="JSON file of settings (MEMUPDATE_* env vars also work)")
    cmd.add_argument("--data-dir", help="this host's working folder")
    cmd.add_argument(
        "--database-url",
        help="Postgres URL of the shared job store and registry index (default: SQLite files "
        "in the data directory)",
    )
    cmd.add_argument(
        "--registry-dir", help="adapter registry folder, on a volume every host mounts"
    )
    cmd.add_argument("--model", help="local HF model folder (default: SmolLM2-135M-Instruct)")
    cmd.add_argument("--vllm-url", action="append", help="external vLLM replica (repeatable)")
    cmd.add_argument("--max-lora-rank", type=int)
    cmd.add_argument("--metrics-port", type=int)
    cmd.add_argument("--grpc-host", help="address the gRPC and metrics endpoints listen on")
    cmd.add_argument(
        "--adapter-modules",
        help="projections each adapter trains, comma list (default: all attention and MLP); "
        "the law is looked up for this family",
    )
    cmd.add_argument(
        "--adapter-layers",
        help="layers each adapter trains, comma list (default: one layer at 5/6 depth)",
    )
    cmd.add_argument("--adapter-lr", type=float, help="the adapter family's learning rate")
    cmd.add_argument(
        "--adapter-locality-weight",
        type=float,
        help="the adapter family's locality weight (0: no KL term)",
    )
    cmd.add_argument(
        "--adapter-norm-weight",
        type=float,
        help="the adapter family's weight of the update's norm on unrelated text (0: off)",
    )
    cmd.add_argument(
        "--adapter-train-until",
        type=float,
        help="the adapter family's training line: MemFT trains a token until its p is above it",
    )
    cmd.add_argument(
        "--gate",
        action="store_true",
        default=None,
        help="publish each version with a prompt gate: vLLM answers prompts unlike any stored "
        "fact with the base model (jobs then train the gated family: lr 5e-3, line 0.99)",
    )
    cmd.add_argument(
        "--adapter-per-update",
        action="store_true",
        default=None,
        help="with --gate: each update trains an adapter of its own for its new facts, never "
        "the old ones, and the gate routes each request to the adapter that holds its fact",
    )


def add_commands(sub) -> None:
    srv = sub.add_parser("serve", help="run the gRPC knowledge-update service")
    _shared_options(srv)
    srv.add_argument(
        "--workers",
        type=int,
        help="training workers in this process (default 1; 0 when `memupdate worker` "
        "processes take the jobs)",
    )
    srv.add_argument("--grpc-port", type=int)
    srv.add_argument("--vllm-host", help="managed vLLM's OpenAI API host (default 127.0.0.1)")
    srv.add_argument("--vllm-port", type=int, help="managed vLLM's port (default: a free one)")
    srv.add_argument(
        "--probe-interval", type=float, help="seconds between recall probes (0 = on demand only)"
    )
    srv.set_defaults(func=cmd_serve)

    wrk = sub.add_parser(
        "worker",
        help="take training jobs from a shared Postgres job store (one per GPU or CPU host)",
    )
    _shared_options(wrk)
    wrk.set_defaults(func=cmd_worker)
