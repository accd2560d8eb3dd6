"""Start-up: the job store, the runtimes, the serving backend, the worker and the gRPC server
(with health checking and reflection), the recall monitor, and the metrics endpoint."""

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from memupdate.database import redact
from memupdate.memory.base_model import resolve_model_dir
from memupdate.service.config import ServiceConfig
from memupdate.service.metrics import REPLICA_UP, register_collectors, unregister_collectors
from memupdate.service.monitor import MonitorSettings, RecallMonitor
from memupdate.service.runtime import (
    in_passing_thread,
    load_runtime,
    open_job_store,
    open_registry,
)
from memupdate.service.worker import Worker
from memupdate.serving.backends import ExternalBackend, ManagedBackend, ServingBackend, restore_live
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_client import ask_base_locality
from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig
from memupdate.v1 import memupdate_pb2, memupdate_pb2_grpc
from server.auth import AuthInterceptor
from server.servicer import Servicer

log = logging.getLogger("memupdate.server")
SERVICE_NAME = memupdate_pb2.DESCRIPTOR.services_by_name["KnowledgeUpdate"].full_name


@dataclass
class Service:
    config: ServiceConfig
    grpc_server: grpc.Server
    grpc_port: int
    workers: list[Worker]
    monitor: RecallMonitor
    backend: ServingBackend
    health: health.HealthServicer
    metrics_server: object
    collectors: list

    def stop(self) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace=5).wait()
        for worker in self.workers:
            worker.stop()
        self.monitor.stop()
        self.metrics_server.shutdown()
        unregister_collectors(self.collectors)
        if isinstance(self.backend, ManagedBackend):
            self.backend.close()


def build_backend(config: ServiceConfig, model_folder, registry: Registry) -> ServingBackend:
    if config.vllm_urls:
        backend = ExternalBackend(config.vllm_urls, config.max_lora_rank)
    else:
        server = ManagedVLLM(
            ServerConfig(
                model=model_folder,
                host=config.vllm_host,
                port=config.vllm_port,
                max_lora_rank=config.max_lora_rank,
                max_loras=config.max_loras,
            ),
            log_path=config.data_dir / "vllm.log",
        )
        server.start()
        backend = ManagedBackend(server)
        backend.watch(registry)
    restore_live(registry, backend)
    return backend


def bind_ports(config: ServiceConfig) -> tuple[grpc.Server, int, object]:
    """The gRPC server with its port bound (not started yet) and the metrics endpoint: taken
    before vLLM starts, which opens ports of its own that could otherwise take ours."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    interceptors = [AuthInterceptor(config.auth_tokens)] if config.auth_tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_watch_streams + 32),
        options=options,
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    address = f"{config.grpc_host}:{config.grpc_port}"
    if config.tls_cert and config.tls_key:
        creds = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    metrics_server, _ = start_http_server(config.metrics_port, addr=config.grpc_host)
    return server, port, metrics_server


def start(config: ServiceConfig) -> Service:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_job_store(config)
    registry = open_registry(config)
    folder = resolve_model_dir(config.model)
    server, port, metrics_server = bind_ports(config)
    try:
        return _start_on(config, store, registry, folder, server, port, metrics_server)
    except BaseException:
        metrics_server.shutdown()
        server.stop(None)
        raise


def _start_on(config, store, registry, folder, server, port, metrics_server) -> Service:
    """Load the models, start vLLM (or reach the replicas), wire the servicer and start."""
    backend = build_backend(config, folder, registry)

    def load_and_prepare():
        plan_rt = load_runtime(config, registry, backend)
        runtimes = [load_runtime(config, registry, backend) for _ in range(config.workers)]
        for rt in runtimes:
            rt.prepare()
        # Before any job: asked while a job trains, vLLM and the training contend for the same
        # cores (measured in `make demo` on 2 cores: planning 23-50 s instead of 6 s).
        ask_base_locality(backend.replicas(), plan_rt.model, plan_rt.tokenizer)
        return plan_rt, runtimes

    # Not in this thread, which lives on: the trainings would run 1.35x slower.
    plan_rt, runtimes = in_passing_thread(load_and_prepare)
    workers = [Worker(store, rt, lease_s=config.lease_s) for rt in runtimes]
    monitor = RecallMonitor(
        registry,
        backend,
        plan_rt.encode,
        plan_rt.tokenizer,
        MonitorSettings(
            config.probe_interval_s,
            config.probe_max_facts,
            config.probe_greedy_facts,
            config.recall_max_drop,
        ),
    )
    for client in backend.replicas():
        REPLICA_UP.labels(client.url).set(float(client.healthy()))

    # Without a local worker the servicer's registry, backend and estimates come from the
    # planning runtime (training-time estimates stay unknown: the trainings run elsewhere).
    train_rt = workers[0].runtime if workers else plan_rt
    memupdate_pb2_grpc.add_KnowledgeUpdateServicer_to_server(
        Servicer(store, train_rt, plan_rt, monitor, config), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    collectors = register_collectors(registry, store)
    server.start()
    for worker in workers:
        worker.start()
    if config.probe_interval_s > 0:
        monitor.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Service(
        config, server, port, workers, monitor, backend, health_servicer, metrics_server, collectors
    )


def serve(config: ServiceConfig) -> None:
    """Run until SIGINT or SIGTERM; print where everything listens."""
    service = start(config)
    vllm = ", ".join(c.url for c in service.backend.replicas())
    tls = " (TLS)" if config.tls_cert else ""
    print(f"memupdate gRPC on {config.grpc_host}:{service.grpc_port}{tls}", flush=True)
    print(f"metrics on http://{config.grpc_host}:{config.metrics_port}/metrics", flush=True)
    print(f"vLLM (OpenAI API) on {vllm}", flush=True)
    print(f"data in {config.data_dir}", flush=True)
    if config.database_url:
        print(f"jobs and registry index in Postgres at {redact(config.database_url)}", flush=True)
    if not config.workers:
        print("no local worker: `memupdate worker` processes take the jobs", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    print("stopping", flush=True)
    service.stop()
