"""Service configuration: one pydantic settings object, from flags, MEMUPDATE_* environment
variables and an optional JSON file (flags win over the environment, which wins over the file)."""

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from memupdate.database import is_postgres
from memupdate.home import home
from memupdate.memory.adapter import check_layers, check_modules
from memupdate.service.jobs import DEFAULT_LEASE_S


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMUPDATE_", extra="forbid")

    data_dir: Path = Field(default_factory=lambda: home() / "service")
    model: str | None = None  # local HF folder; None = the embedded default
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    metrics_port: int = 9464
    # External vLLM replicas; empty = a managed local server. MEMUPDATE_VLLM_URLS takes the same
    # comma list as the `publish`/`serve-check`/`rollback` commands (or a JSON list).
    vllm_urls: Annotated[list[str], NoDecode] = []
    # The managed server's OpenAI API address (what applications call); port 0 = any free one.
    vllm_host: str = "127.0.0.1"
    vllm_port: int = Field(default=0, ge=0, le=65535)
    max_lora_rank: int = 64
    max_loras: int = 4
    # Bearer tokens: token -> role ("writer" or "reader"). Empty = no authentication.
    auth_tokens: dict[str, str] = {}
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_queued_jobs: int = 100
    max_facts_per_update: int = 100_000
    max_message_bytes: int = 64 * 1024 * 1024
    # Open WatchJob streams (each holds a server thread) and RPCs in flight; beyond either the
    # call is refused with RESOURCE_EXHAUSTED, so watchers never starve status calls.
    max_watch_streams: int = Field(default=32, ge=1)
    max_concurrent_rpcs: int = Field(default=256, ge=1)
    # Training step budget when a request gives none: the law's budget for the base (epochs over
    # its facts), at least this many steps.
    default_max_steps: int = 2000
    # Train each new version from the live version's adapter (false: retrain the whole base
    # from a fresh adapter at every update, as the first builds did).
    warm_start: bool = True
    # Publish each version with a prompt gate (memupdate/memory/gate.py): vLLM's plugin answers a
    # request for the knowledge base with the base model unless it is close to a stored fact's
    # form, so prompts about other things keep the base model's answers exactly. Jobs then train
    # the gated family (a larger rate: faster, and facts reached from more wordings).
    gate: bool = False
    # With the gate: each update trains an adapter of its own for its new and changed facts (the
    # law plans for their ℓ alone) and never touches the older facts' adapters; the gate routes
    # each request to the adapter that holds its fact (memupdate/memory/routing.py). An update
    # then costs what is new at any base size.
    adapter_per_update: bool = False
    # With one adapter per update: how many facts of each older adapter a go-live check asks
    # through vLLM (a rotating window; 0: every fact of the base). The facts the new version
    # trained are always asked in full; an older adapter is unchanged since its own go-live
    # checked all of its facts, and the monitor's probes rotate through every fact.
    held_facts_checked: int = Field(default=2, ge=0)
    # The adapter family every job trains (and whose law plans the rank): empty / None keep the
    # default family's modules, learning rate, training line and locality terms' weights
    # (memupdate.memory.adapter.default_family, or gated_family with the gate on).
    adapter_modules: list[str] = []
    # Layers to adapt (empty: the default family's one layer at five sixths of the depth).
    adapter_layers: list[int] = []
    adapter_learning_rate: float | None = Field(default=None, gt=0)
    adapter_locality_weight: float | None = Field(default=None, ge=0)
    adapter_norm_weight: float | None = Field(default=None, ge=0)
    adapter_train_until: float | None = Field(default=None, gt=0.5, lt=1)
    # How long a job waits for unreachable vLLM replicas (retrying with backoff) before failing.
    serving_wait_s: float = Field(default=300.0, ge=0)
    # Training workers inside `memupdate serve` (each holds its own copy of the model); 0 when
    # `memupdate worker` processes on other hosts take the jobs.
    workers: int = Field(default=1, ge=0, le=16)
    # Postgres (postgresql://user:pass@host/db) for the job store and the registry's index,
    # shared by servers and workers on many hosts; empty = SQLite files in data_dir.
    database_url: str = ""
    # The adapter registry's folder: a volume every host mounts when workers run elsewhere.
    # Empty = data_dir/registry.
    registry_dir: Path | None = None
    # A worker holds each job under a lease this long, renewed every third of it; a worker
    # that dies is replaced on its job once the lease runs out.
    lease_s: float = Field(default=DEFAULT_LEASE_S, ge=3)
    # Recall monitor: seconds between probe rounds (0 = on demand only), facts per probe (the
    # cost bound), of those decoded greedily, and the drop below go-live recall that regresses.
    probe_interval_s: float = Field(default=300.0, ge=0)
    probe_max_facts: int = Field(default=64, ge=1)
    probe_greedy_facts: int = Field(default=8, ge=0)
    recall_max_drop: float = Field(default=0.05, ge=0, le=1)

    @field_validator("auth_tokens")
    @classmethod
    def _roles(cls, tokens: dict[str, str]) -> dict[str, str]:
        bad = {r for r in tokens.values() if r not in ("writer", "reader")}
        if bad:
            raise ValueError(f"auth token roles must be 'writer' or 'reader', got {sorted(bad)}")
        return tokens

    @field_validator("database_url")
    @classmethod
    def _database(cls, url: str) -> str:
        if url and not is_postgres(url):
            scheme = url.partition(":")[0]
            raise ValueError(f"database_url must be a postgresql:// URL, not {scheme!r}")
        return url

    @model_validator(mode="after")
    def _routed(self) -> "ServiceConfig":
        if self.adapter_per_update and not self.gate:
            raise ValueError(
                "adapter_per_update needs the gate (gate=true, `--gate`): the gate is what routes "
                "a request to the adapter that holds its fact"
            )
        return self

    @model_validator(mode="after")
    def _someone_trains(self) -> "ServiceConfig":
        if self.workers == 0 and not self.database_url:
            raise ValueError(
                "workers=0 leaves the jobs to `memupdate worker` processes, which need the "
                "shared Postgres job store: set database_url too, or keep a local worker"
            )
        return self

    @field_validator("vllm_urls", mode="before")
    @classmethod
    def _urls(cls, urls):
        if isinstance(urls, str):
            text = urls.strip()
            return json.loads(text) if text.startswith("[") else [u for u in text.split(",") if u]
        return urls

    @field_validator("adapter_modules")
    @classmethod
    def _modules(cls, modules: list[str]) -> list[str]:
        return check_modules(modules)

    @field_validator("adapter_layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        return check_layers(layers)

    @classmethod
    def load(cls, file: str | Path | None = None, **overrides) -> "ServiceConfig":
        values = json.loads(Path(file).read_text()) if file else {}
        env = cls()  # environment and defaults
        merged = {
            **values,
            **env.model_dump(exclude_unset=True),
            **{k: v for k, v in overrides.items() if v is not None},
        }
        return cls(**merged)
