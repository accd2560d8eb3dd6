"""MemFT: train a LoRA adapter until every target token passes p > 0.5 (+ margin).

Training runs in epochs over shuffled batches of facts; a step runs only the adapted layers and
those above them (memory/frozen_prefix.py). Two modes share everything but the loss:
- `memft`: the paper's threshold weighting, tuned by measurement (bench/memft_vs_uniform.py). A
  target token's loss has weight 1 while p <= the family's `train_until` (0.9 by default) and 0
  above it; the weighted sum is divided by the batch's token count, and a batch with no weighted
  token takes no optimizer step (its forward pass still refreshes what is known about its
  facts). The band between the stopping threshold and `train_until` builds a margin, so a passed
  token does not drift straight back below the threshold while others train. Each epoch visits
  the facts still training plus a replay sample of the solid ones (`replay`), so when most of a
  base is solid (an incremental update) an epoch costs what is new, not the whole base.
- `uniform`: plain cross-entropy on all target tokens, every fact every epoch: the baseline.
Both stop the same way: when every fact passed at its latest visit, a check of every fact (no
gradient, fp32) confirms it. The final report is a full-model fp32 pass, so success means every
target token is above 0.5 + margin and greedy decoding reproduces every target. A run that runs
out of steps or time says what is still missing and does not claim success.
"""

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memupdate.memory.adapter import AdapterFamily
from memupdate.memory.encoding import EncodedFact, sequence_length
from memupdate.memory.eta import TimeLeft, within_budget
from memupdate.memory.frozen_prefix import (
    FrozenPrefix,
    TopLayers,
    eager_attention_on_cpu,
    first_adapted_layer,
    native_bf16,
)
from memupdate.memory.locality import RetainSet
from memupdate.memory.recall import PASS_PROBABILITY, RecallReport, measure_recall, summarize
from memupdate.memory.warm_start import warm_start

log = logging.getLogger(__name__)

MODES = ("memft", "uniform")
# Fact sets (counted in sequences: each form of a fact is one) from which a training compiles
# its step by default. Measured on 40 phone numbers with their chat forms (80 sequences, rank 8,
# one thread): compiled 507 s / 453 steps against eager 630 s / 493 steps to full recall (an
# earlier run, eager first: 584 s against 600 s), compile included; smaller sets stay eager.
COMPILE_FROM_SEQUENCES = 80
# Margin above 0.5 at which training stops. Measured (bench/margin_drift.py, 20 phonebook facts,
# rank 4, trained to p > 0.5 in fp32): the same probabilities in bf16 moved by median 0.009,
# p99 0.12, max 0.19, and 1 of 220 tokens crossed 0.5. Managed servers serve fp32 (|Δp| < 1e-5),
# where any margin works; 0.1 absorbs most bf16 drift at little cost, and the serving check
# catches the rest. Serving in bf16 calls for about 0.2.
DEFAULT_MARGIN = 0.1


@dataclass(frozen=True)
class TrainSettings:
    rank: int
    family: AdapterFamily
    mode: str = "memft"
    margin: float = DEFAULT_MARGIN
    batch_size: int = 16
    max_steps: int = 2000  # batches visited (a batch whose tokens all passed counts too)
    max_seconds: float | None = None
    seed: int = 0
    # MemFT trains a token until its p is above this line (at least the stopping threshold
    # 0.5 + margin): the band between them builds a margin, so a passed token does not drift
    # straight back under the threshold while others train. None: the family's line (a
    # benchmark's override otherwise; the law describes the family's).
    train_until: float | None = None
    # Facts whose every token is above `train_until` are revisited per epoch at this multiple of
    # the facts still training (MemFT only); None visits every fact every epoch.
    replay: float | None = 1.0
    # bf16 autocast for training steps (checks and the final report are fp32); None: where the
    # CPU computes bf16 in hardware (frozen_prefix.native_bf16), since emulated bf16 is far slower.
    bf16: bool | None = None
    # torch.compile the training step's layers (frozen_prefix.TopLayers); None: only for fact
    # sets of at least COMPILE_FROM_SEQUENCES sequences, where the compile pays for itself.
    compile: bool | None = None
    # Divide the weighted loss by the batch's token count, not the weighted tokens' (the paper's
    # choice): with AdamW, dividing by a shrinking count of unlearned tokens makes the late steps
    # large and knocks passed facts back (bench/memft_vs_uniform.py, memft-paper-meanall).
    mean_over_all: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {self.margin}")
        line = self.weight_threshold
        if not 0.5 + self.margin <= line < 1:
            raise ValueError(f"train_until must be in [0.5 + margin, 1), got {line}")

    @property
    def threshold(self) -> float:
        """Training stops when every target token is above this."""
        return PASS_PROBABILITY + self.margin

    @property
    def weight_threshold(self) -> float:
        """MemFT trains a token until it is above this."""
        return self.family.train_until if self.train_until is None else self.train_until


