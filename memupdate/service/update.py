"""One knowledge-base update, from request to live: merge facts, plan, train, publish, verify.

Each new version holds the whole knowledge base: the old facts and the new ones; a new fact whose
prompt already exists with another target replaces the old one (the job says how many).

By default one adapter holds the whole base: the law's rank is chosen for the whole base's ℓ, and
training starts from the live version's adapter when it is of the same family (growing its rank
if the plan asks for more, never shrinking it); MemFT still stops only when every fact of the
base passes. A fresh adapter is trained when there is no live version, the family changed, or
the warm start fails to reach full recall (the job's events say which).

With one adapter per update (`adapter_per_update`, behind the prompt gate), a version trains a
fresh adapter on its new and changed facts alone, planned for their ℓ; the older facts stay with
the adapters of the versions that trained them (the version's `held_by`), untouched, and the
gate routes each request to the adapter that holds its fact (memory/routing.py). The serving
check asks every fact the version trained and a rotating few of each older adapter's, each
through its own adapter (serving/backends.py: go_live_forms).
"""

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from memupdate.memory.adapter import AdapterFamily, params_per_rank
from memupdate.memory.base_model import ModelIdentity
from memupdate.memory.calibration import training_point
from memupdate.memory.encoding import EncodedFact, encode_facts, model_context_length
from memupdate.memory.facts import Fact, FactError, check_fact_count
from memupdate.memory.frozen_prefix import first_adapted_layer
from memupdate.memory.gate import Gate, general_prompt_states, retain_states
from memupdate.memory.locality import measure_locality, retain_set
from memupdate.memory.locality import prepare as prepare_locality
from memupdate.memory.memft import DEFAULT_MARGIN, Progress, TrainSettings, train_adapter
from memupdate.memory.planning import PlanReport, plan_update, record_training
from memupdate.memory.routing import encode_by_owner
from memupdate.memory.warm_start import WarmStartError
from memupdate.service.metrics import (
    LAW_RECALL_ERROR,
    PHASE_SECONDS,
    TRAINING_STEPS,
    TRAINING_TOKENS,
)
from memupdate.serving.backends import (
    GoLiveResult,
    ServingBackend,
    go_live_forms,
    verify_and_go_live,
)
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_client import ServingError, worst_replica

Emit = Callable[[str, dict], None]


class Cancelled(Exception):
    """The job was cancelled while it ran."""


class UpdateFailed(Exception):
    """The update cannot go live; the message says why."""


@dataclass
class UpdateRequest:
    kb: str
    facts: list[Fact]
    target_fact_recall: float
    rank_override: int = 0
    margin: float = 0.0  # 0: the default
    max_steps: int = 0  # 0: the default
    max_seconds: float = 0.0  # 0: no limit
    job_id: str = ""  # recorded with the version: a retried job goes on from what it published


@dataclass
class Runtime:
    """What every job needs, loaded once per worker."""

    model_folder: Path
    identity: ModelIdentity
    model: object
    tokenizer: object
    family: AdapterFamily
    registry: Registry
    backend: ServingBackend
    default_max_steps: int = 2000
    warm_start: bool = True  # start from the live version's adapter when the family matches
    gate: bool = False  # publish each version with its prompt gate (memory/gate.py)
    # Each version trains an adapter of its own for its new facts; the gate routes among them.
    adapter_per_update: bool = False
    held_facts_checked: int = 2  # facts of each older adapter a go-live asks (0: all)
    max_facts: int = 100_000
    progress_interval_s: float = 1.0
    serving_wait_s: float = 300.0  # how long to retry unreachable replicas before failing
    seconds_per_target_token: float = 0.0  # from the last training, for time estimates

    def encode(self, facts: list[Fact]) -> list[EncodedFact]:
        return encode_facts(facts, self.tokenizer, model_context_length(self.model))

    def prepare(self) -> None:
        """Compute what every job needs from the base model alone (a service does this at
        start-up, so its first update does not wait for it): the locality references and, with
        the gate, the general texts' states every gate is set and described by."""
        prepare_locality(self.model, self.tokenizer, self.family)
        if self.gate:
            layer = first_adapted_layer(self.family)
            retain_states(self.model, self.tokenizer, layer)
            general_prompt_states(self.model, self.tokenizer, layer)

    lock: threading.Lock = field(default_factory=threading.Lock)


