"""Locality: what an adapter changes in answers that have nothing to do with its facts.

An application sends every prompt to the adapter, not only the ones about its facts, so an
update must leave everything else alone. Three figures, computed the same way wherever locality
is reported (training report, calibration points, job events and registry metadata):
- token agreement: on the measurement text (locality_text/measure.txt, written for this project;
  5,201 tokens on SmolLM2), the share of positions whose next-token argmax the adapter leaves
  unchanged, teacher-forced (the editing field's locality, as EasyEdit computes it);
- KL: the mean KL(base || adapted) per position on the same text, over the base model's top 32
  tokens and the rest of the vocabulary as one bucket (merging tokens can only lower a KL, so
  this is a lower bound of the full one);
- prompts unchanged: the share of the 48 general prompts (locality_text/measure_prompts.txt)
  whose 16-token greedy continuation the adapter leaves unchanged. It is computed teacher-forced
  on the base model's own greedy continuation: greedy decoding of the adapted model gives the
  same tokens exactly when its argmax agrees with the base's at every one of those positions.

Training keeps locality with two terms on other text (retain.txt, and retain_prompts.txt with
the base's continuations): the text that measures is never the text that trains.
- the KL term (`locality_weight`): KL(base || adapted) on a few retain sequences each step, run
  through the layers from the adapted one up;
- the update's norm (`norm_weight`, `UpdateNorm`): for each adapted projection W with LoRA update
  ΔW and K the second moment of W's inputs on the retain passages under the base model,
  tr(ΔW K ΔWᵀ) / tr(W K Wᵀ): how much the update moves the projection's output on unrelated
  text, relative to the output itself (MEMIT's preservation term; AlphaEdit's null-space
  projection in soft form). K is computed once per base model, so a step pays for a few small
  matrix products per projection, not a forward pass; the optimizer steps the A matrices in
  K's whitened coordinates (`Whitening`).

Everything runs on the layers from the first adapted one up (memory/frozen_prefix.py): below it
the adapted and the base model are the same, so those hidden states are computed once per base
model and kept for the life of the process, with the base model's answers.
"""

import random
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memupdate.memory.adapter import adapted_linears
from memupdate.memory.encoding import EncodedFact
from memupdate.memory.frozen_prefix import FrozenPrefix, first_adapted_layer

TEXT_FOLDER = Path(__file__).parent / "locality_text"
TOP_K = 32  # base-model tokens kept per position for the KL
WINDOW = 128  # tokens per sequence cut from the measurement text
# Tokens per sequence cut from the retain text: short, so the term adds little to a step.
RETAIN_WINDOW = 32
GREEDY_TOKENS = 16


@dataclass(frozen=True)
class LocalityReport:
    token_agreement: float  # share of next-token argmaxes unchanged on the measurement text
    kl_nats: float  # mean KL(base || adapted) per position on that text (top-32 bound)
    prompts_unchanged: float  # share of general prompts whose greedy-16 output is unchanged
    tokens: int  # positions measured on the text
    prompts: int

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"locality: token agreement {self.token_agreement:.3f}, KL {self.kl_nats:.4f} nats, "
            f"{self.prompts_unchanged:.2f} of {self.prompts} prompts unchanged"
        )


def passages(name: str) -> list[str]:
    """The paragraphs of a shipped text file (blank-line separated)."""
    text = (TEXT_FOLDER / name).read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def prompts(name: str) -> list[str]:
    return [line.strip() for line in (TEXT_FOLDER / name).read_text().splitlines() if line.strip()]


def locality_prompts() -> list[str]:
    """The general prompts locality is measured on (also through vLLM)."""
    return prompts("measure_prompts.txt")


def _windows(tokenizer, texts: list[str], tag: str, width: int) -> list[EncodedFact]:
    """Each passage cut into windows of `width` tokens; every position after the first is
    measured (as the 'target' of a fact whose prompt is the first token)."""
    out: list[EncodedFact] = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), width):
            window = ids[start : start + width]
            if len(window) >= 8:
                out.append(
                    EncodedFact(len(out), f"{tag}:{i}", tuple(window[:1]), tuple(window[1:]))
                )
    return out