@dataclass
class Progress:
    step: int
    max_steps: int
    epoch: int
    loss: float
    token_recall: float  # from the latest visit of each fact
    fact_recall: float  # likewise; confirmed by the checks of every fact
    tokens_processed: int
    active_facts: int  # facts not passed at their latest visit
    seconds: float
    eta_seconds: float | None  # estimated time left (memory/eta.py); None until known
    target_tokens: int = 0  # ℓ, the target tokens that must pass
    facts: int = 0  # sequences trained (each form of a fact is one)


@dataclass
class TrainResult:
    success: bool  # every target token above 0.5 + margin in the final full-model fp32 pass
    stop_reason: str
    steps: int
    optimizer_steps: int
    epochs: int
    tokens_processed: int  # tokens in training forward passes and in the checks of every fact
    seconds: float
    sequence_length: int  # ℓ
    loss_before_nats: float
    recall: RecallReport  # final full-model pass, p > 0.5
    bf16_steps: bool  # training steps ran under bf16 autocast (else fp32)
    history: list[dict] = field(default_factory=list)  # one entry per check of every fact

    @property
    def loss_reduction_nats(self) -> float:
        return self.loss_before_nats - self.recall.mean_loss_nats


def threshold_weights(logp: torch.Tensor, threshold: float) -> torch.Tensor:
    """MemFT's token weights: 1 while p <= threshold, 0 once above it."""
    return (logp.detach().exp() <= threshold).float()


