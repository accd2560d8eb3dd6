"""Edge validation: request messages to pydantic models, with errors that name the field."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from memupdate.memory.facts import Fact, FactError, parse_fact
from memupdate.serving.registry import RegistryError, validate_name

KbName = Annotated[str, Field(min_length=1, max_length=63)]


class InvalidRequest(ValueError):
    """A request field is wrong; the message names it."""


def _kb(name: str) -> str:
    try:
        return validate_name(name)
    except RegistryError as err:
        raise ValueError(str(err)) from None


def facts_from_proto(facts, max_facts: int) -> list[Fact]:
    if len(facts) > max_facts:
        raise InvalidRequest(f"facts: {len(facts)} facts exceed the limit of {max_facts}")
    out = []
    for i, f in enumerate(facts):
        # proto3 cannot tell an unset string from an empty one: without `text` it is the
        # prompt + target form; `text` beside a non-empty prompt or target is refused.
        if f.text:
            obj = {k: getattr(f, k) for k in ("prompt", "target", "text") if getattr(f, k)}
        else:
            obj = {"prompt": f.prompt, "target": f.target}
            obj.update({k: list(getattr(f, k)) for k in ("paraphrases", "questions")})
        try:
            out.append(parse_fact(obj, f"facts[{i}]"))
        except FactError as err:
            raise InvalidRequest(str(err)) from None
    return out


class SubmitUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    knowledge_base: KbName
    facts: list[Fact] = Field(min_length=1)
    target_fact_recall: float = Field(gt=0, le=1)
    rank_override: int = Field(ge=0, le=512)
    margin: float = Field(ge=0, lt=0.5)
    max_steps: int = Field(ge=0, le=1_000_000)
    max_seconds: float = Field(ge=0)
    idempotency_key: str = Field(max_length=128)

    _name = field_validator("knowledge_base")(classmethod(lambda cls, v: _kb(v)))


class PlanRequest(BaseModel):
    knowledge_base: KbName
    facts: list[Fact] = Field(min_length=1)
    target_fact_recall: float = Field(gt=0, le=1)

    _name = field_validator("knowledge_base")(classmethod(lambda cls, v: _kb(v)))


def validated(model: type[BaseModel], **values) -> BaseModel:
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "request"
        raise InvalidRequest(f"{field}: {first['msg'].removeprefix('Value error, ')}") from None
