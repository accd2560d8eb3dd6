"""Serving backends (one interface, real vLLM behind it) and the path from a trained adapter to
a live, verified knowledge base.

Going live: the new version is published to the registry, loaded on every replica under a
staging name that is unique to the version (`kb@vN`), and its recall is measured through each
replica. Only when every replica passes is the version loaded in place under the knowledge base's
own name and marked live; until then the previous version keeps serving. Prefix caching is off on
managed servers and every version lives in its own folder, so the name never serves cached
results of an older version.
"""

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

from memupdate.memory.encoding import EncodedFact
from memupdate.memory.facts import Fact
from memupdate.memory.gate import Gate
from memupdate.memory.routing import encode_by_owner
from memupdate.serving.probes import probe_record, rotating_window
from memupdate.serving.registry import Registry, Version, fault_point
from memupdate.serving.vllm_client import (
    ServingError,
    ServingRecall,
    VLLMClient,
    serving_recall,
    worst_replica,
)
from memupdate.serving.vllm_server import ManagedVLLM

log = logging.getLogger("memupdate.serving.backends")
# Facts decoded greedily at go-live (the weakest by served probability; every fact is checked
# teacher-forced). Decoding costs an engine step per token, batched or not.
GO_LIVE_GREEDY_FACTS = 8


class RankLimitError(ValueError):
    """The chosen rank is larger than what the serving backend accepts."""


class ServingBackend:
    """A set of vLLM replicas that memupdate loads adapters into."""

    max_lora_rank: int

    def replicas(self) -> list[VLLMClient]:
        raise NotImplementedError

    def ensure_up(self, registry: Registry) -> None:
        """Make sure every replica answers (restarting managed ones and restoring their live
        adapters); raise ServingError if one cannot be brought back."""

    def check_rank(self, rank: int) -> None:
        if rank > self.max_lora_rank:
            raise RankLimitError(
                f"rank {rank} exceeds the serving limit (--max-lora-rank {self.max_lora_rank}); "
                f"lower the rank or raise the server's limit"
            )


class ExternalBackend(ServingBackend):
    """Existing vLLM servers (URLs), started with runtime LoRA updating enabled."""

    def __init__(self, urls: list[str], max_lora_rank: int):
        self.clients = [VLLMClient(u) for u in urls]
        self.max_lora_rank = max_lora_rank

    def replicas(self) -> list[VLLMClient]:
        return self.clients

    def ensure_up(self, registry: Registry) -> None:
        down = [c.url for c in self.clients if not c.healthy()]
        if down:
            raise ServingError(f"replicas not answering: {', '.join(down)}")


