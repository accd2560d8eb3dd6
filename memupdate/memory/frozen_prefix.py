"""Training runs only the adapted layers and the layers above them.

The layers below the first adapted layer never change during a training, so the hidden states
entering that layer are computed once per fact set and reused by every step: a step runs the
adapted layer, the layers above it, the final norm and the output head at target positions only.
In fp32 the result equals the full model's to float rounding (tests/test_recall_and_memft.py).

Batches are right-padded and run without a padding mask: under causal attention a position never
sees the positions after it, so padding at the end cannot change any real position's output.
"""

import logging
from contextlib import contextmanager

import torch
from transformers.masking_utils import create_causal_mask

from memupdate.memory.encoding import EncodedFact
from memupdate.memory.recall import Batch, collate, length_batches

log = logging.getLogger(__name__)


def first_adapted_layer(family) -> int:
    return min(family.layers) if family.layers is not None else 0


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


def _run_layers(decoder, hidden: torch.Tensor, layers) -> torch.Tensor:
    """Decoder layers `layers` on `hidden` (batch, width, d), as the decoder's own forward runs
    them (causal mask and rotary embeddings from its own helpers)."""
    positions = torch.arange(hidden.shape[1])[None]
    mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden,
        attention_mask=None,
        past_key_values=None,
        position_ids=positions,
    )
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

    def _run(self, states: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        hidden = _run_layers(self.decoder, states, self.layers)
        return self.head(self.decoder.norm(hidden[rows, cols]))

    def __call__(self, states, rows, cols) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(states, rows, cols)
            except Exception as e:  # a real error fails again below, in eager
                log.warning("torch.compile failed (%s); training steps run eager", e)
                self._compiled = None
        return self._run(states, rows, cols)


class FrozenPrefix:
    """The hidden states entering layer `first` for every fact (one tensor per fact)."""

    def __init__(self, model, facts: list[EncodedFact], pad_id: int, first: int, batch: int = 32):
        self.facts = facts
        self.pad_id = pad_id
        self.first = first
        decoder = _base(model).get_decoder()
        self.states: list[torch.Tensor] = [torch.empty(0)] * len(facts)
        with torch.no_grad():
            for chunk in length_batches(facts, batch):
                ids = collate([facts[i] for i in chunk], pad_id).input_ids
                hidden = _run_layers(decoder, decoder.embed_tokens(ids), decoder.layers[:first])
                for h, i in zip(hidden, chunk, strict=True):
                    self.states[i] = h[: facts[i].length].clone()

    def batch(self, indices: list[int]) -> tuple[Batch, torch.Tensor]:
        """The collated batch of these facts and their padded cached states."""
        batch = collate([self.facts[i] for i in indices], self.pad_id)
        states = torch.zeros((len(indices), batch.input_ids.shape[1], self.states[0].shape[-1]))
        for row, i in enumerate(indices):
            states[row, : self.states[i].shape[0]] = self.states[i]
        return batch, states

    def target_logits(self, model, indices: list[int], top: TopLayers | None = None):
        """(Next-token logits at every target position of these facts, flat in batch order;
        the batch), running only layers `first` and above (through `top` when given)."""
        top = top or TopLayers(model, self.first)
        batch, states = self.batch(indices)
        return top(states, batch.rows, batch.cols).float(), batch

    def target_logprobs(self, model, indices: list[int], top: TopLayers | None = None):
        """(Log-probability of every target token of these facts, flat in batch order; the
        batch)."""
        logits, batch = self.target_logits(model, indices, top)
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
