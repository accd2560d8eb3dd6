"""Recall, measured the way the law and the phase transition define it.

Teacher forcing gives each target token's probability p. If every target token of a fact has
p > 0.5, each is the unique argmax at its position, so greedy decoding from the prompt
reproduces the target exactly (by induction over positions). Two figures follow, and every
number says which one it is:
- token recall: share of target tokens with p > 0.5;
- fact recall: share of facts whose every target token has p > 0.5.
Every form of a fact (its prompt, each paraphrase, each chat question; see `encoding.py`) is
counted as a fact of its own, and `forms` gives the fact recall of each form apart.
"""

import math
from dataclasses import asdict, dataclass, field

import torch

from memupdate.memory.encoding import EncodedFact

PASS_PROBABILITY = 0.5


@dataclass
class RecallReport:
    facts: int
    target_tokens: int
    token_recall: float  # share of target tokens with p > 0.5
    fact_recall: float  # share of facts whose every target token has p > 0.5
    min_prob: float  # lowest target-token probability over all facts
    min_prob_fact: str  # source of the fact holding it
    mean_loss_nats: float  # mean cross-entropy per target token
    failing: list[str] = field(default_factory=list)  # sources of facts not fully recalled
    failing_min_probs: list[float] = field(default_factory=list)  # their lowest token p
    forms: dict[str, dict] = field(default_factory=dict)  # form -> {"facts", "fact_recall"}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["failing"] = self.failing[:50]
        data["failing_min_probs"] = self.failing_min_probs[:50]
        return data


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor  # (n_target_tokens,) row of each target token
    cols: torch.Tensor  # position whose hidden state predicts that target token
    labels: torch.Tensor  # the target token ids
    sizes: list[int]  # target tokens per fact, to split flat results back per fact
    tokens: int  # non-padding tokens in the batch


def collate(facts: list[EncodedFact], pad_id: int) -> Batch:
    width = max(f.length for f in facts)
    input_ids = torch.full((len(facts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(facts), width), dtype=torch.long)
    rows, cols, labels, sizes = [], [], [], []
    for i, fact in enumerate(facts):
        ids = fact.input_ids
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        start = len(fact.prompt_ids)
        for j, token in enumerate(fact.target_ids):
            rows.append(i)
            cols.append(start + j - 1)
            labels.append(token)
        sizes.append(len(fact.target_ids))
    return Batch(
        input_ids,
        mask,
        torch.tensor(rows),
        torch.tensor(cols),
        torch.tensor(labels),
        sizes,
        int(mask.sum()),
    )


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def target_logprobs(model, batch: Batch) -> torch.Tensor:
    """Log-probability of every target token (flat, in batch order). The vocabulary projection
    runs only at target positions: on a 49k vocabulary that is a fifth of the forward pass."""
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    logits = head(hidden[batch.rows, batch.cols]).float()
    return torch.log_softmax(logits, dim=-1).gather(1, batch.labels[:, None]).squeeze(1)


def length_batches(facts: list[EncodedFact], size: int) -> list[list[int]]:
    """Indices of `facts` in batches of similar length, for passes where the grouping does not
    matter: a fact's prompt form beside its much longer chat form would be padded to it."""
    order = sorted(range(len(facts)), key=lambda i: facts[i].length)
    return [order[i : i + size] for i in range(0, len(order), size)]


def token_probabilities(
    model, facts: list[EncodedFact], pad_id: int, batch_size: int = 32
) -> list[torch.Tensor]:
    """Teacher-forced probability of each target token, one tensor per fact (in `facts`' order)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(facts)
    with torch.no_grad():
        for chunk in length_batches(facts, batch_size):
            batch = collate([facts[i] for i in chunk], pad_id)
            probs = torch.split(target_logprobs(model, batch).exp(), batch.sizes)
            for i, p in zip(chunk, probs, strict=True):
                out[i] = p
    return out


def summarize(facts: list[EncodedFact], probs: list[torch.Tensor]) -> RecallReport:
    flat = torch.cat(probs)
    fact_min = torch.stack([p.min() for p in probs])
    worst = int(fact_min.argmin())
    failing = [
        (f.source, float(m)) for f, m in zip(facts, fact_min, strict=True) if m <= PASS_PROBABILITY
    ]
    return RecallReport(
        facts=len(facts),
        target_tokens=int(flat.numel()),
        token_recall=float((flat > PASS_PROBABILITY).float().mean()),
        fact_recall=float((fact_min > PASS_PROBABILITY).float().mean()),
        min_prob=float(fact_min[worst]),
        min_prob_fact=facts[worst].source,
        mean_loss_nats=float(-flat.clamp_min(1e-30).log().mean()),
        failing=[source for source, _ in failing],
        failing_min_probs=[p for _, p in failing],
        forms=_by_form(facts, fact_min),
    )


def _by_form(facts: list[EncodedFact], fact_min: torch.Tensor) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for form in dict.fromkeys(f.form for f in facts):
        passed = [
            float(m) > PASS_PROBABILITY
            for f, m in zip(facts, fact_min, strict=True)
            if f.form == form
        ]
        out[form] = {"facts": len(passed), "fact_recall": sum(passed) / len(passed)}
    return out


def measure_recall(model, facts: list[EncodedFact], pad_id: int) -> RecallReport:
    return summarize(facts, token_probabilities(model, facts, pad_id))


@dataclass
class GreedyReport:
    checked: int
    exact: int  # facts whose greedy continuation equals the target token for token
    mismatches: list[str]

    @property
    def exact_share(self) -> float:
        return self.exact / self.checked if self.checked else math.nan


def greedy_continuation(model, prompt_ids, new_tokens: int, pad_id: int) -> list[int]:
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    # No min_new_tokens: an early end-of-sequence is a real mismatch, not something to suppress.
    return out[0, ids.shape[1] :].tolist()


def greedy_check(model, facts: list[EncodedFact], pad_id: int, limit: int = 64) -> GreedyReport:
    """Greedy decoding from each prompt (the first `limit` facts): is the target reproduced?"""
    checked = facts[:limit]
    mismatches = [
        f.source
        for f in checked
        if greedy_continuation(model, f.prompt_ids, len(f.target_ids), pad_id) != list(f.target_ids)
    ]
    return GreedyReport(len(checked), len(checked) - len(mismatches), mismatches)
