"""Prometheus metrics, all prefixed `memupdate_`, in base units (seconds, ratios 0..1).

Labels stay bounded: `knowledge_base` (one per knowledge base), `state` and `phase` (fixed
sets), `replica` (the configured vLLM URLs). A knowledge base's live version is an info metric,
not a label on every series. Per-knowledge-base gauges and job counts are read at scrape time
from the registry (versions, recall probes) and the job store, the sources of truth, so they
survive a restart and never go stale when a knowledge base is deleted.
"""

import time

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from memupdate.serving.probes import worst_fact_recall, worst_locality

JOB_TRANSITIONS = Counter(
    "memupdate_job_transitions",
    "Jobs entering a state (QUEUED, RUNNING, LIVE, FAILED, CANCELLED).",
    ["state"],
)
PHASE_SECONDS = Histogram(
    "memupdate_job_phase_duration_seconds",
    "Duration of one job phase: plan, train, publish, verify.",
    ["phase"],
    buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 10800),
)
TRAINING_STEPS = Counter("memupdate_training_steps", "Optimizer steps taken by MemFT training.")
TRAINING_TOKENS = Counter(
    "memupdate_training_tokens", "Tokens in training forward passes (rechecks not counted)."
)
LAW_RECALL_ERROR = Histogram(
    "memupdate_law_fact_recall_error",
    "The law's predicted fact recall at the chosen rank minus the fact recall training reached.",
    buckets=(-1, -0.5, -0.2, -0.1, -0.05, 0, 0.05, 0.1, 0.2, 0.5, 1),
)
PROBE_RUNS = Counter(
    "memupdate_probe_runs",
    "Recall probes of a live knowledge base through vLLM.",
    ["knowledge_base"],
)
PROBE_FAILURES = Counter(
    "memupdate_probe_failures",
    "Recall probes that could not measure (vLLM unreachable or refused); not a recall of zero.",
    ["knowledge_base"],
)
REPLICA_UP = Gauge(
    "memupdate_vllm_replica_up",
    "1 if the vLLM replica answered its last health check.",
    ["replica"],
)


def forget_knowledge_base(kb: str) -> None:
    """Drop a deleted knowledge base's labelled counters."""
    for counter in (PROBE_RUNS, PROBE_FAILURES):
        try:
            counter.remove(kb)
        except KeyError:
            pass


class KnowledgeBaseCollector:
    """Per-knowledge-base gauges, built at scrape time from the registry and the probe log."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        def gauge(name, doc):
            return GaugeMetricFamily(f"memupdate_kb_{name}", doc, labels=["knowledge_base"])

        fact = gauge("fact_recall", "Serving fact recall at the last successful probe (0..1).")
        token = gauge("token_recall", "Serving token recall at the last successful probe (0..1).")
        target = gauge("target_fact_recall", "Fact recall the live version was required to reach.")
        verified = gauge(
            "verified_fact_recall", "Serving fact recall measured when the version went live."
        )
        min_p = gauge(
            "min_target_probability", "Lowest target-token probability at the last probe."
        )
        facts = gauge("facts", "Facts held by the live version.")
        rank = gauge("adapter_rank", "LoRA rank of the live adapter.")
        params = gauge("adapter_parameters", "Trainable parameters of the live adapter.")
        predicted = gauge(
            "law_predicted_fact_recall",
            "Fact recall the law predicted at the chosen rank (absent when no law was used).",
        )
        locality = gauge(
            "locality",
            "Locality through vLLM at the last successful probe: share of next-token argmaxes "
            "on general prompts the adapter leaves as the base model's (0..1).",
        )
        verified_locality = gauge(
            "verified_locality", "Locality through vLLM measured when the version went live."
        )
        by_form = GaugeMetricFamily(
            "memupdate_kb_form_fact_recall",
            "Serving fact recall of one form of the facts (prompt, paraphrase, chat) at the last "
            "successful probe (0..1).",
            labels=["knowledge_base", "form"],
        )
        since = gauge("seconds_since_last_probe", "Seconds since the last successful recall probe.")
        regressed = gauge("regressed", "1 if the last successful probe found a recall regression.")
        info = InfoMetricFamily(
            "memupdate_kb_version",
            "The live version of each knowledge base, and whether vLLM serves it behind its "
            "prompt gate (general prompts then get the base model, whatever its locality).",
            labels=["knowledge_base"],
        )
        now = time.time()
        for kb in self.registry.knowledge_bases():
            live = self.registry.live(kb)
            if live is None:
                continue
            meta = live.metadata
            plan = meta.get("plan", {})
            gated = "true" if meta.get("gate") else "false"
            info.add_metric([kb], {"version": str(live.version), "gated": gated})
            target.add_metric([kb], live.target_fact_recall)
            facts.add_metric([kb], meta.get("facts", len(live.facts())))
            rank.add_metric([kb], live.rank)
            params.add_metric([kb], plan.get("adapter_params", 0))
            if plan.get("predicted_fact_recall") is not None:
                predicted.add_metric([kb], plan["predicted_fact_recall"])
            if live.serving:
                verified.add_metric([kb], worst_fact_recall(live.serving))
                if (worst := worst_locality(live.serving)) is not None:
                    verified_locality.add_metric([kb], worst["token_agreement"])
            last = self.registry.last_probe(kb, only_ok=True)
            if last is not None and last[1]["version"] == live.version:
                at, probe = last
                fact.add_metric([kb], probe["recall"]["fact_recall"])
                token.add_metric([kb], probe["recall"]["token_recall"])
                min_p.add_metric([kb], probe["recall"]["min_prob"])
                for form, value in probe["recall"].get("forms", {}).items():
                    by_form.add_metric([kb, form], value["fact_recall"])
                since.add_metric([kb], now - at)
                regressed.add_metric([kb], float(probe["regressed"]))
                if probe.get("locality"):
                    locality.add_metric([kb], probe["locality"]["token_agreement"])
        yield from (fact, token, target, verified, min_p, facts, rank, params, predicted)
        yield from (by_form, locality, verified_locality, since, regressed, info)


class JobCollector:
    """Current jobs by state, counted in the job store at scrape time."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        family = GaugeMetricFamily("memupdate_jobs", "Jobs now in each state.", labels=["state"])
        for state, count in self.store.count_by_state().items():
            family.add_metric([state], count)
        yield family


def register_collectors(registry, store) -> list:
    collectors = [KnowledgeBaseCollector(registry), JobCollector(store)]
    for c in collectors:
        REGISTRY.register(c)
    return collectors


def unregister_collectors(collectors: list) -> None:
    for c in collectors:
        REGISTRY.unregister(c)
