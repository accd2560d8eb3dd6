"""The prompt gate: send a request to the adapter only when it is about a stored fact.

An adapter changes some answers to prompts that have nothing to do with its facts, whatever the
training's locality term does (docs/benchmarks.md, Locality). The gate keeps those prompts off
the adapter: a request's text is compared with every stored form of every fact (the prompt, its
paraphrases, its questions) by the base model's hidden state entering the adapted layer at the
text's last token, and only a request at least `threshold` cosine-similar to one of them is
answered with the adapter; the rest get the base model, unchanged by construction (GRACE's and
MELO's idea, keyed on the prompt).

A chat request is compared by its last user message, not by the chat-templated text: the
template's last tokens are the same for every question and leave all questions (and general
prompts) within 0.95-0.97 of one another. The threshold is set from the retain side only (never
the text locality is measured on): the highest similarity any retain prompt, or the first 8 or 16
words of a retain passage, has to the stored forms. Measured (bench/locality_gate.py): no general
prompt routed to the adapter and every held-out paraphrase and question routed to it, at 12 to 300
facts of three kinds; prompts worded like a stored fact about another subject do reach it.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memupdate.memory.encoding import EncodedFact
from memupdate.memory.frozen_prefix import _run_layers
from memupdate.memory.locality import cached_from_base, locality_prompts, passages, prompts
from memupdate.memory.routing import WordRouter

KEYS_FILE = "gate.safetensors"
SETTINGS_FILE = "gate.json"


def stored_texts(facts: list[EncodedFact]) -> list[str]:
    """Every form of every fact as a request carries it: a prompt or paraphrase as written, a
    chat form by its question, a `text` fact whole."""
    return list(dict.fromkeys(f.asked for f in facts))


def passage_starts(name: str) -> list[str]:
    """The first 8 and the first 16 words of each passage of a shipped text: prompt-sized
    general text."""
    return [" ".join(p.split()[:n]) for p in passages(name) for n in (8, 16)]


def retain_texts() -> list[str]:
    """General text from the retain side: the retain prompts and the retain passages' starts."""
    return prompts("retain_prompts.txt") + passage_starts("retain.txt")


def text_states(model, tokenizer, texts: list[str], layer: int, batch: int = 32) -> torch.Tensor:
    """Unit-length hidden state entering `layer` at the last token of each text (base model).
    Texts run in batches of similar length, padded on the right: attention is causal, so what
    follows a text's last token cannot change its state."""
    decoder = model.get_decoder()
    ids = [tokenizer(text)["input_ids"] for text in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [None] * len(ids)
    with torch.no_grad():
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            width = max(len(ids[i]) for i in rows)
            padded = torch.tensor([ids[i] + [0] * (width - len(ids[i])) for i in rows])
            hidden = _run_layers(decoder, decoder.embed_tokens(padded), decoder.layers[:layer])
            for row, i in enumerate(rows):
                last = hidden[row, len(ids[i]) - 1].float()
                out[i] = torch.nn.functional.normalize(last, dim=-1)
    return torch.stack(out)


def retain_states(model, tokenizer, layer: int) -> torch.Tensor:
    """The retain texts' states (they set every gate's threshold), computed once per base model
    and layer: the same for every version a service publishes."""
    return cached_from_base(
        model, ("gate-retain", layer), lambda: text_states(model, tokenizer, retain_texts(), layer)
    )


def general_prompt_states(model, tokenizer, layer: int) -> torch.Tensor:
    """The 48 general locality prompts' states (what share of them a gate routes), computed once
    per base model and layer."""
    return cached_from_base(
        model,
        ("gate-general", layer),
        lambda: text_states(model, tokenizer, locality_prompts(), layer),
    )


@dataclass
class Gate:
    keys: torch.Tensor  # (stored forms, hidden size), unit length
    layer: int
    threshold: float
    # With one adapter per update: each stored form's text and the version whose adapter holds
    # it; a routed request goes to the version the word router picks (memory/routing.py).
    texts: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.router = WordRouter(self.texts, self.versions) if self.versions else None

    @classmethod
    def build(
        cls,
        model,
        tokenizer,
        facts: list[EncodedFact],
        layer: int,
        versions: list[int] | None = None,
        previous: "Gate | None" = None,
    ) -> "Gate":
        """The gate of these facts (the base model's states: call it without an adapter).
        `versions`: per fact form, the version whose adapter holds it (one adapter per update).
        States already stored in `previous` (the live version's gate) are reused."""
        texts = stored_texts(facts)
        owners = []
        if versions is not None:
            owner_of = {f.asked: v for f, v in zip(facts, versions, strict=True)}
            owners = [owner_of[t] for t in texts]
        return cls.from_texts(model, tokenizer, texts, layer, owners, previous)

    @classmethod
    def from_texts(
        cls, model, tokenizer, texts: list[str], layer: int, versions=(), previous=None
    ) -> "Gate":
        """The gate that stores these texts, its threshold from the retain side."""
        known = {}
        if previous is not None and previous.layer == layer and previous.texts:
            known = dict(zip(previous.texts, previous.keys, strict=True))
        new = [t for t in texts if t not in known]
        if new:
            known.update(zip(new, text_states(model, tokenizer, new, layer), strict=True))
        keys = torch.stack([known[t] for t in texts])
        general = retain_states(model, tokenizer, layer)
        threshold = float((general @ keys.T).max())
        stored = list(texts) if versions else []
        return cls(keys, layer, threshold, stored, list(versions))

    def nearest(self, states: torch.Tensor) -> torch.Tensor:
        """Each state's cosine similarity to its nearest stored form."""
        return (states @ self.keys.T).max(dim=1).values

    def similarity(self, model, tokenizer, text: str) -> float:
        """Cosine similarity of `text` to the nearest stored form."""
        return float(self.nearest(text_states(model, tokenizer, [text], self.layer)))

    def routes(self, model, tokenizer, text: str) -> bool:
        """Whether `text` goes to the adapter."""
        return self.similarity(model, tokenizer, text) >= self.threshold

    def version_for(self, text: str) -> int | None:
        """With one adapter per update, the version whose adapter a routed `text` goes to;
        None for a gate of one adapter."""
        return self.router.route(text) if self.router is not None else None

    def routed_share(self, states: torch.Tensor) -> float:
        """The share of these texts' states (text_states) this gate sends to the adapter."""
        return float((self.nearest(states) >= self.threshold).float().mean())

    def general_prompts_routed(self, model, tokenizer) -> float:
        """The share of the 48 general locality prompts this gate sends to the adapter."""
        return self.routed_share(general_prompt_states(model, tokenizer, self.layer))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({"keys": self.keys.contiguous()}, str(Path(folder) / KEYS_FILE))
        settings = {"layer": self.layer, "threshold": self.threshold}
        if self.versions:
            settings |= {"texts": self.texts, "versions": self.versions}
        (Path(folder) / SETTINGS_FILE).write_text(json.dumps(settings))

    @classmethod
    def load(cls, folder: Path) -> "Gate | None":
        """The gate saved with an adapter, or None (an adapter published without one)."""
        from safetensors.torch import load_file

        settings = Path(folder) / SETTINGS_FILE
        if not settings.is_file():
            return None
        data = json.loads(settings.read_text())
        keys = load_file(str(Path(folder) / KEYS_FILE))["keys"]
        return cls(
            keys,
            int(data["layer"]),
            float(data["threshold"]),
            data.get("texts", []),
            data.get("versions", []),
        )