def _base_only(model):
    """The base model's answers: the adapter switched off (when there is one)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else nullcontext()


def _greedy_continuations(model, tokenizer, texts: list[str], tag: str) -> list[EncodedFact]:
    """Each prompt with the base model's greedy continuation of GREEDY_TOKENS tokens (or up to
    its end-of-sequence token) as the 'target'."""
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    # Left padding, so every row's next token follows its own prompt.
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad(), _base_only(model):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            pad_token_id=pad,
        )
    facts = []
    for i, prompt in enumerate(encoded):
        continuation = out[i, width:].tolist()
        if tokenizer.eos_token_id in continuation:  # keep the end token, drop what follows
            continuation = continuation[: continuation.index(tokenizer.eos_token_id) + 1]
        facts.append(EncodedFact(i, f"{tag}:{i}", tuple(prompt), tuple(continuation)))
    return facts


class Reference:
    """Sequences with the base model's next-token answers at every measured position (the top
    TOP_K log-probabilities and their token ids) and the hidden states entering the first
    adapted layer."""

    def __init__(self, model, sequences: list[EncodedFact], first: int):
        self.sequences = sequences
        with _base_only(model):
            self.prefix = FrozenPrefix(model, sequences, first)
            self.top_logp: list[torch.Tensor] = []
            self.top_ids: list[torch.Tensor] = []
            with torch.no_grad():
                for start in range(0, len(sequences), 16):
                    indices = list(range(start, min(start + 16, len(sequences))))
                    logits, batch = self.prefix.target_logits(model, indices)
                    top = torch.log_softmax(logits, dim=-1).topk(TOP_K, dim=-1)
                    self.top_logp.extend(torch.split(top.values, batch.sizes))
                    self.top_ids.extend(torch.split(top.indices, batch.sizes))

    def compare(self, model, indices: list[int], top=None):
        """(KL per position, argmax agreement per position, positions per sequence) of `model`
        against the base on these sequences; the KL carries gradients. `top`: what runs the
        layers above the prefix (a training's TopLayers; by default eager)."""
        logits, batch = self.prefix.target_logits(model, indices, top)
        base_logp = torch.cat([self.top_logp[i] for i in indices])
        base_ids = torch.cat([self.top_ids[i] for i in indices])
        agree = logits.argmax(dim=-1) == base_ids[:, 0]
        return top_k_kl(base_logp, base_ids, logits), agree, batch.sizes


def top_k_kl(base_logp: torch.Tensor, base_ids: torch.Tensor, logits: torch.Tensor):
    """KL(base || model) per position over the base's top-k tokens plus one bucket for the rest
    of the vocabulary."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, base_ids)
    p = base_logp.exp()
    rest_p = (1 - p.sum(-1)).clamp_min(1e-8)
    rest_q = (1 - logp.exp().sum(-1)).clamp_min(1e-8)
    return (p * (base_logp - logp)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())


# What is computed from the base model alone (the references per first adapted layer and text,
# the update norm's second moments per family placement, the gate's general texts' states), kept
# while the process uses it: the base does not change, and building one costs a forward pass
# over a text. A service holds one base model; the bound keeps test runs that load many from
# holding them all.
_cache: OrderedDict[tuple, tuple[object, object]] = OrderedDict()
_KEEP = 8


def cached_from_base(model, key: tuple, build):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = (id(base), *key)
    if key not in _cache:
        # The model object is kept with its entry, so its id cannot be reused meanwhile.
        _cache[key] = (base, build())
        while len(_cache) > _KEEP:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return _cache[key][1]


def _reference(model, tokenizer, first: int, kind: str) -> Reference:
    def build() -> Reference:
        texts, questions = f"{kind}.txt", f"{kind}_prompts.txt"
        width = WINDOW if kind == "measure" else RETAIN_WINDOW
        sequences = _windows(tokenizer, passages(texts), kind, width) + _greedy_continuations(
            model, tokenizer, prompts(questions), f"{kind}-prompt"
        )
        sequences = [
            EncodedFact(i, s.source, s.prompt_ids, s.target_ids) for i, s in enumerate(sequences)
        ]
        return Reference(model, sequences, first)

    return cached_from_base(model, (first, kind), build)


def _first_lora_layer(model) -> int:
    """The lowest decoder layer holding a LoRA matrix (0 when it cannot tell)."""
    found = [int(p) for name, _ in _lora_layers(model) for p in name.split(".") if p.isdigit()]
    return min(found, default=0)


def measure_locality(model, tokenizer) -> LocalityReport:
    """The three locality figures of an adapted model (a peft model) against its base."""
    ref = _reference(model, tokenizer, _first_lora_layer(model), "measure")
    kls, agrees, unchanged = [], [], []
    with torch.no_grad():
        for start in range(0, len(ref.sequences), 16):
            indices = list(range(start, min(start + 16, len(ref.sequences))))
            kl, agree, sizes = ref.compare(model, indices)
            for i, a, k in zip(
                indices, torch.split(agree, sizes), torch.split(kl, sizes), strict=True
            ):
                if ref.sequences[i].source.startswith("measure-prompt"):
                    unchanged.append(bool(a.all()))
                else:
                    agrees.append(a)
                    kls.append(k)
    agree_all, kl_all = torch.cat(agrees), torch.cat(kls)
    return LocalityReport(
        token_agreement=float(agree_all.float().mean()),
        kl_nats=float(kl_all.mean()),
        prompts_unchanged=sum(unchanged) / len(unchanged),
        tokens=int(agree_all.numel()),
        prompts=len(unchanged),
    )


# Whitening keeps directions of K whose eigenvalue is below this share of the mean one from being
# amplified without bound (their gain is at most FLOOR ** -0.5).
WHITENING_FLOOR = 1e-3


def _lora_layers(peft_model):
    """(name as in the bare model, peft LoRA layer) of each adapted projection."""
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            yield name.removeprefix("base_model.model."), module


class UpdateNorm:
    """The update's norm on unrelated text (module docstring): the second moment K of each
    adapted projection's inputs over the retain passages, taken from the base model, and the
    whitening a training optimizes in (`Whitening`)."""

    def __init__(self, model, tokenizer, family):
        linears = dict(adapted_linears(model, family))
        sums = {
            name: torch.zeros((m.in_features,) * 2, dtype=torch.float64)
            for name, m in linears.items()
        }

        def add(name):
            def hook(module, inputs):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[name] += x.T @ x

            return hook

        hooks = [m.register_forward_pre_hook(add(name)) for name, m in linears.items()]
        tokens = 0
        try:
            with torch.no_grad(), _base_only(model):
                for text in passages("retain.txt"):
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                    model(torch.tensor([ids]))
                    tokens += len(ids)
        finally:
            for h in hooks:
                h.remove()
        moments = {name: s / tokens for name, s in sums.items()}
        self.second_moment = {name: k.float() for name, k in moments.items()}
        # tr(W K Wᵀ): the projection's own output energy on that text
        self.own_energy = {
            name: float(
                ((m.weight.detach().double() @ moments[name]) * m.weight.detach().double()).sum()
            )
            for name, m in linears.items()
        }
        # K^(-1/2) and K^(1/2), scaled by the mean eigenvalue so that whitened inputs keep the
        # raw inputs' energy per dimension (the learning rate means what it meant), floored.
        self.whiten, self.unwhiten = {}, {}
        for name, k in moments.items():
            values, vectors = torch.linalg.eigh(k)
            values = values.clamp_min(0) / (values.clamp_min(0).mean()) + WHITENING_FLOOR
            self.whiten[name] = ((vectors * values**-0.5) @ vectors.T).float()
            self.unwhiten[name] = ((vectors * values**0.5) @ vectors.T).float()

    def __call__(self, peft_model) -> torch.Tensor:
        """Sum over the adapted projections of tr(ΔW K ΔWᵀ) / tr(W K Wᵀ); carries gradients."""
        total = torch.zeros(())
        for name, module in _lora_layers(peft_model):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            inner = a @ self.second_moment[name] @ a.T  # r x r
            total = (
                total
                + module.scaling["default"] ** 2 * ((b @ inner) * b).sum() / self.own_energy[name]
            )
        return total


class Whitening:
    """The optimizer's view of the adapter while a training with the update's norm runs: each
    LoRA A is optimized as A' = A·K^(1/2), in the whitened coordinates of the retain text's
    activations (A = A'·K^(-1/2)). There the norm is nearly a plain L2 norm of B·A', so the adapter
    learns the directions unrelated text hardly uses as readily as the others; optimized as A,
    it learned them slowly (bench/locality.py). The model itself keeps plain A matrices, so the
    forward pass (compiled or not) and the saved adapter are an ordinary LoRA's; only the step
    is taken on A': its gradient is A's times K^(-1/2), and A is recomputed from it after."""

    def __init__(self, norm: UpdateNorm, peft_model):
        self.pairs = []  # (A in the model, A' the optimizer steps, K^(-1/2))
        for name, module in _lora_layers(peft_model):
            a = module.lora_A["default"].weight
            shadow = (a.detach() @ norm.unwhiten[name]).requires_grad_(True)
            self.pairs.append((a, shadow, norm.whiten[name]))

    def parameters(self, params: list) -> list:
        """`params` with each A replaced by its A' (what the optimizer is built over)."""
        shadows = {id(a): shadow for a, shadow, _ in self.pairs}
        return [shadows.get(id(p), p) for p in params]

    def pull_gradients(self) -> None:
        """After backward, before the optimizer step: A'.grad = A.grad·K^(-1/2) (symmetric)."""
        for a, shadow, whiten in self.pairs:
            shadow.grad = None if a.grad is None else a.grad @ whiten
            a.grad = None

    @torch.no_grad()
    def push_weights(self) -> None:
        """After the optimizer step: A = A'·K^(-1/2)."""
        for a, shadow, whiten in self.pairs:
            a.copy_(shadow @ whiten)


class RetainSet:
    """What the training's locality terms compare against: the retain text and prompts with the
    base model's answers, sampled a few sequences per step (the KL term), and the retain
    passages' second moments (the update's norm)."""

    def __init__(self, model, tokenizer, family, per_step: int = 4, seed: int = 0):
        self.locality_weight, self.norm_weight = family.locality_weight, family.norm_weight
        first = first_adapted_layer(family)
        self.reference = (
            _reference(model, tokenizer, first, "retain") if self.locality_weight else None
        )
        self.norm = (
            cached_from_base(
                model,
                ("norm", family.target_modules, family.layers),
                lambda: UpdateNorm(model, tokenizer, family),
            )
            if self.norm_weight
            else None
        )
        self.per_step = per_step
        self.rng = random.Random(seed)

    def kl(self, model, top=None) -> tuple[torch.Tensor, int]:
        """(mean KL(base || model) per position, tokens run) over a fresh sample of retain
        sequences."""
        indices = self.rng.sample(range(len(self.reference.sequences)), self.per_step)
        kl, _, _ = self.reference.compare(model, indices, top)
        return kl.mean(), sum(self.reference.sequences[i].length for i in indices)

    def whitening(self, peft_model) -> Whitening | None:
        """How a training's optimizer sees the adapter (None without the update's norm)."""
        return Whitening(self.norm, peft_model) if self.norm is not None else None

    def loss(self, model, top=None) -> tuple[torch.Tensor, int]:
        """(the weighted locality terms of this step, retain tokens run for them)."""
        term, tokens = torch.zeros(()), 0
        if self.reference is not None:
            kl, tokens = self.kl(model, top)
            term = term + self.locality_weight * kl
        if self.norm is not None:
            with torch.autocast("cpu", enabled=False):  # small numbers: keep them in fp32
                term = term + self.norm_weight * self.norm(model)
        return term, tokens


def prepare(model, tokenizer, family) -> None:
    """Compute the base model's answers a job will need (a service does this at start-up, so
    its first update does not wait for them)."""
    _reference(model, tokenizer, first_adapted_layer(family), "measure")
    retain_set(model, tokenizer, family)


def base_continuations(model, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt, the base model's greedy continuation) for each locality prompt, decoded in one
    batch: serving measures its locality on these sequences."""
    found = _greedy_continuations(model, tokenizer, locality_prompts(), "measure-prompt")
    return [(list(s.prompt_ids), list(s.target_ids)) for s in found]


def retain_set(model, tokenizer, family, seed: int = 0) -> RetainSet | None:
    """The retain set a training of this family needs (None when it has no locality term)."""
    if not family.keeps_locality:
        return None
    return RetainSet(model, tokenizer, family, seed=seed)
