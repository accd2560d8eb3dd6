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
from dataclasses import dataclass
from pathlib import Path

import torch

from memupdate.memory.encoding import EncodedFact
from memupdate.memory.frozen_prefix import _run_layers
from memupdate.memory.locality import cached_from_base, locality_prompts, passages, prompts

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


def text_states(model, tokenizer, texts: list[str], layer: int) -> torch.Tensor:
    """Unit-length hidden state entering `layer` at the last token of each text (base model)."""
    decoder = model.get_decoder()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            hidden = _run_layers(decoder, decoder.embed_tokens(ids), decoder.layers[:layer])
            out.append(torch.nn.functional.normalize(hidden[0, -1].float(), dim=-1))
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

    @classmethod
    def build(cls, model, tokenizer, facts: list[EncodedFact], layer: int) -> "Gate":
        """The gate of these facts (the base model's states: call it without an adapter)."""
        return cls.from_texts(model, tokenizer, stored_texts(facts), layer)

    @classmethod
    def from_texts(cls, model, tokenizer, texts: list[str], layer: int) -> "Gate":
        """The gate that stores these texts, its threshold from the retain side."""
        keys = text_states(model, tokenizer, texts, layer)
        general = retain_states(model, tokenizer, layer)
        return cls(keys, layer, float((general @ keys.T).max()))

    def nearest(self, states: torch.Tensor) -> torch.Tensor:
        """Each state's cosine similarity to its nearest stored form."""
        return (states @ self.keys.T).max(dim=1).values

    def similarity(self, model, tokenizer, text: str) -> float:
        """Cosine similarity of `text` to the nearest stored form."""
        return float(self.nearest(text_states(model, tokenizer, [text], self.layer)))

    def routes(self, model, tokenizer, text: str) -> bool:
        """Whether `text` goes to the adapter."""
        return self.similarity(model, tokenizer, text) >= self.threshold

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
        return cls(keys, int(data["layer"]), float(data["threshold"]))
