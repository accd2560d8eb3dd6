"""Talk to one vLLM OpenAI-compatible server: load/unload adapters at runtime, and measure
recall through it (teacher-forced `prompt_logprobs` and greedy generation; chat forms are
decoded through /v1/chat/completions, as applications ask)."""

import functools
import json
import math
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from memupdate.memory.encoding import EncodedFact
from memupdate.memory.locality import GREEDY_TOKENS, base_continuations, locality_prompts
from memupdate.memory.recall import RecallReport, summarize

# Requests sent at once: enough to fill a batch of the managed server (max_num_seqs 32).
REQUESTS_IN_FLIGHT = 32


class ServingError(RuntimeError):
    """The server refused a request or could not be reached."""


@dataclass(frozen=True)
class ServingLocality:
    """Locality through the server: the adapter against the base model on the general prompts
    of memory/locality.py, each followed by the base's greedy continuation, teacher-forced."""

    token_agreement: float  # continuation positions whose argmax the adapter leaves unchanged
    prompts_unchanged: float  # prompts where it leaves every one unchanged (greedy output)
    prompts: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ServingRecall:
    recall: RecallReport  # teacher-forced through the server, p > 0.5
    greedy_checked: int
    greedy_exact: int  # greedy completions equal to the target text
    greedy_mismatches: list[str]
    locality: ServingLocality | None = None

    def to_dict(self) -> dict:
        return {
            "recall": self.recall.to_dict(),
            "greedy_checked": self.greedy_checked,
            "greedy_exact": self.greedy_exact,
            "greedy_mismatches": self.greedy_mismatches[:50],
            "locality": self.locality.to_dict() if self.locality else None,
        }


def worst_replica(results) -> ServingRecall:
    """The replica with the lowest fact recall (then token recall): what counts for a version."""
    return min(results, key=lambda r: (r.recall.fact_recall, r.recall.token_recall))