def uniform_weights(logp: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.ones_like(logp)


def weighted_loss(
    logp: torch.Tensor, weights: torch.Tensor, over_all_tokens: bool = False
) -> torch.Tensor | None:
    """Weighted cross-entropy, divided by the total weight (the mean over the weighted tokens)
    or, `over_all_tokens`, by the batch's token count; None when no token has weight."""
    total = weights.sum()
    if total == 0:
        return None
    return -(logp * weights).sum() / (logp.numel() if over_all_tokens else total)


class _PassState:
    """What the latest visit of each fact showed: passed (every token above the stopping
    threshold), solid (every token above the training threshold, or known: passed at the first
    check and at every visit since), tokens above 0.5."""

    def __init__(self, facts: list[EncodedFact], settings: TrainSettings):
        self.threshold = settings.threshold
        self.solid_threshold = settings.weight_threshold
        self.passed = [False] * len(facts)
        self.solid = [False] * len(facts)
        # Facts that already pass when training starts (a warm start's old facts) count as
        # solid until a visit finds them failing: they are replayed, not retrained to 0.9, so
        # an update costs what is new.
        self.known: list[bool] | None = None
        self.good_tokens = [0] * len(facts)
        self.total_tokens = sequence_length(facts)

    def update(self, index: int, probs: torch.Tensor) -> None:
        lowest = probs.min()
        self.passed[index] = bool(lowest > self.threshold)
        if self.known is not None and not self.passed[index]:
            self.known[index] = False
        known = self.known is not None and self.known[index]
        self.solid[index] = bool(lowest > self.solid_threshold) or known
        self.good_tokens[index] = int((probs > PASS_PROBABILITY).sum())

    def first_check_done(self) -> None:
        self.known = list(self.passed)
        self.solid = [s or k for s, k in zip(self.solid, self.known, strict=True)]

    def token_recall(self) -> float:
        return sum(self.good_tokens) / self.total_tokens

    def fact_recall(self) -> float:
        return sum(self.passed) / len(self.passed)


def _epoch_order(state: _PassState, settings: TrainSettings, rng: random.Random) -> list[list[int]]:
    """The batches of one epoch: every fact (uniform, or replay None), else the facts still
    training plus a replay sample of the solid ones."""
    everyone = list(range(len(state.passed)))
    if settings.mode == "uniform" or settings.replay is None:
        order = everyone
    else:
        training = [i for i in everyone if not state.solid[i]]
        solid = [i for i in everyone if state.solid[i]]
        replay = min(len(solid), math.ceil(settings.replay * len(training)))
        order = training + rng.sample(solid, replay)
    rng.shuffle(order)
    batch_size = settings.batch_size
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def train_adapter(
    model,
    facts: list[EncodedFact],
    pad_id: int,
    settings: TrainSettings,
    on_progress: Callable[[Progress], None] | None = None,
    start_from: Path | None = None,
    token_weights: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    retain: RetainSet | None = None,
):
    """Wrap `model` with a LoRA adapter (fresh, or grown from the adapter saved in `start_from`,
    memory/warm_start.py) and train it. Returns (peft_model, TrainResult). Call
    `peft_model.unload()` afterwards to get the untouched base model back. `token_weights`
    replaces the mode's weighting (benchmarks of MemFT variants). A family with a locality
    term (either weight) needs `retain` (memory/locality.py: retain_set)."""
    from peft import get_peft_model

    if settings.family.keeps_locality and retain is None:
        raise ValueError("this adapter family has a locality term: pass retain=retain_set(...)")
    torch.manual_seed(settings.seed)
    peft_model = get_peft_model(model, settings.family.lora_config(settings.rank))
    try:
        if start_from is not None:
            warm_start(peft_model, start_from)
        return peft_model, _train(
            peft_model, facts, pad_id, settings, on_progress, token_weights, retain
        )
    except BaseException:
        # get_peft_model changed `model` in place: an exception (a cancelled job, an adapter
        # that does not fit) must not leave LoRA layers in the caller's model.
        peft_model.unload()
        raise


def _train(peft_model, facts, pad_id, settings, on_progress, token_weights, retain) -> TrainResult:
    rng = random.Random(settings.seed)
    weigh = token_weights or (threshold_weights if settings.mode == "memft" else uniform_weights)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    # With the update's norm, the optimizer steps the A matrices in whitened coordinates.
    whitening = retain.whitening(peft_model) if retain is not None else None
    if whitening is not None:
        params = whitening.parameters(params)
    family = settings.family
    lr = family.learning_rate
    b_matrices = {id(p) for n, p in peft_model.named_parameters() if ".lora_B." in n}
    groups = [
        {"params": [p for p in params if id(p) not in b_matrices], "lr": lr},
        {"params": [p for p in params if id(p) in b_matrices], "lr": lr * family.b_lr_ratio},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, family.adam_beta2))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / settings.max_steps)
    )
    start = time.monotonic()
    prefix = FrozenPrefix(peft_model, facts, first_adapted_layer(family))
    bf16 = native_bf16() if settings.bf16 is None else settings.bf16
    compiled = settings.compile
    if compiled is None:
        compiled = len(facts) >= COMPILE_FROM_SEQUENCES
    if compiled:  # the first step waits for the compile: say why
        log.info("compiling the training step for %d sequences (about a minute)", len(facts))
    top = TopLayers(peft_model, prefix.first, compiled=compiled)
    state = _PassState(facts, settings)
    history: list[dict] = []
    counts = {"steps": 0, "optimizer_steps": 0, "tokens": 0, "epochs": 0}

    def check_every_fact() -> RecallReport:
        peft_model.eval()
        probs = prefix.token_probabilities(peft_model)
        peft_model.train()
        for i, p in enumerate(probs):
            state.update(i, p)
        counts["tokens"] += sum(f.length for f in facts)
        report = summarize(facts, probs)
        history.append(
            {
                "step": counts["steps"],
                "epoch": counts["epochs"],
                "seconds": round(time.monotonic() - start, 3),
                "token_recall": report.token_recall,
                "fact_recall": report.fact_recall,
                "loss_nats": report.mean_loss_nats,
                "min_prob": report.min_prob,
            }
        )
        return report

    loss_before = check_every_fact().mean_loss_nats
    state.first_check_done()
    estimate_left = TimeLeft()
    stop_reason = ""
    peft_model.train()
    with eager_attention_on_cpu(peft_model):
        while not stop_reason:
            if all(state.passed):
                if history[-1]["step"] != counts["steps"]:  # every visit passed: confirm at once
                    check_every_fact()
                if all(state.passed):
                    stop_reason = "all target tokens passed"
                    break
            counts["epochs"] += 1
            for chosen in _epoch_order(state, settings, rng):
                if counts["steps"] >= settings.max_steps:
                    stop_reason = "budget: steps"
                elif settings.max_seconds and time.monotonic() - start > settings.max_seconds:
                    stop_reason = "budget: time"
                if stop_reason:
                    break
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logp, batch = prefix.target_logprobs(peft_model, chosen, top)
                logp = logp.float()
                for i, p in zip(chosen, torch.split(logp.detach().exp(), batch.sizes), strict=True):
                    state.update(i, p)
                weights = weigh(logp, settings.weight_threshold)
                loss = weighted_loss(logp, weights, settings.mean_over_all)
                if loss is not None:
                    if retain is not None:  # stay close to the base model on unrelated text
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                            term, retain_tokens = retain.loss(peft_model, top)
                        loss = loss + term
                        counts["tokens"] += retain_tokens
                    loss.backward()
                    if whitening is not None:
                        whitening.pull_gradients()
                    if family.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, family.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if whitening is not None:
                        whitening.push_weights()
                    counts["optimizer_steps"] += 1
                schedule.step()
                counts["steps"] += 1
                counts["tokens"] += batch.tokens
                if on_progress is not None:
                    now = time.monotonic() - start
                    active = len(state.passed) - sum(state.passed)
                    progress = Progress(
                        step=counts["steps"],
                        max_steps=settings.max_steps,
                        epoch=counts["epochs"],
                        loss=float(loss.detach()) if loss is not None else 0.0,
                        token_recall=state.token_recall(),
                        fact_recall=state.fact_recall(),
                        tokens_processed=counts["tokens"],
                        active_facts=active,
                        seconds=now,
                        eta_seconds=None,
                        target_tokens=state.total_tokens,
                        facts=len(facts),
                    )
                    progress.eta_seconds = within_budget(
                        estimate_left(progress), progress, settings.max_seconds
                    )
                    on_progress(progress)

    # The guarantee is measured on the full model in fp32, as serving will compute it.
    peft_model.eval()
    report = measure_recall(peft_model, facts, pad_id)
    passed = report.min_prob > state.threshold
    if not passed and not stop_reason.startswith("budget"):
        stop_reason = "the final full-model check found tokens at or below the threshold"
    result = TrainResult(
        success=passed,
        stop_reason=stop_reason,
        steps=counts["steps"],
        optimizer_steps=counts["optimizer_steps"],
        epochs=counts["epochs"],
        tokens_processed=counts["tokens"],
        seconds=time.monotonic() - start,
        sequence_length=state.total_tokens,
        loss_before_nats=loss_before,
        recall=report,
        bf16_steps=bf16,
        history=history,
    )
    return result