def fact_key(f: Fact):
    """What makes two facts the same fact: the prompt (or the text)."""
    return ("prompt", f.prompt) if f.text is None else ("text", f.text)


def merge_facts(old: list[Fact], new: list[Fact]) -> tuple[list[Fact], list[Fact]]:
    """(merged, replaced): new facts added to the old ones; a new fact with the prompt (or text)
    of an old one replaces it."""
    seen: dict = {}
    for fact in new:  # within one update, the same prompt twice is a contradiction
        other = seen.setdefault(fact_key(fact), fact)
        if other.target != fact.target:
            raise FactError(
                f"{fact.where}: contradicts {other.where}: same prompt, different target"
            )
    merged = {fact_key(f): f for f in old}
    replaced = [
        merged[k]
        for f in new
        if (k := fact_key(f)) in merged and merged[k].to_json() != f.to_json()  # not the source
    ]
    for fact in new:
        merged[fact_key(fact)] = fact
    return list(merged.values()), replaced


def prepare(rt: Runtime, request: UpdateRequest) -> tuple[list[Fact], list[EncodedFact], int]:
    """Merge with the live version's facts and encode; (merged, encoded, replaced count)."""
    live = rt.registry.live(request.kb)
    old = live.facts() if live else []
    merged, replaced = merge_facts(old, request.facts)
    check_fact_count(merged, rt.max_facts)
    encoded = rt.encode(merged)
    return merged, encoded, len(replaced)


def held_by_versions(rt: Runtime, kb: str, merged: list[Fact]) -> list[int] | None:
    """With one adapter per update: per merged fact, the version whose adapter holds it, 0 for
    the version this update trains (its new and changed facts); None when one adapter holds
    the whole base."""
    if not rt.adapter_per_update:
        return None
    live = rt.registry.live(kb)
    old = {}
    if live is not None:
        old = {fact_key(f): (f, v) for f, v in zip(*live.held_facts(), strict=True)}
    held = []
    for fact in merged:
        was, version = old.get(fact_key(fact), (None, 0))
        unchanged = was is not None and was.to_json() == fact.to_json()
        held.append(version if unchanged else 0)
    return held


def _plan_encoded(rt: Runtime, encoded: list[EncodedFact], request: UpdateRequest) -> PlanReport:
    """The law's plan for the whole base (or the requested rank); the caller holds rt.lock."""
    report = plan_update(
        rt.model,
        encoded,
        rt.tokenizer.pad_token_id,
        rt.identity,
        rt.family,
        request.target_fact_recall,
        max_rank=rt.backend.max_lora_rank,
    )
    if request.rank_override:
        rank = request.rank_override
        report = replace(
            report,
            rank=rank,
            law=f"rank override {rank}",
            adapter_params=rank * params_per_rank(rt.model, rt.family),
        )
    return report.budgeted(rt.default_max_steps, request.max_steps)


def plan(rt: Runtime, request: UpdateRequest) -> tuple[PlanReport, int]:
    _, encoded, replaced = prepare(rt, request)
    with rt.lock:
        return _plan_encoded(rt, encoded, request), replaced


