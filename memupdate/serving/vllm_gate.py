"""The prompt gate inside vLLM's OpenAI server (memory/gate.py).

vLLM picks a request's adapter from its model name (`BaseServing._maybe_get_adapters`, vLLM
0.32). The plugin wraps that choice in the API server's process: when the adapter named is a
knowledge base's live version published with a gate (`gate.json` beside its weights), a request
the gate does not route is answered by the base model instead, so its answer is the base model's
exactly; with one adapter per update (gate.json lists each stored form's version), a request it
routes gets the adapter of the version that holds the nearest fact (`kb@vN`). What is gated, and
what is not:
- completions with a text prompt, and chat completions by their last user message;
- not the versioned name `kb@vN` (the go-live check measures the adapter itself through it);
- not requests that score a given text (`prompt_logprobs`: the recall probes teacher-force a fact
  through the live name, prompt and target together) nor prompts given as token ids or as
  several prompts: those keep the adapter they name.
The gate's states come from the base model's layers below the adapted one, loaded once in this
process from the served model's folder (a copy of the base model beside vLLM's).
"""

import logging
import sys
from pathlib import Path

log = logging.getLogger("memupdate.vllm_gate")


def _get(item, key: str):
    return item.get(key) if isinstance(item, dict) else getattr(item, key, None)


def request_text(request) -> str | None:
    """What the gate compares: a chat request's last user message, a completion's text prompt;
    None when there is nothing to gate on."""
    messages = getattr(request, "messages", None)
    if messages is not None:
        users = [m for m in messages if _get(m, "role") == "user"]
        content = _get(users[-1], "content") if users else None
        if isinstance(content, str):
            return content
        texts = [_get(p, "text") for p in content or () if _get(p, "type") == "text"]
        return "\n".join(t for t in texts if t) or None
    prompt = getattr(request, "prompt", None)
    return prompt if isinstance(prompt, str) else None


class GatedAdapters:
    """The wrapped choice: gates by adapter folder, the base model by served folder, loaded
    when first needed."""

    def __init__(self, choose):
        self.choose = choose
        self.gates: dict[str, object] = {}
        self.models: dict[str, tuple] = {}

    def gate(self, folder: str):
        from memupdate.memory.gate import Gate

        if folder not in self.gates:
            self.gates[folder] = Gate.load(Path(folder))
        return self.gates[folder]

    def base(self, folder: str):
        from memupdate.memory.base_model import load_model

        if folder not in self.models:
            self.models[folder] = load_model(Path(folder))
        return self.models[folder]

    def __call__(self, serving, request, *args, **kwargs):
        """vLLM's choice for `request`, or None (the base model) where the gate says so."""
        lora = self.choose(serving, request, *args, **kwargs)
        if (
            lora is None
            or "@v" in lora.lora_name
            or getattr(request, "prompt_logprobs", None) is not None
        ):
            return lora
        gate = self.gate(lora.lora_path)
        text = request_text(request) if gate is not None else None
        if text is None:
            return lora
        model, tokenizer = self.base(serving.model_config.model)
        similarity = gate.similarity(model, tokenizer, text)
        routed = similarity >= gate.threshold
        chosen = self.update_adapter(serving, lora, gate.version_for(text)) if routed else None
        log.debug(
            "gate of %s: similarity %.3f, threshold %.3f: %s",
            lora.lora_name,
            similarity,
            gate.threshold,
            chosen.lora_name if chosen else "base model",
        )
        return chosen

    @staticmethod
    def update_adapter(serving, lora, version: int | None):
        """With one adapter per update, the adapter of `version` (`kb@vN`, the version's folder
        beside the live one's), registered with vLLM under that name if it is not yet; the
        knowledge base's own adapter for 0 (the gate's own version) or None (one adapter)."""
        if not version:
            return lora
        from vllm.lora.request import LoRARequest

        kb_folder = Path(lora.lora_path).parent  # the registry's folder of the knowledge base
        name = f"{kb_folder.name}@v{version}"
        known = serving.models.lora_requests.get(name)
        if known is None:  # vLLM's worker loads it from its folder when first asked
            folder = kb_folder / f"v{version}"
            number = serving.models.lora_id_counter.inc(1)
            known = LoRARequest(lora_name=name, lora_int_id=number, lora_path=str(folder))
            serving.models.lora_requests[name] = known
        return known


SERVING_MODULE = "vllm.entrypoints.serve.engine.serving"


def install() -> None:
    """Wrap vLLM's adapter choice in the API server's process: the one that has imported its
    serving module by the time plugins load. Elsewhere (the engine's processes) nothing is
    imported: that module brings gRPC in, and a process that forks after gRPC started can
    abort (seen here: vLLM exiting with -6 at start-up). The gate's forward pass runs on the
    server's event loop: tens of milliseconds a request on a small base model, before the
    request is queued."""
    if SERVING_MODULE not in sys.modules:
        return
    from vllm.entrypoints.serve.engine.serving import BaseServing

    if getattr(BaseServing._maybe_get_adapters, "memupdate_gate", None):
        return  # installed already
    gated = GatedAdapters(BaseServing._maybe_get_adapters)

    def _maybe_get_adapters(self, request, *args, **kwargs):
        return gated(self, request, *args, **kwargs)

    _maybe_get_adapters.memupdate_gate = gated
    BaseServing._maybe_get_adapters = _maybe_get_adapters