class VLLMClient:
    def __init__(self, url: str, timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # The base model's answers to the locality prompts: the base never changes under a
        # running server, so they are asked once (a service asks at start-up, before any job).
        self._base_locality: tuple[list[list[int]], list[int], list[list[int]]] | None = None
        self._base_lock = threading.Lock()

    def _request(self, method: str, path: str, body: dict | None = None, timeout_s=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                raw = resp.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode()[:500]
            raise ServingError(f"{method} {path} -> {err.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            raise ServingError(f"{method} {path}: cannot reach {self.url}: {err}") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """Whether the server answers its health check (a hung server counts as down)."""
        try:
            self._request("GET", "/health", timeout_s=timeout_s)
            return True
        except ServingError:
            return False

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models")["data"]

    def load_adapter(self, name: str, path: str) -> None:
        """Load (or replace in place) the adapter served under `name`."""
        self._request(
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": name, "lora_path": str(path), "load_inplace": True},
        )

    def unload_adapter(self, name: str) -> None:
        self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})

    def base_model_name(self) -> str:
        return next(m["id"] for m in self.models() if not m.get("parent"))

    def served_adapters(self) -> dict[str, str]:
        """Adapter name -> path, for the adapters the server has loaded."""
        return {m["id"]: m.get("root") for m in self.models() if m.get("parent")}

    def complete(self, model: str, prompt, max_tokens: int, **extra) -> dict:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **extra,
        }
        return self._request("POST", "/v1/completions", body)

    def chat(self, model: str, question: str, max_tokens: int, **extra) -> dict:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **extra,
        }
        return self._request("POST", "/v1/chat/completions", body)

    def target_probabilities(self, model: str, facts: list[EncodedFact]) -> list[list[float]]:
        """Teacher-forced probability of each target token of each fact, computed by the
        server. Facts go in batches of prompts per request (each prompt is its own sequence to
        the server), which saves a round trip per fact."""
        out: list[list[float]] = []
        for chunk in _chunks(facts):
            answer = self.complete(model, [f.input_ids for f in chunk], 1, prompt_logprobs=0)
            for fact, choice in zip(chunk, _in_order(answer), strict=True):
                positions = choice["prompt_logprobs"]
                probs = []
                for offset, token in enumerate(fact.target_ids):
                    entry = positions[len(fact.prompt_ids) + offset]
                    logprob = entry.get(str(token), {}).get("logprob") if entry else None
                    probs.append(math.exp(logprob) if logprob is not None else 0.0)
                out.append(probs)
        return out

    def greedy_texts(self, model: str, facts: list[EncodedFact]) -> list[str]:
        """Greedy answer to each fact, as many tokens as its target: a chat form's question
        through the chat endpoint (one request each), other forms' prompts through completions
        (one request per group of facts with the same target length). Every request is in
        flight at once, so the server decodes them in one batch."""
        texts: list[str] = [""] * len(facts)
        by_length: dict[int, list[int]] = {}
        requests = []  # (indices, ask) pairs; ask() returns their texts
        for i, fact in enumerate(facts):
            if fact.form == "chat":
                requests.append(([i], functools.partial(self._ask_chat, model, fact)))
            else:
                by_length.setdefault(len(fact.target_ids), []).append(i)
        for length, members in by_length.items():
            for chunk in _chunks(members):
                prompts = [list(facts[i].prompt_ids) for i in chunk]
                requests.append((chunk, functools.partial(self._complete, model, prompts, length)))
        if requests:
            with ThreadPoolExecutor(max_workers=min(REQUESTS_IN_FLIGHT, len(requests))) as pool:
                answers = pool.map(lambda r: r[1](), requests)
                for (indices, _), answer in zip(requests, answers, strict=True):
                    for i, text in zip(indices, answer, strict=True):
                        texts[i] = text
        return texts

    def _ask_chat(self, model: str, fact: EncodedFact) -> list[str]:
        answer = self.chat(model, fact.asked, len(fact.target_ids))
        return [answer["choices"][0]["message"]["content"] or ""]

    def _complete(self, model: str, prompts: list[list[int]], tokens: int) -> list[str]:
        return [c["text"] for c in _in_order(self.complete(model, prompts, tokens))]

    def greedy_ids(self, model: str, prompts: list[list[int]], tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt, as token ids."""
        out: list[list[int]] = []
        for chunk in _chunks(prompts):
            answer = self.complete(model, chunk, tokens, return_token_ids=True)
            out.extend(choice["token_ids"] for choice in _in_order(answer))
        return out

    def argmax_tokens(self, model: str, sequences: list[list[int]], starts: list[int]):
        """The server's most likely next token at every position of each sequence from
        `starts[i]` on, teacher-forced (from `prompt_logprobs`)."""
        out: list[list[int]] = []
        for chunk in _chunks(list(range(len(sequences)))):
            answer = self.complete(model, [sequences[i] for i in chunk], 1, prompt_logprobs=1)
            for i, choice in zip(chunk, _in_order(answer), strict=True):
                positions = choice["prompt_logprobs"][starts[i] :]
                out.append(
                    [next(int(t) for t, e in p.items() if e["rank"] == 1) for p in positions]
                )
        return out

    def base_locality(
        self, tokenizer, continued: list[tuple[list[int], list[int]]] | None = None
    ) -> tuple[list[list[int]], list[int], list[list[int]]]:
        """(the locality prompts followed by the base's greedy continuations, where each
        continuation starts, the base's argmax at each continuation position through this
        server): asked once. `continued` gives the continuations from the trainer's copy of the
        base model; without it they are decoded here."""
        with self._base_lock:
            if self._base_locality is None:
                base = self.base_model_name()
                if continued is None:
                    prompts = [tokenizer(p)["input_ids"] for p in locality_prompts()]
                    answers = self.greedy_ids(base, prompts, GREEDY_TOKENS)
                    continued = list(zip(prompts, answers, strict=True))
                sequences = [p + c for p, c in continued]
                starts = [len(p) for p, _ in continued]
                top = self.argmax_tokens(base, sequences, starts)
                self._base_locality = (sequences, starts, top)
            return self._base_locality

    def locality(self, adapter: str, tokenizer) -> ServingLocality:
        """The adapter against the base on the locality prompts and the base's continuations."""
        sequences, starts, base_top = self.base_locality(tokenizer)
        top = self.argmax_tokens(adapter, sequences, starts)
        same = [
            [a == b for a, b in zip(x, y, strict=True)] for x, y in zip(top, base_top, strict=True)
        ]
        tokens_seen = sum(len(s) for s in same)
        return ServingLocality(
            token_agreement=sum(map(sum, same)) / max(1, tokens_seen),
            prompts_unchanged=sum(all(s) for s in same) / len(same),
            prompts=len(same),
            tokens=tokens_seen,
        )


def ask_base_locality(clients: list[VLLMClient], model, tokenizer) -> None:
    """Ask each replica for the base model's locality answers now (at start-up, before any
    job), on the prompts continued by `model` (the base, in-process) in one batch, so the first
    go-live check does not wait for them; a replica that cannot be reached is asked again by
    the first check that needs it."""
    continued = base_continuations(model, tokenizer)
    for client in clients:
        try:
            client.base_locality(tokenizer, continued)
        except ServingError:
            pass


def _chunks(facts: list, size: int = 32):
    for start in range(0, len(facts), size):
        yield facts[start : start + size]


def _in_order(answer: dict) -> list[dict]:
    return sorted(answer["choices"], key=lambda c: c["index"])


def _by_name(names: list[str], items: list, ask) -> list:
    """`ask(name, items)` once per served name, for the items served under it; the answers
    back in the items' order."""
    out: list = [None] * len(items)
    for name in dict.fromkeys(names):
        members = [i for i, n in enumerate(names) if n == name]
        for i, answer in zip(members, ask(name, [items[i] for i in members]), strict=True):
            out[i] = answer
    return out


def serving_recall(
    client: VLLMClient,
    model: str,
    facts: list[EncodedFact],
    tokenizer,
    greedy_limit: int | None = None,
    names: list[str] | None = None,
) -> ServingRecall:
    """Recall of `facts` through the server under the name `model` (or, per fact, the name in
    `names` that serves it: one adapter per update), and the locality of `model`."""
    import torch

    names = names or [model] * len(facts)
    probs = [torch.tensor(p) for p in _by_name(names, facts, client.target_probabilities)]
    report = summarize(facts, probs)
    # Greedy decoding is checked on the facts whose lowest served probability is lowest: every
    # fact is already checked teacher-forced, and above 0.5 greedy decoding cannot differ, so the
    # facts nearest the threshold are the ones a decode could still catch out (decoding costs an
    # engine step per token). Each form gets its own `greedy_limit`, so the chat endpoint is
    # always among what is asked.
    weakest = sorted(range(len(facts)), key=lambda i: float(probs[i].min()))
    checked = []
    for form in dict.fromkeys(f.form for f in facts):
        of_form = [i for i in weakest if facts[i].form == form]
        checked += of_form if greedy_limit is None else of_form[:greedy_limit]
    # Locality is asked beside the greedy answers, so the server batches them together.
    with ThreadPoolExecutor(max_workers=1) as pool:
        asked_locality = pool.submit(client.locality, model, tokenizer)
        checked_names = [names[i] for i in checked]
        texts = _by_name(checked_names, [facts[i] for i in checked], client.greedy_texts)
        locality = asked_locality.result()
    # The chat endpoint leaves out the end-of-turn token that ends a chat form's target.
    mismatches = [
        facts[i].source
        for i, text in zip(checked, texts, strict=True)
        if text
        != tokenizer.decode(list(facts[i].target_ids), skip_special_tokens=facts[i].form == "chat")
    ]
    return ServingRecall(report, len(checked), len(checked) - len(mismatches), mismatches, locality)
