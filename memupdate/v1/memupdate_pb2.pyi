from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    LIVE: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
LIVE: JobState
FAILED: JobState
CANCELLED: JobState

class Fact(_message.Message):
    __slots__ = ("prompt", "target", "text", "paraphrases", "questions")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PARAPHRASES_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target: str
    text: str
    paraphrases: _containers.RepeatedScalarFieldContainer[str]
    questions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., target: _Optional[str] = ..., text: _Optional[str] = ..., paraphrases: _Optional[_Iterable[str]] = ..., questions: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("knowledge_base", "facts", "target_fact_recall", "rank_override", "margin", "max_steps", "max_seconds", "idempotency_key")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FACT_RECALL_FIELD_NUMBER: _ClassVar[int]
    RANK_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    facts: _containers.RepeatedCompositeFieldContainer[Fact]
    target_fact_recall: float
    rank_override: int
    margin: float
    max_steps: int
    max_seconds: float
    idempotency_key: str
    def __init__(self, knowledge_base: _Optional[str] = ..., facts: _Optional[_Iterable[_Union[Fact, _Mapping]]] = ..., target_fact_recall: _Optional[float] = ..., rank_override: _Optional[int] = ..., margin: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_seconds: _Optional[float] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class PlanUpdateRequest(_message.Message):
    __slots__ = ("knowledge_base", "facts", "target_fact_recall")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FACT_RECALL_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    facts: _containers.RepeatedCompositeFieldContainer[Fact]
    target_fact_recall: float
    def __init__(self, knowledge_base: _Optional[str] = ..., facts: _Optional[_Iterable[_Union[Fact, _Mapping]]] = ..., target_fact_recall: _Optional[float] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("sequence_length_tokens", "facts", "rank", "adapter_parameters", "predicted_fact_recall", "loss_before_nats_per_token", "law", "replaced_facts", "estimated_train_seconds", "training_steps")
    SEQUENCE_LENGTH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FACT_RECALL_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_NATS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAW_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FACTS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STEPS_FIELD_NUMBER: _ClassVar[int]
    sequence_length_tokens: int
    facts: int
    rank: int
    adapter_parameters: int
    predicted_fact_recall: float
    loss_before_nats_per_token: float
    law: str
    replaced_facts: int
    estimated_train_seconds: float
    training_steps: int
    def __init__(self, sequence_length_tokens: _Optional[int] = ..., facts: _Optional[int] = ..., rank: _Optional[int] = ..., adapter_parameters: _Optional[int] = ..., predicted_fact_recall: _Optional[float] = ..., loss_before_nats_per_token: _Optional[float] = ..., law: _Optional[str] = ..., replaced_facts: _Optional[int] = ..., estimated_train_seconds: _Optional[float] = ..., training_steps: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "knowledge_base", "state", "phase", "message", "plan", "version", "training_recall", "serving_recall", "created_unix_seconds", "updated_unix_seconds", "attempts")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_RECALL_FIELD_NUMBER: _ClassVar[int]
    SERVING_RECALL_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    knowledge_base: str
    state: JobState
    phase: str
    message: str
    plan: Plan
    version: int
    training_recall: RecallReport
    serving_recall: RecallReport
    created_unix_seconds: float
    updated_unix_seconds: float
    attempts: int
    def __init__(self, job_id: _Optional[str] = ..., knowledge_base: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., phase: _Optional[str] = ..., message: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., version: _Optional[int] = ..., training_recall: _Optional[_Union[RecallReport, _Mapping]] = ..., serving_recall: _Optional[_Union[RecallReport, _Mapping]] = ..., created_unix_seconds: _Optional[float] = ..., updated_unix_seconds: _Optional[float] = ..., attempts: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("knowledge_base", "state", "page_size", "page_token")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    state: JobState
    page_size: int
    page_token: str
    def __init__(self, knowledge_base: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "kind", "unix_seconds", "message", "plan", "progress", "recall", "version")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    kind: str
    unix_seconds: float
    message: str
    plan: Plan
    progress: TrainingProgress
    recall: RecallReport
    version: int
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., kind: _Optional[str] = ..., unix_seconds: _Optional[float] = ..., message: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., recall: _Optional[_Union[RecallReport, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("step", "max_steps", "loss_nats_per_token", "token_recall", "fact_recall", "tokens_processed", "elapsed_seconds", "epoch", "active_facts", "eta_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_NATS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RECALL_FIELD_NUMBER: _ClassVar[int]
    FACT_RECALL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FACTS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    max_steps: int
    loss_nats_per_token: float
    token_recall: float
    fact_recall: float
    tokens_processed: int
    elapsed_seconds: float
    epoch: int
    active_facts: int
    eta_seconds: float
    def __init__(self, step: _Optional[int] = ..., max_steps: _Optional[int] = ..., loss_nats_per_token: _Optional[float] = ..., token_recall: _Optional[float] = ..., fact_recall: _Optional[float] = ..., tokens_processed: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., epoch: _Optional[int] = ..., active_facts: _Optional[int] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class RecallReport(_message.Message):
    __slots__ = ("facts", "target_tokens", "token_recall", "fact_recall", "min_probability", "min_probability_fact", "greedy_checked", "greedy_exact", "forms")
    FACTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RECALL_FIELD_NUMBER: _ClassVar[int]
    FACT_RECALL_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FACT_FIELD_NUMBER: _ClassVar[int]
    GREEDY_CHECKED_FIELD_NUMBER: _ClassVar[int]
    GREEDY_EXACT_FIELD_NUMBER: _ClassVar[int]
    FORMS_FIELD_NUMBER: _ClassVar[int]
    facts: int
    target_tokens: int
    token_recall: float
    fact_recall: float
    min_probability: float
    min_probability_fact: str
    greedy_checked: int
    greedy_exact: int
    forms: _containers.RepeatedCompositeFieldContainer[FormRecall]
    def __init__(self, facts: _Optional[int] = ..., target_tokens: _Optional[int] = ..., token_recall: _Optional[float] = ..., fact_recall: _Optional[float] = ..., min_probability: _Optional[float] = ..., min_probability_fact: _Optional[str] = ..., greedy_checked: _Optional[int] = ..., greedy_exact: _Optional[int] = ..., forms: _Optional[_Iterable[_Union[FormRecall, _Mapping]]] = ...) -> None: ...

class FormRecall(_message.Message):
    __slots__ = ("form", "facts", "fact_recall")
    FORM_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    FACT_RECALL_FIELD_NUMBER: _ClassVar[int]
    form: str
    facts: int
    fact_recall: float
    def __init__(self, form: _Optional[str] = ..., facts: _Optional[int] = ..., fact_recall: _Optional[float] = ...) -> None: ...

class KnowledgeBase(_message.Message):
    __slots__ = ("name", "live_version", "versions", "facts", "target_fact_recall", "verified_fact_recall", "last_probe", "verified_locality")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FACT_RECALL_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FACT_RECALL_FIELD_NUMBER: _ClassVar[int]
    LAST_PROBE_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_LOCALITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    live_version: int
    versions: _containers.RepeatedCompositeFieldContainer[Version]
    facts: int
    target_fact_recall: float
    verified_fact_recall: float
    last_probe: RecallProbe
    verified_locality: Locality
    def __init__(self, name: _Optional[str] = ..., live_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[Version, _Mapping]]] = ..., facts: _Optional[int] = ..., target_fact_recall: _Optional[float] = ..., verified_fact_recall: _Optional[float] = ..., last_probe: _Optional[_Union[RecallProbe, _Mapping]] = ..., verified_locality: _Optional[_Union[Locality, _Mapping]] = ...) -> None: ...

class Locality(_message.Message):
    __slots__ = ("token_agreement", "prompts_unchanged", "prompts", "tokens")
    TOKEN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_agreement: float
    prompts_unchanged: float
    prompts: int
    tokens: int
    def __init__(self, token_agreement: _Optional[float] = ..., prompts_unchanged: _Optional[float] = ..., prompts: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class RecallProbe(_message.Message):
    __slots__ = ("version", "unix_seconds", "reached_serving", "recall", "regressed", "reason", "flipped", "source", "locality")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REACHED_SERVING_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    REGRESSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FLIPPED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_FIELD_NUMBER: _ClassVar[int]
    version: int
    unix_seconds: float
    reached_serving: bool
    recall: RecallReport
    regressed: bool
    reason: str
    flipped: _containers.RepeatedCompositeFieldContainer[FlippedFact]
    source: str
    locality: Locality
    def __init__(self, version: _Optional[int] = ..., unix_seconds: _Optional[float] = ..., reached_serving: _Optional[bool] = ..., recall: _Optional[_Union[RecallReport, _Mapping]] = ..., regressed: _Optional[bool] = ..., reason: _Optional[str] = ..., flipped: _Optional[_Iterable[_Union[FlippedFact, _Mapping]]] = ..., source: _Optional[str] = ..., locality: _Optional[_Union[Locality, _Mapping]] = ...) -> None: ...

class FlippedFact(_message.Message):
    __slots__ = ("fact", "prompt", "min_probability")
    FACT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    fact: str
    prompt: str
    min_probability: float
    def __init__(self, fact: _Optional[str] = ..., prompt: _Optional[str] = ..., min_probability: _Optional[float] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("version", "rank", "sha256", "verified", "created_unix_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    rank: int
    sha256: str
    verified: bool
    created_unix_seconds: float
    def __init__(self, version: _Optional[int] = ..., rank: _Optional[int] = ..., sha256: _Optional[str] = ..., verified: _Optional[bool] = ..., created_unix_seconds: _Optional[float] = ...) -> None: ...

class ListKnowledgeBasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKnowledgeBasesResponse(_message.Message):
    __slots__ = ("knowledge_bases",)
    KNOWLEDGE_BASES_FIELD_NUMBER: _ClassVar[int]
    knowledge_bases: _containers.RepeatedCompositeFieldContainer[KnowledgeBase]
    def __init__(self, knowledge_bases: _Optional[_Iterable[_Union[KnowledgeBase, _Mapping]]] = ...) -> None: ...

class DescribeKnowledgeBaseRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class EvaluateRecallRequest(_message.Message):
    __slots__ = ("knowledge_base", "facts")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    facts: _containers.RepeatedCompositeFieldContainer[Fact]
    def __init__(self, knowledge_base: _Optional[str] = ..., facts: _Optional[_Iterable[_Union[Fact, _Mapping]]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class ProbeRecallRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class RepublishRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class DeleteKnowledgeBaseRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class DeleteKnowledgeBaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
