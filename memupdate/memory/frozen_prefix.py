"""Training runs only the adapted layers and the layers above them.

The layers below the first adapted layer never change during a training, so the hidden states
entering that layer are computed once per fact set and reused by every step: a step runs the
adapted layer, the layers above it, the final norm and the output head at target positions only.
In fp32 the result equals the full model's to float rounding (tests/test_recall_and_memft.py).

A batch is packed: its sequences are laid end to end in as few rows as fit (`pack`), each with
positions counted from 0 and attention only within itself, so a short prompt form does not cost
the padding up to a long chat form beside it. Every sequence computes exactly what it computes
alone (tests/test_recall_and_memft.py).
"""

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from memupdate.memory.encoding import EncodedFact
from memupdate.memory.recall import length_batches

log = logging.getLogger(__name__)


def first_adapted_layer(family) -> int:
    return min(family.layers) if family.layers is not None else 0


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16, AMX, Arm's BF16 or SVE-BF16).
    Elsewhere bf16 is emulated: on an AVX2-only AMD EPYC a 512x576x1536 matrix product took
    781 ms in bf16 against 6.4 ms in fp32, so training steps there stay in fp32."""
    caps = torch.cpu.get_capabilities()
    return any(caps.get(name, False) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


@contextmanager
def eager_attention_on_cpu(model):
    """Plain (eager) attention while training on CPU: for these short sequences under bf16 it
    is faster than PyTorch's SDPA kernels (bench/throughput.py); restored afterwards."""
    base = _base(model)
    before = base.config._attn_implementation
    on_cpu = next(base.parameters()).device.type == "cpu"
    if on_cpu and before != "eager":
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if on_cpu and before != "eager":
            base.set_attn_implementation(before)


@dataclass
class Packed:
    """Sequences laid end to end in rows: where each one sits and where its targets are."""

    positions: torch.Tensor  # (rows, width) position of each slot within its own sequence
    allowed: torch.Tensor  # (rows, 1, width, width) which slots each slot attends to
    slots: list[tuple[int, int]]  # (row, offset) of each sequence, in the order given
    rows: torch.Tensor  # (n_target_tokens,) row of each target token, sequence by sequence
    cols: torch.Tensor  # slot whose hidden state predicts that target token
    labels: torch.Tensor  # the target token ids
    sizes: list[int]  # target tokens per sequence, to split flat results back
    tokens: int  # sequence tokens in the batch (not counting the empty slots)