def go_live_with_retries(
    rt: Runtime,
    version,
    encoded,
    request: UpdateRequest,
    emit: Emit,
    cancelled,
    still_ours,
    held_by: list[int] | None = None,
) -> GoLiveResult:
    """The serving check, retried with exponential backoff (1 s doubling to 30 s) while vLLM
    cannot be reached, for up to rt.serving_wait_s; then the job fails saying why. The version
    stays published but not live, so the previous live version keeps serving meanwhile."""
    deadline = time.monotonic() + rt.serving_wait_s
    delay, attempt = 1.0, 0
    while True:
        attempt += 1
        try:
            return verify_and_go_live(
                rt.registry,
                rt.backend,
                version,
                encoded,
                rt.tokenizer,
                request.target_fact_recall,
                still_ours=still_ours,
                held_by=held_by,
            )
        except ServingError as err:
            if time.monotonic() + delay > deadline:
                raise ServingError(
                    f"vLLM not reachable for {rt.serving_wait_s:.0f} s ({attempt} attempts); "
                    f"version {version.version} was published but not made live; last error: {err}"
                ) from None
            emit(
                "waiting_for_serving",
                {"message": f"attempt {attempt}: {err}; retry in {delay:.0f} s"},
            )
            wake_at = time.monotonic() + delay
            while time.monotonic() < wake_at:
                if cancelled():
                    raise Cancelled() from None
                time.sleep(0.2)
            delay = min(delay * 2, 30.0)


def _train(rt: Runtime, encoded, settings, on_progress, start_from, work: Path, emit: Emit):
    """Train (warm when `start_from` is given), save the adapter to work/adapter and measure its
    locality; (TrainResult, LocalityReport or None). A warm start that cannot load or does not
    reach full recall is followed by a fresh training."""

    def once(source: Path | None):
        retain = retain_set(rt.model, rt.tokenizer, settings.family, seed=settings.seed)
        peft_model, result = train_adapter(
            rt.model,
            encoded,
            rt.tokenizer.pad_token_id,
            settings,
            on_progress,
            source,
            retain=retain,
        )
        locality = None
        try:
            if result.success or source is None:
                peft_model.save_pretrained(work / "adapter")
                locality = measure_locality(peft_model, rt.tokenizer)
        finally:
            rt.model = peft_model.unload()  # the base model, untouched, for the next job
        return result, locality

    if start_from is not None:
        try:
            result, locality = once(start_from)
            if result.success:
                return result, locality
            why = f"warm start stopped short ({result.stop_reason})"
        except WarmStartError as err:
            why = f"warm start failed ({err})"
        emit("training_fresh", {"message": f"{why}; training a fresh adapter"})
    return once(None)


def _save_gate(rt: Runtime, encoded, folder: Path, kb: str, held_by=None) -> dict:
    """Save the version's prompt gate beside its adapter (vLLM's plugin reads it there); what
    it stores, and the share of the general locality prompts it would send to the adapter.
    `held_by`: per form, the version whose adapter holds it (one adapter per update)."""
    live = rt.registry.live(kb)
    previous = Gate.load(live.path) if live is not None and held_by is not None else None
    layer = first_adapted_layer(rt.family)
    gate = Gate.build(rt.model, rt.tokenizer, encoded, layer, held_by, previous)
    gate.save(folder)
    return {
        "stored_forms": len(gate.keys),
        "threshold": round(gate.threshold, 4),
        "general_prompts_routed": gate.general_prompts_routed(rt.model, rt.tokenizer),
    }


def warm_start_source(rt: Runtime, kb: str) -> tuple[Path | None, int, str]:
    """(the live version's adapter folder, its rank, why) when a training can start from it;
    (None, 0, why not) when it starts fresh."""
    live = rt.registry.live(kb)
    if live is None:
        return None, 0, "fresh adapter: no live version"
    if not rt.warm_start:
        return None, 0, "fresh adapter: warm starts are off (warm_start setting)"
    if live.metadata.get("family") != rt.family.to_dict():
        return None, 0, f"fresh adapter: v{live.version} was trained with another adapter family"
    return live.path, live.rank, f"warm start from v{live.version} (rank {live.rank})"


