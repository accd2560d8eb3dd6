"""Facts: what must be remembered, as `prompt` + `target`, or one plain `text`.

A `prompt` + `target` fact may also carry the other forms it is asked in: `paraphrases` (other
prompts continued with the same target) and `questions` (asked in chat form, answered with the
target). Every form is trained and checked (see `encoding.py`).

For a `text` fact every token but the first is a target (see `encoding.py`). Facts come from
JSONL files (one JSON object a line) or from Python objects; every problem is reported with the
line it is on, and nothing is trained from a file that has one.
"""

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, model_validator

DEFAULT_MAX_FACTS = 100_000
MAX_FORMS = 32  # paraphrases, and questions, per fact: each one is trained like a fact
# C0 controls and DEL, except tab and newlines: never meant as text to remember (NUL also
# breaks C-string consumers downstream).
CONTROL_CHARACTERS = frozenset(chr(c) for c in [*range(0x20), 0x7F]) - {"\t", "\n", "\r"}


class FactError(ValueError):
    """Bad fact input; the message names where (file:line or fact index) and what."""


class Fact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr | None = None
    target: StrictStr | None = None
    text: StrictStr | None = None
    paraphrases: tuple[StrictStr, ...] = ()
    questions: tuple[StrictStr, ...] = ()
    source: str = ""  # where the fact came from ("facts.jsonl:12"), for error messages

    @model_validator(mode="after")
    def _one_form(self) -> "Fact":
        for name in ("prompt", "target", "text"):
            _check_characters(name, getattr(self, name) or "")
        for name in ("paraphrases", "questions"):
            forms = getattr(self, name)
            if len(forms) > MAX_FORMS:
                raise ValueError(f"`{name}`: {len(forms)} given, the limit is {MAX_FORMS}")
            for i, form in enumerate(forms):
                _check_characters(f"{name}[{i}]", form)
                if not form.strip():
                    raise ValueError(f"`{name}[{i}]` is empty")
        if self.text is not None:
            if self.prompt is not None or self.target is not None:
                raise ValueError("give either `text` or `prompt` + `target`, not both")
            if self.paraphrases or self.questions:
                raise ValueError("`paraphrases` and `questions` need `prompt` + `target`")
            if not self.text.strip():
                raise ValueError("`text` is empty")
            return self
        if self.prompt is None or self.target is None:
            raise ValueError("a fact needs `prompt` and `target` (or a single `text`)")
        if not self.prompt.strip():
            raise ValueError("`prompt` is empty")
        if not self.target.strip():
            raise ValueError("`target` is empty: there is nothing to remember")
        return self

    @property
    def where(self) -> str:
        return self.source or "fact"

    def to_json(self) -> dict:
        """The fields given, as in a JSONL line (no source, nothing left at its default)."""
        return self.model_dump(mode="json", exclude_defaults=True, exclude={"source"})


def _check_characters(name: str, value: str) -> None:
    bad = CONTROL_CHARACTERS.intersection(value)
    if bad:
        codes = ", ".join(f"U+{ord(c):04X}" for c in sorted(bad))
        raise ValueError(f"`{name}` contains control characters ({codes})")


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ").replace("a valid tuple", "a list")
        field = ".".join(str(x) for x in item["loc"])
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


def parse_fact(obj: object, source: str) -> Fact:
    if not isinstance(obj, dict):
        raise FactError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    if "source" in obj:  # a Fact's own field, not an input: name it as pydantic names extras
        raise FactError(f"{source}: source: Extra inputs are not permitted")
    try:
        return Fact(**obj, source=source)
    except ValidationError as err:
        raise FactError(f"{source}: {_describe(err)}") from None
    except TypeError as err:  # e.g. a key that is not a string
        raise FactError(f"{source}: {err}") from None


def load_facts(path: str | Path, max_facts: int = DEFAULT_MAX_FACTS) -> list[Fact]:
    """Read a JSONL file. Raises FactError listing every bad line (up to 20)."""
    path = Path(path)
    if not path.is_file():
        raise FactError(f"{path}: no such file")
    facts: list[Fact] = []
    errors: list[str] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            source = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                errors.append(f"{source}: not UTF-8 text (bad byte at column {err.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{source}: invalid JSON ({err.msg} at column {err.colno})")
                continue
            except RecursionError:
                errors.append(f"{source}: invalid JSON (nested too deeply)")
                continue
            try:
                facts.append(parse_fact(obj, source))
            except FactError as err:
                errors.append(str(err))
            if len(facts) > max_facts:
                raise FactError(f"{path}: more than the limit of {max_facts} facts")
    raise_collected(errors)
    if not facts:
        raise FactError(f"{path}: no facts in the file")
    return facts


def raise_collected(errors: list[str]) -> None:
    """Raise one FactError listing every problem found (the first 20), if there are any."""
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise FactError(f"{len(errors)} bad fact(s), nothing trained:\n  {shown}{more}")


def check_fact_count(facts: list[Fact], max_facts: int = DEFAULT_MAX_FACTS) -> None:
    if not facts:
        raise FactError("no facts given")
    if len(facts) > max_facts:
        raise FactError(f"{len(facts)} facts exceed the limit of {max_facts}")


def write_facts(facts: list[Fact], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for fact in facts:
            fh.write(json.dumps(fact.to_json(), ensure_ascii=False) + "\n")