class ManagedBackend(ServingBackend):
    """One vLLM server that memupdate started as a child process, restarted if it dies."""

    def __init__(self, server: ManagedVLLM):
        self.server = server
        self.max_lora_rank = server.config.max_lora_rank
        self.restarts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def replicas(self) -> list[VLLMClient]:
        return [self.server.client]

    def ensure_up(self, registry: Registry) -> None:
        with self._lock:  # the watchdog and a job may notice the death at the same time
            if self.server.alive() and self.server.client.healthy():
                return
            log.warning("managed vLLM is down; restarting it")
            self.server.stop()
            self.server.start()
            restore_live(registry, self)
            self.restarts += 1

    def watch(self, registry: Registry, interval_s: float = 5.0) -> None:
        """Restart the server in the background whenever it dies, restoring live versions."""

        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.ensure_up(registry)
                except ServingError as err:
                    log.error("could not restart the managed vLLM: %s", err)

        self._watchdog = threading.Thread(target=loop, name="vllm-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        self.server.stop()


def restore_live(registry: Registry, backend: ServingBackend) -> list[str]:
    """Load every live version under its knowledge base's name (after a replica restart), and
    with one adapter per update the older versions' adapters it routes to."""
    restored = []
    for kb in registry.knowledge_bases():
        live = registry.live(kb)
        if live is not None:
            for client in backend.replicas():
                load_held_adapters(registry, client, live)
                client.load_adapter(kb, str(live.path))
            restored.append(kb)
    return restored


def load_held_adapters(registry: Registry, client: VLLMClient, version: Version) -> None:
    """Load, under `kb@vN`, each older version whose adapter holds some of `version`'s facts
    (one adapter per update), unless the replica has it."""
    older = version.older_adapters()
    served = client.served_adapters() if older else {}
    for number in older:
        name = version_name(version.kb, number)
        if name not in served:
            client.load_adapter(name, str(registry.version(version.kb, number).path))


@dataclass
class GoLiveResult:
    version: Version
    live: bool
    per_replica: dict[str, ServingRecall]
    reason: str  # why it is live, or why not


def version_name(kb: str, number: int) -> str:
    """The name one version's adapter is served under (`kb@vN`): while it is checked, and with
    one adapter per update for as long as a live version routes to it."""
    return f"{kb}@v{number}"


def staging_name(version: Version) -> str:
    return version_name(version.kb, version.version)


def verify_and_go_live(
    registry: Registry,
    backend: ServingBackend,
    version: Version,
    facts: list[EncodedFact],
    tokenizer,
    target_fact_recall: float,
    greedy_limit: int | None = GO_LIVE_GREEDY_FACTS,
    still_ours: Callable[[], bool] = lambda: True,
    held_by: list[int] | None = None,
) -> GoLiveResult:
    """Stage `version` on every replica, measure recall through each (every fact teacher-forced,
    the `greedy_limit` weakest decoded greedily), and make it live only if every replica reaches
    the target fact recall and reproduces those facts greedily, and `still_ours()` (the job
    still holds its lease: another worker may be running it now). `held_by`: per fact, the
    version whose adapter holds it (one adapter per update; 0: this one): each fact is then
    checked through that version's adapter, loaded as `kb@vN` where a replica lacks it."""
    backend.ensure_up(registry)
    name = staging_name(version)
    names = None
    if held_by is not None:
        names = [version_name(version.kb, v or version.version) for v in held_by]
    results: dict[str, ServingRecall] = {}
    try:
        for client in backend.replicas():
            load_held_adapters(registry, client, version)
            client.load_adapter(name, str(version.path))
            fault_point("serving_check")
            results[client.url] = serving_recall(
                client, name, facts, tokenizer, greedy_limit, names
            )
    finally:
        for client in backend.replicas():
            try:
                client.unload_adapter(name)
            except ServingError:
                pass  # the replica may be gone; the staging name dies with it
    worst = worst_replica(results.values())
    greedy_ok = all(r.greedy_exact == r.greedy_checked for r in results.values())
    if worst.recall.fact_recall < target_fact_recall or not greedy_ok:
        reason = (
            f"serving fact recall {worst.recall.fact_recall:.3f} below the target "
            f"{target_fact_recall}"
            if worst.recall.fact_recall < target_fact_recall
            else "greedy output differs from a target"
        )
        return GoLiveResult(version, False, results, f"not made live: {reason}")
    if not still_ours():
        reason = "not made live: the job's lease ran out; another worker runs it now"
        return GoLiveResult(version, False, results, reason)
    for client in backend.replicas():
        client.load_adapter(version.kb, str(version.path))
    # Only a version that passed keeps its serving record: rollback targets need one.
    summary = {url: r.to_dict() for url, r in results.items()}
    registry.record_serving(version.kb, version.version, summary)
    registry.set_live(version.kb, version.version)
    # The go-live check is the version's first recall probe: the metrics start from it.
    registry.record_probe(version.kb, True, probe_record(version, worst, "go-live", max_drop=1.0))
    return GoLiveResult(
        version,
        True,
        results,
        f"live on {len(results)} replica(s), serving fact recall {worst.recall.fact_recall:.3f}"
        + (
            f", locality {worst.locality.token_agreement:.3f}"
            f" ({worst.locality.prompts_unchanged:.2f} of prompts unchanged)"
            if worst.locality
            else ""
        ),
    )


def go_live_forms(
    facts: list[EncodedFact], held_by: list[int], per_adapter: int, turn: int
) -> tuple[list[EncodedFact], list[int]]:
    """With one adapter per update, the forms a go-live check asks: every form of the facts the
    new version trained, and `per_adapter` facts (with all their forms) of each older adapter, a
    different window at each version (`turn`), as the monitor's probes rotate; 0: every fact.
    An older adapter is unchanged since its own go-live checked every one of its facts, so what
    can break it since is adapter-wide (a replica that lost it or loads another): a few of its
    facts show that. Returns the forms, renumbered, and their holders."""
    if not per_adapter:
        return facts, held_by
    by_owner: dict[int, list[list[int]]] = defaultdict(list)  # per holder, its facts' forms
    for i, (form, owner) in enumerate(zip(facts, held_by, strict=True)):
        if form.form == "prompt" or not by_owner[owner]:  # a fact's forms start with its prompt
            by_owner[owner].append([])
        by_owner[owner][-1].append(i)
    keep = []
    for owner, held in by_owner.items():
        if owner:
            held = rotating_window(held, per_adapter, turn)
        keep += [i for fact in held for i in fact]
    keep.sort()
    return [replace(facts[i], index=n) for n, i in enumerate(keep)], [held_by[i] for i in keep]


def served_forms(version: Version, facts: list[Fact], encode) -> tuple[list, list[str]]:
    """Every form of `facts` and the name to ask it under so that it reaches the adapter an
    application asking the knowledge base gets: the knowledge base's own name, or, with one
    adapter per update, the adapter of the version its fact routes to (`kb@vN`, loaded on the
    replicas when the version went live). Its prompt (or text) decides: a stored fact routes
    to the adapter that holds it."""
    gate = Gate.load(version.path)

    def owner(fact: Fact) -> int:
        routed = gate.version_for(fact.prompt or fact.text) if gate is not None else None
        return routed or version.version  # 0: the version's own adapter

    encoded, owners = encode_by_owner(encode, facts, [owner(f) for f in facts])
    names = [version.kb if v == version.version else version_name(version.kb, v) for v in owners]
    return encoded, names


def rollback(registry: Registry, backend: ServingBackend, kb: str) -> Version:
    """Serve the previous verified version again, on every replica."""
    backend.ensure_up(registry)
    previous = registry.rollback(kb)
    for client in backend.replicas():
        client.load_adapter(kb, str(previous.path))
    return previous
