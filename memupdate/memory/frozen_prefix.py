"""Training runs only the adapted layers and the layers above them.

The layers below the first adapted layer never change during a training, so the hidden states
entering that layer are computed once per fact set and reused by every step: a step runs the
adapted layer, the layers above it, the final norm and the output head at target positions only.
In fp32 the result equals the full model's to float rounding (tests/test_recall_and_memft.py).

A batch is packed: its sequences are laid end to end in as few rows as fit (`pack`), each with
positions counted from 0 and attention only within itself, so a short prompt form does not cost
the padding up to a long chat form beside it. The chat forms of a batch all open with the same
tokens (the chat template's system turn: a third to a half of a fact set's tokens), so that
opening is laid out once and each chat form attends to the one copy (`shared_opening`). Every
sequence computes exactly what it computes alone (tests/test_recall_and_memft.py).
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
    """Sequences laid end to end in rows: where each token sits and where the targets are."""

    positions: torch.Tensor  # (rows, width) position of each slot within its own sequence
    allowed: torch.Tensor  # (rows, 1, width, width) which slots each slot attends to
    # (rows, width): which token fills each slot, as an index into the batch's sequences laid
    # end to end in the order given; -1 for an empty slot.
    source: torch.Tensor
    # (tokens of the batch's sequences,): the flat slot (row * width + column) holding each of
    # them; a shared opening's tokens all point to its one copy.
    slot_of: torch.Tensor
    rows: torch.Tensor  # (n_target_tokens,) row of each target token, sequence by sequence
    cols: torch.Tensor  # slot whose hidden state predicts that target token
    labels: torch.Tensor  # the target token ids
    sizes: list[int]  # target tokens per sequence, to split flat results back
    tokens: int  # slots filled: the tokens a step runs


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


def shared_opening(facts: list[EncodedFact]) -> tuple[int, ...]:
    """The tokens every chat form of these facts opens with: the chat template's system turn
    (and whatever the questions' wording shares), a third to a half of a fact set's tokens with
    default chat forms. () with fewer than two chat forms. It stops short of every chat form's
    last prompt token, so each keeps a token of its own before its target."""
    chats = [f.prompt_ids for f in facts if f.form == "chat"]
    if len(chats) < 2:
        return ()
    n = 0
    while n < min(map(len, chats)) - 1 and all(c[n] == chats[0][n] for c in chats):
        n += 1
    return tuple(chats[0][:n])


def packed(facts: list[EncodedFact], together: bool = True, shared: tuple[int, ...] = ()) -> Packed:
    """The layout of a batch of these sequences; `together` False puts each in its own row
    (padded to the longest: what packing saves, bench/throughput.py). The sequences that open
    with `shared` (two or more of them, `together` only) have it laid out once, in one row, and
    each of them attends to that copy and then to its own tokens: causal attention makes their
    opening's states the same in every one of them, so each computes what it computes alone."""
    n = len(shared)
    sharers = [
        i
        for i, f in enumerate(facts)
        if together and n and len(f.prompt_ids) > n and tuple(f.prompt_ids[:n]) == shared
    ]
    if len(sharers) < 2:
        sharers, n = [], 0
    # What is packed: each other sequence whole, and the sharers as one group (-1).
    items = {i: f.length for i, f in enumerate(facts) if i not in sharers}
    if sharers:
        items[-1] = n + sum(facts[i].length - n for i in sharers)
    keys = list(items)
    if together:
        width, layout = pack([items[k] for k in keys])
        layout = [[keys[j] for j in row] for row in layout]
    else:
        width, layout = max(items.values()), [[k] for k in keys]
    starts = [0]
    for f in facts:
        starts.append(starts[-1] + f.length)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    source = torch.full((len(layout), width), -1)
    # Each slot's sequence; the empty slots share -1, so no slot is left attending to nothing;
    # the shared opening's slots are -2.
    owner = torch.full((len(layout), width), -1)
    slot_of = torch.zeros(starts[-1], dtype=torch.long)

    def place(r: int, offset: int, i: int, first: int) -> int:
        """Lay tokens `first`.. of sequence i at (r, offset); the offset after them."""
        count = facts[i].length - first
        positions[r, offset : offset + count] = torch.arange(first, facts[i].length)
        source[r, offset : offset + count] = torch.arange(starts[i] + first, starts[i + 1])
        owner[r, offset : offset + count] = i
        slot_of[starts[i] + first : starts[i + 1]] = r * width + torch.arange(
            offset, offset + count
        )
        return offset + count

    for r, members in enumerate(layout):
        offset = 0
        for k in members:
            if k != -1:
                offset = place(r, offset, k, 0)
                continue
            opening = torch.arange(offset, offset + n)
            positions[r, opening] = torch.arange(n)
            source[r, opening] = torch.arange(starts[sharers[0]], starts[sharers[0]] + n)
            owner[r, opening] = -2
            for i in sharers:
                slot_of[starts[i] : starts[i] + n] = r * width + opening
            offset += n
            for i in sharers:
                offset = place(r, offset, i, n)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = owner[:, :, None] == owner[:, None, :]  # itself
    if sharers:  # and the opening it shares
        shares = torch.isin(owner, torch.tensor(sharers))
        allowed |= shares[:, :, None] & (owner == -2)[:, None, :]
    predicting = [
        starts[i] + len(f.prompt_ids) - 1 + t
        for i, f in enumerate(facts)
        for t in range(len(f.target_ids))
    ]
    flat = slot_of[torch.tensor(predicting, dtype=torch.long)]
    return Packed(
        positions,
        (allowed & causal)[:, None],
        source,
        slot_of,
        flat // width,
        flat % width,
        torch.tensor([t for f in facts for t in f.target_ids]),
        [len(f.target_ids) for f in facts],
        int((source >= 0).sum()),
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
        # Chat forms open alike (the template's system turn): a batch lays that out once.
        self.shared = shared_opening(facts)
        with torch.no_grad():
            for chunk in length_batches(facts, batch):
                layout = packed([facts[i] for i in chunk], shared=self.shared)
                ids = torch.tensor([t for i in chunk for t in facts[i].input_ids])
                hidden = _run_layers(
                    decoder,
                    decoder.embed_tokens(ids[layout.source.clamp_min(0)]),
                    decoder.layers[:first],
                    layout.positions,
                    layout.allowed,
                )
                states = hidden.reshape(-1, hidden.shape[-1])[layout.slot_of]
                lengths = [facts[i].length for i in chunk]
                for i, own in zip(chunk, torch.split(states, lengths), strict=True):
                    self.states[i] = own.clone()

    def batch(self, indices: list[int], together: bool = True) -> tuple[Packed, torch.Tensor]:
        """The packed batch of these facts and their cached states laid out the same way."""
        batch = packed([self.facts[i] for i in indices], together, self.shared)
        flat = torch.cat([self.states[i] for i in indices])
        states = flat[batch.source.clamp_min(0)] * (batch.source >= 0)[..., None]
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
