"""The bodies of the HTTP API as pydantic models: they check requests (strict types, ranges, no unknown fields)
and they are the OpenAPI schema. Field names follow OpenAI, and LMDeploy for /v1/chat/interactive."""

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

# ---- requests ----

# Fields of OpenAI, LMDeploy and the routers (vllm-router, smg) for what this server does not do: the values that
# ask for nothing, accepted; any other is a 400 naming the field and saying why (the routes check them)
NOT_YET = "not supported by this server yet"
NEUTRAL = {
    "functions": ((None, []), "the deprecated functions API is not served; send tools"),
    "function_call": ((None, "none", "auto"), "the deprecated functions API is not served; send tool_choice"),
    "do_preprocess": ((True,), "messages always go through the chat template (raw text: /v1/completions)"),
    "audio": ((None,), "audio output is not supported: the models here write text"),
    "modalities": ((None, ["text"]), "the models here write text only"),
    "moderation": ((None,), "this server runs no moderation"),
    "prediction": ((None,), f"predicted outputs are {NOT_YET}"),
    "prompt_cache_options": ((None,), "the prefix cache here has no options per request"),
    "prompt_cache_retention": ((None,), "the prefix cache here keeps what memory allows"),
    "reasoning_effort": ((None,), "the models here do not take a reasoning effort"),
    "service_tier": ((None, "auto", "default"), "this server has one tier"),
    "store": ((None, False), "completions are not stored here"),
    "verbosity": ((None, "medium"), "the models here take no verbosity"),
    "web_search_options": ((None,), "this server does not search the web"),
}

