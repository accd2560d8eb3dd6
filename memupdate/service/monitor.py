"""The recall monitor: re-measures serving recall of every live knowledge base through vLLM.

On a schedule (and on demand), each live knowledge base is probed on a sample of its facts:
teacher-forced target probabilities through vLLM's `prompt_logprobs`, plus a greedy check on a
few of them. The sample rotates through the facts, so over successive probes every fact is
checked while each probe's cost stays bounded. A probe that cannot reach vLLM is recorded as a
probe failure (and the replica as down), never as a recall of zero. A probe whose fact recall is
below the version's target, or below the recall verified at go-live by more than `max_drop`, is
a regression, recorded with its evidence: which facts flipped and their lowest probabilities.
Probes are kept in the registry, so metrics and `memupdate-client status KB` read them.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from memupdate.memory.facts import Fact
from memupdate.service.metrics import PROBE_FAILURES, PROBE_RUNS, REPLICA_UP
from memupdate.serving.backends import served_forms
from memupdate.serving.probes import probe_record, rotating_window
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_client import ServingError, serving_recall, worst_replica

log = logging.getLogger("memupdate.service.monitor")


@dataclass(frozen=True)
class MonitorSettings:
    interval_s: float = 300.0  # between scheduled rounds; 0 = no schedule (on demand only)
    max_facts: int = 64  # facts per probe (teacher-forced): the cost bound
    greedy_facts: int = 8  # of those, decoded greedily
    max_drop: float = 0.05  # fact recall below the verified value by more than this regresses


class RecallMonitor(threading.Thread):
    def __init__(
        self,
        registry: Registry,
        backend,  # a serving.ServingBackend
        encode: Callable,
        tokenizer,
        settings: MonitorSettings,
    ):
        super().__init__(name="recall-monitor", daemon=True)
        self.registry = registry
        self.backend = backend
        self.encode = encode
        self.tokenizer = tokenizer
        self.settings = settings
        self._rounds: dict[str, int] = {}  # probes per knowledge base: where the sample starts
        self._lock = threading.Lock()  # one probe at a time (vLLM serves one sequence anyway)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            self.check_replicas()
            self.probe_all()
            self._stop.wait(self.settings.interval_s)

    def check_replicas(self) -> bool:
        """Update the replica-up gauges; True if every replica answers."""
        up = True
        for client in self.backend.replicas():
            healthy = client.healthy()
            REPLICA_UP.labels(client.url).set(float(healthy))
            up = up and healthy
        return up

    def probe_all(self) -> None:
        for kb in self.registry.knowledge_bases():
            if self._stop.is_set():
                break
            try:
                self.probe(kb, "scheduled")
            except Exception:  # a bug in one probe must not stop the monitor
                log.exception("probe of %s crashed", kb)

    def sample(self, kb: str, facts: list[Fact]) -> list[Fact]:
        """The next window of at most max_facts facts, rotating through all of them."""
        turn = self._rounds.get(kb, 0)
        self._rounds[kb] = turn + 1
        return rotating_window(facts, self.settings.max_facts, turn)

    def probe(self, kb: str, source: str = "on-demand") -> dict | None:
        """Probe one knowledge base's live version; the stored record, or None if none is live."""
        with self._lock:
            live = self.registry.live(kb)
            if live is None:
                return None
            encoded, names = served_forms(live, self.sample(kb, live.facts()), self.encode)
            PROBE_RUNS.labels(kb).inc()
            results = []
            for client in self.backend.replicas():
                try:
                    results.append(
                        serving_recall(
                            client, kb, encoded, self.tokenizer, self.settings.greedy_facts, names
                        )
                    )
                except ServingError as err:
                    REPLICA_UP.labels(client.url).set(0.0)
                    PROBE_FAILURES.labels(kb).inc()
                    data = {"version": live.version, "source": source, "error": str(err)}
                    self.registry.record_probe(kb, False, data)
                    log.warning("probe of %s failed: %s", kb, err)
                    return data
                REPLICA_UP.labels(client.url).set(1.0)
            worst = worst_replica(results)
            prompts = {f.source: f.asked for f in encoded}
            data = probe_record(live, worst, source, self.settings.max_drop, prompts)
            self.registry.record_probe(kb, True, data)
            if data["regressed"]:
                log.warning("recall regression in %s: %s", kb, data["reason"])
            return data
