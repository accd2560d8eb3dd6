"""MemFT: train a LoRA adapter until every target token passes p > 0.5 (+ margin).

MemFT (the paper's only-threshold variant) puts the gradient on target tokens still at or below
the threshold: each token's loss is weighted 1 if p <= threshold and 0 otherwise, and the batch
loss is the mean over those still-unlearned tokens. Facts that pass completely leave the batches;
a full teacher-forced pass every `recheck_every` steps catches facts that fall back. `uniform`
is plain cross-entropy on all target tokens, same optimizer, data and stopping rule: the
baseline. Training stops when a full pass shows every target token above 0.5 + margin (then
greedy decoding reproduces every target), or when the step or time budget runs out, in which
case the result says what is still missing and does not claim success.
"""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memupdate.memory.adapter import AdapterFamily
from memupdate.memory.encoding import EncodedFact, sequence_length
from memupdate.memory.recall import (
    PASS_PROBABILITY,
    RecallReport,
    collate,
    summarize,
    target_logprobs,
    token_probabilities,
)

MODES = ("memft", "uniform")
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
    max_steps: int = 2000
    max_seconds: float | None = None
    recheck_every: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {self.margin}")


@dataclass
class Progress:
    step: int
    max_steps: int
    loss: float
    token_recall: float  # running estimate from the latest forward pass of each fact
    fact_recall: float  # likewise; confirmed by the full passes
    tokens_processed: int
    active_facts: int
    seconds: float


@dataclass
class TrainResult:
    success: bool  # every target token above 0.5 + margin in a final full teacher-forced pass
    stop_reason: str
    steps: int
    tokens_processed: int  # tokens in training forward passes (rechecks not counted)
    seconds: float
    sequence_length: int  # ℓ
    loss_before_nats: float
    recall: RecallReport  # final full pass, p > 0.5
    history: list[dict] = field(default_factory=list)  # one entry per full pass

    @property
    def loss_reduction_nats(self) -> float:
        return self.loss_before_nats - self.recall.mean_loss_nats


class _PassState:
    """Latest known pass/fail of each fact and its count of tokens above 0.5."""

    def __init__(self, facts: list[EncodedFact], threshold: float):
        self.threshold = threshold
        self.passed = [False] * len(facts)
        self.good_tokens = [0] * len(facts)
        self.total_tokens = sequence_length(facts)

    def update(self, index: int, probs: torch.Tensor) -> None:
        self.passed[index] = bool(probs.min() > self.threshold)
        self.good_tokens[index] = int((probs > PASS_PROBABILITY).sum())

    def token_recall(self) -> float:
        return sum(self.good_tokens) / self.total_tokens

    def fact_recall(self) -> float:
        return sum(self.passed) / len(self.passed)


def memft_loss(logp: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean cross-entropy over the target tokens still at or below `threshold`; tokens above
    it get weight 0. With none left: the ordinary mean (the paper's fallback), so every batch
    is a step and training always moves on."""
    weight = (logp.detach().exp() <= threshold).float()
    if weight.sum() == 0:
        return -logp.mean()
    return -(logp * weight).sum() / weight.sum()


def train_adapter(
    model,
    facts: list[EncodedFact],
    pad_id: int,
    settings: TrainSettings,
    on_progress: Callable[[Progress], None] | None = None,
):
    """Wrap `model` with a fresh LoRA adapter and train it. Returns (peft_model, TrainResult).
    Call `peft_model.unload()` afterwards to get the untouched base model back."""
    from peft import get_peft_model

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    peft_model = get_peft_model(model, settings.family.lora_config(settings.rank))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.family.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / settings.max_steps)
    )
    state = _PassState(facts, PASS_PROBABILITY + settings.margin)
    start = time.monotonic()
    history: list[dict] = []

    def full_pass(step: int) -> RecallReport:
        peft_model.eval()
        probs = token_probabilities(peft_model, facts, pad_id)
        for i, p in enumerate(probs):
            state.update(i, p)
        report = summarize(facts, probs)
        history.append(
            {
                "step": step,
                "seconds": round(time.monotonic() - start, 3),
                "token_recall": report.token_recall,
                "fact_recall": report.fact_recall,
                "loss_nats": report.mean_loss_nats,
                "min_prob": report.min_prob,
            }
        )
        peft_model.train()
        return report

    report = full_pass(0)
    loss_before = report.mean_loss_nats
    step = tokens = 0
    queue: list[int] = []
    stop_reason = "budget: steps"
    while True:
        due = settings.mode == "memft" and step > 0 and step % settings.recheck_every == 0
        if all(state.passed) or (due and history[-1]["step"] != step):
            report = full_pass(step)
            if all(state.passed):
                stop_reason = "all target tokens passed"
                break
        if step >= settings.max_steps:
            break
        if settings.max_seconds is not None and time.monotonic() - start > settings.max_seconds:
            stop_reason = "budget: time"
            break

        if settings.mode == "memft":
            queue = [i for i in queue if not state.passed[i]]
            if not queue:
                queue = [i for i in range(len(facts)) if not state.passed[i]]
                rng.shuffle(queue)
        elif not queue:
            queue = list(range(len(facts)))
            rng.shuffle(queue)
        chosen, queue = queue[: settings.batch_size], queue[settings.batch_size :]
        batch = collate([facts[i] for i in chosen], pad_id)

        logp = target_logprobs(peft_model, batch)
        probs = logp.detach().exp()
        for i, p in zip(chosen, torch.split(probs, batch.sizes), strict=True):
            state.update(i, p)
        loss = memft_loss(logp, state.threshold) if settings.mode == "memft" else -logp.mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += batch.tokens
        if on_progress is not None:
            on_progress(
                Progress(
                    step=step,
                    max_steps=settings.max_steps,
                    loss=float(loss.detach()),
                    token_recall=state.token_recall(),
                    fact_recall=state.fact_recall(),
                    tokens_processed=tokens,
                    active_facts=len(state.passed) - sum(state.passed),
                    seconds=time.monotonic() - start,
                )
            )

    if history[-1]["step"] != step:
        report = full_pass(step)
    peft_model.eval()
    result = TrainResult(
        success=all(state.passed),
        stop_reason="all target tokens passed" if all(state.passed) else stop_reason,
        steps=step,
        tokens_processed=tokens,
        seconds=time.monotonic() - start,
        sequence_length=state.total_tokens,
        loss_before_nats=loss_before,
        recall=report,
        history=history,
    )
    return peft_model, result
