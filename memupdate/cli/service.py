"""`memupdate serve`: the gRPC knowledge-update service."""


def cmd_serve(args) -> int:
    from memupdate.logs import configure
    from memupdate.service.config import ServiceConfig
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
        adapter_locality_weight=args.adapter_locality_weight,
    )
    serve(config)
    return 0


def add_commands(sub) -> None:
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
    srv.add_argument(
        "--adapter-locality-weight",
        type=float,
        help="the adapter family's locality weight (0: no locality term)",
    )
    srv.set_defaults(func=cmd_serve)