def run_update(
    rt: Runtime,
    request: UpdateRequest,
    emit: Emit,
    cancelled: Callable[[], bool],
    still_ours: Callable[[], bool] = lambda: True,
) -> dict:
    """Run the update to live. Emits events; raises Cancelled, UpdateFailed or FactError.
    `still_ours()` is asked right before the version goes live (the job's lease is held)."""
    published = rt.registry.version_of_job(request.kb, request.job_id) if request.job_id else None
    if published is not None:
        return _resume(rt, published, request, emit, cancelled, still_ours)
    merged, encoded, replaced = prepare(rt, request)
    held_by = held_by_versions(rt, request.kb, merged)
    forms_held_by, train_on = None, encoded
    if held_by is not None:
        encoded, forms_held_by = encode_by_owner(rt.encode, merged, held_by)
        new = (f for f, v in zip(encoded, forms_held_by, strict=True) if v == 0)
        train_on = [replace(f, index=i) for i, f in enumerate(new)]
        if not train_on:
            raise UpdateFailed("nothing to train: every posted fact is already in the base")
    with rt.lock:  # one training on this model at a time
        started = time.monotonic()
        report = _plan_encoded(rt, train_on, request)
        if held_by is None:
            start_from, live_rank, start_note = warm_start_source(rt, request.kb)
        else:
            start_from, live_rank = None, 0
            kept = sorted({v for v in held_by if v})
            start_note = f"an adapter of its own for {held_by.count(0)} new or changed fact(s)" + (
                f"; {len(held_by) - held_by.count(0)} fact(s) stay with the adapters of "
                + ", ".join(f"v{v}" for v in kept)
                if kept
                else ""
            )
        if start_from is not None and live_rank > report.rank:  # shrinking would forget
            report = replace(
                report,
                rank=live_rank,
                adapter_params=live_rank * params_per_rank(rt.model, rt.family),
            )
        rt.backend.check_rank(report.rank)
        notes = [start_note] + ([f"{replaced} fact(s) replaced by new targets"] if replaced else [])
        emit(
            "planned", {"plan": report.to_dict(), "replaced": replaced, "message": "; ".join(notes)}
        )
        plan_s = time.monotonic() - started
        PHASE_SECONDS.labels("plan").observe(plan_s)

        settings = TrainSettings(
            rank=report.rank,
            family=rt.family,
            margin=request.margin or DEFAULT_MARGIN,
            max_steps=report.training_steps,
            max_seconds=request.max_seconds or None,
        )
        last = [0.0]

        def on_progress(p: Progress) -> None:
            if cancelled():
                raise Cancelled()
            if time.monotonic() - last[0] >= rt.progress_interval_s:
                last[0] = time.monotonic()
                emit("training", {"progress": p.__dict__})

        work = Path(tempfile.mkdtemp(prefix="memupdate-job-"))
        try:
            result, locality = _train(rt, train_on, settings, on_progress, start_from, work, emit)
            gate = None
            if rt.gate and result.success:
                gate = _save_gate(rt, encoded, work / "adapter", request.kb, forms_held_by)
            train_s = time.monotonic() - started - plan_s
            PHASE_SECONDS.labels("train").observe(train_s)
            TRAINING_STEPS.inc(result.steps)
            TRAINING_TOKENS.inc(result.tokens_processed)
            if report.predicted_fact_recall is not None:
                LAW_RECALL_ERROR.observe(report.predicted_fact_recall - result.recall.fact_recall)
            rt.seconds_per_target_token = result.seconds / max(1, result.sequence_length)
            emit(
                "trained",
                {
                    "recall": result.recall.to_dict(),
                    "locality": locality.to_dict() if locality else None,
                    "steps": result.steps,
                    "seconds": result.seconds,
                    "gate": gate,
                    "message": f"{result.epochs} epochs, {result.steps} steps"
                    + (f"; {locality.line()}" if locality else "")
                    + (
                        f"; gate: {gate['stored_forms']} stored forms, "
                        f"{gate['general_prompts_routed']:.2f} of general prompts routed to the "
                        "adapter"
                        if gate
                        else ""
                    ),
                },
            )
            record_training(
                rt.identity,
                rt.family,
                training_point(
                    result,
                    report.rank,
                    report.adapter_params,
                    f"job:{request.kb}",
                    len(train_on),
                    locality.token_agreement if locality else None,
                    novel_share=report.novel_share,
                ),
                warm_start=start_from is not None,
            )
            if not result.success:
                missing = ", ".join(result.recall.failing[:5])
                raise UpdateFailed(
                    f"training budget ran out ({result.stop_reason}) with fact recall "
                    f"{result.recall.fact_recall:.3f}; not recalled: {missing}"
                )
            if cancelled():
                raise Cancelled()
            t0 = time.monotonic()
            version = rt.registry.publish(
                request.kb,
                work / "adapter",
                {
                    "base_model": rt.identity.to_dict(),
                    "plan": report.to_dict(),
                    "family": rt.family.to_dict(),  # a later warm start checks it
                    "start": start_note,
                    "target_fact_recall": request.target_fact_recall,
                    "job_id": request.job_id,
                    "facts": len(merged),
                    "steps": result.steps,
                    "training_recall": result.recall.to_dict(),
                    "locality": locality.to_dict() if locality else None,
                    "gate": gate,
                    **({"held_by": held_by} if held_by is not None else {}),
                },
                merged,
            )
            publish_s = time.monotonic() - t0
            PHASE_SECONDS.labels("publish").observe(publish_s)
            emit("published", {"version": version.version})
        finally:
            shutil.rmtree(work, ignore_errors=True)

    live, worst, verify_s = _go_live(
        rt, version, encoded, request, emit, cancelled, still_ours, forms_held_by
    )
    timings = {"plan_s": plan_s, "train_s": train_s, "publish_s": publish_s, "verify_s": verify_s}
    return {
        "version": version.version,
        "reason": live.reason,
        "plan": report.to_dict(),
        "replaced": replaced,
        "training_recall": result.recall.to_dict(),
        "serving_recall": worst.to_dict(),
        "timings": timings,
    }


