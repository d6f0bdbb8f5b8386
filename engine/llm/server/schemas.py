"""Request and response bodies of the OpenAI-compatible API (the subset we serve).

Unknown fields that OpenAI clients send (``frequency_penalty``, ``logit_bias``...) are accepted
and ignored, as llama.cpp and vLLM do; known fields are checked and a bad value gets a 400.
Chat completions return ``logprobs`` (with ``top_logprobs``) as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from engine.llm.defaults import filled
from engine.llm.types import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MIN_REPETITION_PENALTY,
    ChatMessage,
    SamplingParams,
    TokenLogprob,
    check_text,
)

DEFAULT_MAX_TOKENS = 256


def _valid_text(value: str) -> str:
    """A lone surrogate (``"\\ud800"`` is valid JSON) breaks the tokenizer and the log: 400."""
    return check_text(value, "the value")


# Every string a client sends: one that cannot be encoded as UTF-8 is a 400 naming it.
Text = Annotated[str, AfterValidator(_valid_text)]


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] = ""

    def as_message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content)
        return ChatMessage("system" if self.role == "developer" else self.role, text)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Sampling parameters shared by both endpoints; ``top_k`` and ``repetition_penalty``
    are extensions that vLLM and llama.cpp also accept."""

    model_config = ConfigDict(extra="ignore")

    model: Text = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    # Left out: the model's own default (its generation config, or engine.llm.defaults).
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE,
                                      description="0 for greedy, else at least 1e-5; "
                                      "default: the model's")
    top_p: float | None = Field(default=None, gt=0, le=1, description="default: the model's")
    top_k: int | None = Field(default=None, ge=0, description="default: the model's")
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY,
                                             le=MAX_REPETITION_PENALTY,
                                             description="at least 0.01; 1 means none; "
                                             "default: the model's")
    stop: Text | list[Text] | None = Field(default=None)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Extension: reading mode for this request (default: the model's, `mindset serve --learn`).
    learn: bool | None = Field(default=None, description="the model's associative memory "
                               "reads the prompt before answering (default: the model's "
                               "setting)")

    def requested_logprobs(self) -> int | None:
        """How many alternatives each token's log-probability comes with (None: none)."""
        return None

    def sampling(self, max_tokens: int | None = None,
                 defaults: dict[str, float | int] | None = None) -> SamplingParams:
        """The request's sampling; what it leaves out comes from ``defaults`` (the model's)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        chosen = filled(defaults or {}, temperature=self.temperature, top_p=self.top_p,
                        top_k=self.top_k, repetition_penalty=self.repetition_penalty)
        return SamplingParams(
            max_tokens=max_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            stop=stop,
            seed=self.seed,
            logprobs=self.requested_logprobs(),
            **chosen,
        ).validate()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class AffectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arousal: float = Field(ge=-1, le=1)
    valence: float = Field(ge=-1, le=1)


class MindsetOptions(BaseModel):
    """Extension: labels for a model with label channels (engine.model.label_channels).
    Unlike OpenAI's fields, an unknown field here is a 400: a typo would go unnoticed."""

    model_config = ConfigDict(extra="forbid")

    affect: AffectIn | None = Field(default=None, description="one affect for every token; "
                                    "only for a model with an affect channel")
    content_labels: bool | None = Field(default=None, description="flag tool results and "
                                        "quoted documents as data (default: when the model "
                                        "has a content channel)")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="alternatives per token, with logprobs")
    mindset: MindsetOptions | None = None  # extension: label channels

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling(self, max_tokens: int | None = None,
                 defaults: dict[str, float | int] | None = None) -> SamplingParams:
        params = super().sampling(max_tokens, defaults)
        if self.mindset is not None:
            affect = self.mindset.affect
            params.affect = None if affect is None else (affect.arousal, affect.valence)
            params.content_labels = self.mindset.content_labels
        return params.validate()


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] = Field(description="one prompt; a list must hold exactly one")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mindset"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None

    @classmethod
    def of(cls, tokens: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        if tokens is None:
            return None
        return cls(content=[
            TokenLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                            top_logprobs=[TopLogprobOut(token=text, logprob=value,
                                                        bytes=list(text.encode()))
                                          for text, value in t.top])
            for t in tokens])


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class MemoryOut(BaseModel):
    """Extension: what reading mode wrote for this request."""

    entries_added: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    memory: MemoryOut | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: Any = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut
    memory: MemoryOut | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