ROUTER_NEUTRAL = {
    "no_stop_trim": ((False,), "stop strings are always trimmed from the output here"),
    "return_hidden_states": ((False,), "hidden states are not returned"),
}
CHAT_ROUTER_NEUTRAL = {
    "include_reasoning": ((True,), "reasoning is returned in reasoning_content (send separate_reasoning=false to "
                                   "keep it in content)"),
    "stream_reasoning": ((True,), "reasoning streams as it comes"),
    "continue_final_message": ((False,), f"continuing the last assistant message is {NOT_YET}"),
}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    null_is_a_value: ClassVar[frozenset] = frozenset()  # fields where null means something other than the default

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """OpenAI's API takes null for any optional field and means its default: so does this one."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.null_is_a_value
                    or k not in cls.model_fields or cls.model_fields[k].is_required()
                    or cls.model_fields[k].default is None}
        return data


class ContentPart(Strict):
    type: Literal["text", "refusal", "image_url", "input_audio", "file"] = Field(
        description="text (and an assistant's refusal) is read; images, audio and files are a 400: the models "
                    "here read text only.")
    text: Optional[str] = None
    refusal: Optional[str] = None
    image_url: Optional[dict] = None
    input_audio: Optional[dict] = None
    file: Optional[dict] = None


# the fields only some roles' messages take (besides role, content and name), as OpenAI's API has them
ROLE_FIELDS = {"refusal": "assistant", "tool_calls": "assistant", "tool_call_id": "tool"}  # field -> its role


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="`developer` is OpenAI's newer name for `system` and is rendered as it; `tool` answers an "
                    "assistant's tool call; `function` (the deprecated functions API) is a 400.")
    content: Optional[Union[str, list[ContentPart]]] = Field(None, description="A string or parts; null only "
                                                             "beside an assistant's refusal.")
    name: Optional[str] = Field(None, description="Who speaks: passed to the chat template where it reads it, "
                                "else written before the content as `name: `.")
    refusal: Optional[str] = Field(None, description="An assistant's earlier refusal, read as its content.")
    tool_calls: Optional[list[dict]] = Field(None, description="An assistant's earlier calls, as this server "
                                             "answered them: [{\"id\", \"type\": \"function\", \"function\": "
                                             "{\"name\", \"arguments\"}}].")
    function_call: Optional[dict] = Field(None, description="The deprecated functions API: null only (use "
                                          "tool_calls).")
    tool_call_id: Optional[str] = Field(None, description="On a tool message: the call it answers.")
    audio: Optional[dict] = Field(None, description="Null: the models here read and write text only.")


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="Send a last chunk with the usage; every other chunk has "
                                                   "`usage: null`.")


Stop = Optional[Union[str, list[str]]]
TokenId = Annotated[int, Field(ge=0)]  # and below the vocabulary's size, which the engine checks


class SamplingFields(Strict):
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 is greedy. Default: the model's "
                                         "generation config, else 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling. Default: the model's, else 1.")
    top_k: Optional[int] = Field(None, ge=0, description="Sample from the k most likely tokens; 0 is off.")
    min_p: Optional[float] = Field(None, ge=0, le=1, description="Drop tokens less likely than min_p times the "
                                   "most likely one.")
    n: int = Field(1, ge=1, le=16, description="How many choices to generate for each prompt.")
    max_tokens: Optional[int] = Field(None, ge=1, description="The most tokens to generate. Default: what is left "
                                      "of the context.")
    stop: Stop = Field(None, description="Strings that end the output (of any token length; not included).")
    stop_token_ids: Optional[list[int]] = Field(None, description="Token ids that end the output, besides the "
                                                "model's end-of-sequence tokens.")
    stream: bool = Field(False, description="Send server-sent events as tokens come, ending with `data: [DONE]`.")
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="Multiplicative, over prompt and output "
                                      "tokens; 1 is off.")
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="The same seed and request give the same output, "
                                "whatever else the server is running.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    min_tokens: int = Field(0, ge=0, description="End-of-sequence and stop tokens are held off until this many "
                            "tokens are out.")
    min_new_tokens: Optional[int] = Field(None, ge=0, description="LMDeploy's name for min_tokens.")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id (as a string) -> a bias in [-100, "
                                                   "100] added to its logit before sampling: -100 bans the token, "
                                                   "100 all but forces it.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    spaces_between_special_tokens: bool = Field(True, description="With skip_special_tokens=false: a space "
                                                "between a special token and the text beside it (LMDeploy, vLLM).")
    kwargs: Optional[dict] = Field(None, description="What LMDeploy's APIClient sends for its unused **kwargs; "
                                   "must be empty (send options as fields).")
    session_id: Optional[int] = Field(None, description="Names the request (LMDeploy): a second request with a "
                                      "session id in use gets 409. No history is kept; see /v1/chat/interactive.")
    user: Optional[str] = Field(None, description="Your end user's id; written to the server log with the request.")
    # what SGLang's and vLLM's routers (vllm-router, smg) add to every request they forward, at these values:
    # accepted as they are, else a 400 naming the field (ROUTER_NEUTRAL)
    no_stop_trim: Any = False
    return_hidden_states: Any = False


RESPONSE_FORMAT = Field(None, description="Structured output, enforced token by token: {\"type\": \"text\"} "
                        "(the default), {\"type\": \"json_object\"} (any JSON object), {\"type\": \"json_schema\", "
                        "\"json_schema\": {\"name\": ..., \"schema\": {...}, \"strict\": true}} (JSON valid against "
                        "the schema), or LMDeploy's {\"type\": \"regex_schema\", \"regex_schema\": \"...\"}. A "
                        "schema keyword that cannot be enforced is a 400, never ignored.")


class ChatCompletionRequest(SamplingFields):
    model: str = Field(description="One of the ids from /v1/models.")
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="The same as max_tokens.")
    logprobs: bool = Field(False, description="Return the log probability of each output token.")
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, description="With logprobs: this many most likely "
                                        "tokens at each position.")
    enable_thinking: Optional[bool] = Field(None, description="LMDeploy, Qwen 3 style: passed to the chat template "
                                            "(templates that do not read it ignore it).")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(None, description="More variables for the chat "
                                                           "template (vLLM).")
    parallel_tool_calls: Optional[bool] = Field(None, description="false: at most one tool call per answer. "
                                                "Default: true.")
    metadata: Optional[dict[str, str]] = Field(None, description="Accepted: it tags stored completions, and none "
                                               "are stored.")
    prompt_cache_key: Optional[str] = Field(None, description="Accepted: the prefix cache here needs no key.")
    safety_identifier: Optional[str] = Field(None, description="Your end user's id, as user.")
    response_format: Optional[dict] = RESPONSE_FORMAT
    tools: Optional[list[dict]] = Field(None, description="Functions the model may call: [{\"type\": \"function\", "
                                        "\"function\": {\"name\", \"description\", \"parameters\": a JSON "
                                        "schema}}].")
    tool_choice: Optional[Union[str, dict]] = Field(None, description="\"none\", \"auto\" (the default with "
                                                    "tools), \"required\" (at least one call, enforced), or "
                                                    "{\"type\": \"function\", \"function\": {\"name\": ...}} "
                                                    "(that function, enforced).")
    # OpenAI's and LMDeploy's fields for what this server does not do (yet): accepted with the value that asks for
    # nothing, else a 400 naming the field (NEUTRAL says which values and why)
    separate_reasoning: bool = Field(True, description="SGLang's: false leaves the reasoning in content (with "
                                     "--reasoning-parser).")
    include_reasoning: Any = True  # vLLM's and SGLang's routers send these at these values
    stream_reasoning: Any = True
    continue_final_message: Any = False
    do_preprocess: Any = True
    audio: Any = None
    modalities: Any = None
    functions: Any = None
    function_call: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None


class CompletionRequest(SamplingFields):
    null_is_a_value: ClassVar[frozenset] = frozenset({"max_tokens"})  # null: what is left of the context
    model: str = Field(description="One of the ids from /v1/models.")
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]] = Field(
        description="Text, texts, token ids, or lists of token ids; each prompt gets n choices.")
    max_tokens: Optional[int] = Field(16, ge=1, description="The most tokens to generate (OpenAI's default, 16); "
                                      "null: what is left of the context.")
    echo: bool = Field(False, description="Put the prompt before the output in the text.")
    logprobs: Optional[int] = Field(None, ge=0, le=20, description="Return the log probability of each output "
                                    "token and this many most likely tokens.")
    suffix: Optional[str] = Field(None, description="Text after the completion (fill in the middle); refused: no "
                                  "supported model does it.")
    best_of: Optional[int] = Field(None, ge=1, description="Only equal to n (or null): choices are not ranked "
                                   "here.")
    response_format: Optional[dict] = RESPONSE_FORMAT  # vLLM's and LMDeploy's, not OpenAI's


class InteractiveRequest(Strict):
    prompt: Union[str, list[Message]] = Field(description="The next user message, or messages. Empty only with "
                                              "cancel or request_output_len 0 (a turn that generates nothing); "
                                              "else an empty prompt is a 400.")
    session_id: int = Field(-1, ge=-1, description="-1: the server picks one and returns it.")
    interactive_mode: bool = Field(False, description="true: keep this session's history and KV cache for the "
                                   "next turn. false: end the session; this request runs on its own.")
    stream: bool = Field(False, description="Send one JSON object per line (application/x-ndjson) as tokens come.")
    stop: Stop = None
    request_output_len: Optional[int] = Field(None, ge=0, le=2**31 - 1, description="The most tokens to generate; 0 "
                                              "ends the session (with interactive_mode=false). Default: what is left "
                                              "of the session.")
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(40, ge=0)
    temperature: float = Field(0.8, ge=0, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cancel: bool = Field(False, description="Stop the session's running turn (the prompt is not run; the "
                         "request's fields are still checked).")
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    min_new_tokens: Optional[int] = Field(None, ge=0, description="End-of-sequence and stop tokens are held off "
                                          "until this many tokens are out.")
    min_p: float = Field(0.0, ge=0, le=1)
    spaces_between_special_tokens: bool = True
    image_url: Optional[Union[str, list]] = Field(None, description="LMDeploy's vision input: this server's "
                                                  "models read text only, so null only.")
    adapter_name: Optional[str] = Field(None, description="LMDeploy's LoRA adapter: none are loaded, so null only.")
    response_format: Optional[dict] = RESPONSE_FORMAT  # this server's, as on /v1/chat/completions
    kwargs: Optional[dict] = Field(None, description="What LMDeploy's APIClient sends for its unused **kwargs; "
                                   "must be empty.")


class EncodeRequest(Strict):
    input: Union[str, list[str]]
    do_preprocess: bool = Field(False, description="Apply the chat template first (as one user message).")
    add_bos: bool = Field(True, description="Start with the model's beginning-of-sequence token, if it has one.")


# ---- responses ----


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV cache was reused (prefix cache).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = Field(description="Null when the answer is only tool calls.")
    reasoning_content: Optional[str] = Field(None, description="With --reasoning-parser: the model's reasoning. "
                                             "Left out when there is none.")
    tool_calls: Optional[list[ToolCall]] = Field(None, description="Left out when there are none, as OpenAI does.")

    @model_serializer(mode="wrap")
    def _without_empty_fields(self, handler):
        data = handler(self)
        for key in ("reasoning_content", "tool_calls"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(BaseModel):
    """A call's first delta has its id, type and name (arguments empty); the later ones fragments of arguments."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[FinishReason] = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None


class CompletionResponse(BaseModel):
    """A text completion; streamed, each server-sent event is one of these with the new text."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class InteractiveResponse(BaseModel):
    """A turn's result; streamed, one per line with the new text, the last with finish_reason."""

    text: str
    tokens: int = Field(description="Tokens generated in this turn (so far).")
    input_tokens: int = Field(description="The new prompt tokens of this turn.")
    history_tokens: int = Field(description="Tokens the session held before this turn.")
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    session_id: int
    message: Optional[str] = Field(None, description="Why the turn ended early, e.g. a full session.")


class EncodeResponse(BaseModel):
    input_ids: Union[list[int], list[list[int]]]
    length: Union[int, list[int]]


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    message: Optional[str] = None
    instance: Optional[str] = Field(None, description="With ok: this server process's id; a new one after a restart "
                                    "(its interactive sessions are then gone).")