def _go_live(rt: Runtime, version, encoded, request, emit: Emit, cancelled, still_ours, held_by):
    """(GoLiveResult, worst replica's recall, seconds); raises UpdateFailed if not live."""
    t0 = time.monotonic()
    note = ""
    if held_by is not None:
        asked, held_by = go_live_forms(encoded, held_by, rt.held_facts_checked, version.version)
        if len(asked) < len(encoded):
            note = (
                f"{len(asked)} of {len(encoded)} forms asked: every form of the facts this version "
                f"trained, {rt.held_facts_checked} fact(s) of each older adapter"
            )
        encoded = asked
    live = go_live_with_retries(rt, version, encoded, request, emit, cancelled, still_ours, held_by)
    verify_s = time.monotonic() - t0
    PHASE_SECONDS.labels("verify").observe(verify_s)
    worst = worst_replica(live.per_replica.values())
    emit(
        "serving_verified",
        {"recall": worst.to_dict(), "version": version.version}
        | ({"message": note} if note else {}),
    )
    if not live.live:
        raise UpdateFailed(live.reason)
    return live, worst, verify_s


def _resume(rt: Runtime, version, request: UpdateRequest, emit: Emit, cancelled, still_ours):
    """An earlier attempt of this job published `version` and then died (its worker was
    killed, or lost its lease): check that version through serving and make it live, instead of
    training again; a job never puts two versions live."""
    emit(
        "resumed",
        {
            "version": version.version,
            "message": f"v{version.version} was published by an earlier attempt of this job; "
            "checking it through serving instead of training again",
        },
    )
    encoded, held_by = encode_by_owner(rt.encode, *version.held_facts())
    live, worst, verify_s = _go_live(
        rt, version, encoded, request, emit, cancelled, still_ours, held_by
    )
    meta = version.metadata
    return {
        "version": version.version,
        "reason": live.reason,
        "plan": meta["plan"],
        "replaced": 0,
        "training_recall": meta["training_recall"],
        "serving_recall": worst.to_dict(),
        "timings": {"plan_s": 0.0, "train_s": 0.0, "publish_s": 0.0, "verify_s": verify_s},
    }