def pack(lengths: list[int]) -> tuple[int, list[list[int]]]:
    """(width, rows): the sequences (indices into `lengths`) in rows of at most `width` tokens,
    first fit by decreasing length, with the width (from the longest sequence to twice it) that
    leaves the fewest slots in all: a step's cost is its slots."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest = lengths[order[0]]
    best: tuple[int, int, list[list[int]]] | None = None
    for width in range(longest, 2 * longest + 1):
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order:
            row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
            if row is None:
                rows.append([])
                room.append(width)
                row = len(rows) - 1
            rows[row].append(i)
            room[row] -= lengths[i]
        if best is None or len(rows) * width < best[0]:
            best = (len(rows) * width, width, rows)
    return best[1], best[2]


def packed(facts: list[EncodedFact], together: bool = True) -> Packed:
    """The layout of a batch of these sequences; `together` False puts each in its own row
    (padded to the longest: what packing saves, bench/throughput.py)."""
    lengths = [f.length for f in facts]
    width, layout = pack(lengths) if together else (max(lengths), [[i] for i in range(len(facts))])
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    # Each slot's sequence; the empty slots share -1, so no slot is left attending to nothing.
    owner = torch.full((len(layout), width), -1)
    slots: list[tuple[int, int]] = [(0, 0)] * len(facts)
    for r, members in enumerate(layout):
        offset = 0
        for i in members:
            n = facts[i].length
            positions[r, offset : offset + n] = torch.arange(n)
            owner[r, offset : offset + n] = i
            slots[i] = (r, offset)
            offset += n
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (owner[:, :, None] == owner[:, None, :]) & causal  # itself, causally
    rows, cols, labels, sizes = [], [], [], []
    for fact, (r, offset) in zip(facts, slots, strict=True):
        start = offset + len(fact.prompt_ids) - 1
        rows += [r] * len(fact.target_ids)
        cols += range(start, start + len(fact.target_ids))
        labels += fact.target_ids
        sizes.append(len(fact.target_ids))
    return Packed(
        positions,
        allowed[:, None],
        slots,
        torch.tensor(rows),
        torch.tensor(cols),
        torch.tensor(labels),
        sizes,
        sum(f.length for f in facts),
    )


def _run_layers(decoder, hidden: torch.Tensor, layers, positions=None, allowed=None):
    """Decoder layers `layers` on `hidden` (batch, width, d), as the decoder's own forward runs
    them, with rotary embeddings at `positions` and the attention pattern `allowed` of a packed
    batch (default: one sequence per row, causal)."""
    if positions is None:
        width = hidden.shape[1]
        positions = torch.arange(width)[None]
        allowed = torch.ones((width, width), dtype=torch.bool).tril()[None, None]
    if decoder.config._attn_implementation == "eager":  # eager adds the mask to its scores
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype)
        mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)
    else:  # SDPA takes a boolean one
        mask = allowed
    rotary = decoder.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(
            hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions
        )
    return hidden


class TopLayers:
    """What a step runs on the cached states: the layers from `first` up, the final norm and
    the output head at the given (row, column) positions.

    `compiled` runs it through torch.compile, one graph for its forward and backward that fuses
    the casts, norms and activations between the matrix products: about 1.4x the eager step's
    target tokens per second, after a compile of 45-70 s on a 2-core CPU (bench/throughput.py),
    so it pays only in long trainings. Should compiling fail where it runs (no C++ compiler, an
    unsupported operator), the step falls back to eager and says so once."""

    def __init__(self, model, first: int, compiled: bool = False):
        base = _base(model)
        self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
        self.layers = self.decoder.layers[first:]
        self._compiled = torch.compile(self._run, dynamic=True) if compiled else None

    def _run(self, states, positions, allowed, rows, cols) -> torch.Tensor:
        hidden = _run_layers(self.decoder, states, self.layers, positions, allowed)
        return self.head(self.decoder.norm(hidden[rows, cols]))

    def __call__(self, states: torch.Tensor, batch: Packed) -> torch.Tensor:
        args = (states, batch.positions, batch.allowed, batch.rows, batch.cols)
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except Exception as e:  # a real error fails again below, in eager
                log.warning("torch.compile failed (%s); training steps run eager", e)
                self._compiled = None
        return self._run(*args)


class FrozenPrefix:
    """The hidden states entering layer `first` for every fact (one tensor per fact)."""

    def __init__(self, model, facts: list[EncodedFact], first: int, batch: int = 32):
        self.facts = facts
        self.first = first
        decoder = _base(model).get_decoder()
        self.states: list[torch.Tensor] = [torch.empty(0)] * len(facts)
        with torch.no_grad():
            for chunk in length_batches(facts, batch):
                layout = packed([facts[i] for i in chunk])
                ids = torch.zeros(layout.positions.shape, dtype=torch.long)
                for i, (r, offset) in zip(chunk, layout.slots, strict=True):
                    ids[r, offset : offset + facts[i].length] = torch.tensor(facts[i].input_ids)
                hidden = _run_layers(
                    decoder,
                    decoder.embed_tokens(ids),
                    decoder.layers[:first],
                    layout.positions,
                    layout.allowed,
                )
                for i, (r, offset) in zip(chunk, layout.slots, strict=True):
                    self.states[i] = hidden[r, offset : offset + facts[i].length].clone()

    def batch(self, indices: list[int], together: bool = True) -> tuple[Packed, torch.Tensor]:
        """The packed batch of these facts and their cached states laid out the same way."""
        batch = packed([self.facts[i] for i in indices], together)
        states = torch.zeros((*batch.positions.shape, self.states[0].shape[-1]))
        for i, (r, offset) in zip(indices, batch.slots, strict=True):
            states[r, offset : offset + self.states[i].shape[0]] = self.states[i]
        return batch, states

    def target_logits(self, model, indices: list[int], top: TopLayers | None = None, together=True):
        """(Next-token logits at every target position of these facts, flat in batch order;
        the batch), running only layers `first` and above (through `top` when given)."""
        top = top or TopLayers(model, self.first)
        batch, states = self.batch(indices, together)
        return top(states, batch).float(), batch

    def target_logprobs(
        self, model, indices: list[int], top: TopLayers | None = None, together=True
    ):
        """(Log-probability of every target token of these facts, flat in batch order; the
        batch)."""
        logits, batch = self.target_logits(model, indices, top, together)
        logp = torch.log_softmax(logits, dim=-1).gather(1, batch.labels[:, None]).squeeze(1)
        return logp, batch

    def token_probabilities(self, model, batch_size: int = 32) -> list[torch.Tensor]:
        """Teacher-forced probability of each target token, one tensor per fact (no gradient)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.facts)
        with torch.no_grad():
            for indices in length_batches(self.facts, batch_size):
                logp, batch = self.target_logprobs(model, indices)
                for i, p in zip(indices, torch.split(logp.exp(), batch.sizes), strict=True):
                    out[i] = p
        return out
