"""Wire types of the Ollama and OpenAI APIs, as their documentation defines them.

Requests are validated strictly (a string where a number belongs is a 400, not a silent
conversion); fields the server does not know are ignored, as both APIs do. Responses are built
from these models and dumped without the fields left unset.

Ollama: https://github.com/ollama/ollama/blob/main/docs/api.md
OpenAI: https://platform.openai.com/docs/api-reference (chat, completions, embeddings, models)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class FiniteWire(Wire):
    """A request whose numbers must be finite. Python's JSON reads NaN and Infinity; a NaN
    temperature got past validation and failed in the sampler, mid-stream, as a 500."""

    model_config = ConfigDict(allow_inf_nan=False)


KeepAlive = Union[str, int, float, None]
Format = Union[Literal["", "json"], dict[str, Any], None]


# == Ollama ===================================================================================


class Options(FiniteWire):
    """Ollama's runtime options. The sampling ones are used; the others are accepted (and type
    checked) for compatibility and have no effect here."""

    num_ctx: int | None = Field(None, description="Context window in tokens (prompt + reply).")
    num_predict: int | None = Field(None, description="Most tokens to generate; -1: until a stop or a full context, -2: fill the context.")
    temperature: float | None = Field(None, description="Sampling temperature; 0 is greedy.")
    top_k: int | None = Field(None, description="Sample from the k most likely tokens; 0: off.")
    top_p: float | None = Field(None, description="Nucleus sampling: the smallest set with this much probability; 1: off.")
    min_p: float | None = Field(None, description="Drop tokens less likely than min_p times the most likely one.")
    repeat_penalty: float | None = Field(None, description="Penalty for tokens among the last repeat_last_n; 1: off.")
    repeat_last_n: int | None = Field(None, description="How many recent tokens the penalties look at; -1: num_ctx, 0: off.")
    presence_penalty: float | None = Field(None, description="Subtracted from the logit of every token already present.")
    frequency_penalty: float | None = Field(None, description="Subtracted once per earlier occurrence of a token.")
    seed: int | None = Field(None, description="Random seed: the same seed gives the same output.")
    stop: list[str] | str | None = Field(None, description="Stop strings: generation ends before them.")
    # Accepted for compatibility, no effect:
    num_keep: int | None = Field(None, description="(ignored) tokens kept when the context shifts.")
    num_batch: int | None = Field(None, description="(ignored) prompt batch size.")
    num_gpu: int | None = Field(None, description="(ignored) layers on the GPU.")
    main_gpu: int | None = Field(None, description="(ignored)")
    num_thread: int | None = Field(None, description="(ignored) threads: set HERD_NUM_THREADS for the server.")
    typical_p: float | None = Field(None, description="(ignored)")
    tfs_z: float | None = Field(None, description="(ignored)")
    mirostat: int | None = Field(None, description="(ignored)")
    mirostat_tau: float | None = Field(None, description="(ignored)")
    mirostat_eta: float | None = Field(None, description="(ignored)")
    penalize_newline: bool | None = Field(None, description="(ignored)")
    numa: bool | None = Field(None, description="(ignored)")
    low_vram: bool | None = Field(None, description="(ignored)")
    f16_kv: bool | None = Field(None, description="(ignored)")
    use_mmap: bool | None = Field(None, description="(ignored)")
    use_mlock: bool | None = Field(None, description="(ignored)")

    SAMPLING: ClassVar[tuple[str, ...]] = ("num_ctx", "num_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                "repeat_last_n", "presence_penalty", "frequency_penalty", "seed", "stop")

    @field_validator("num_ctx", "num_predict", "top_k", "repeat_last_n", "seed", "num_keep", "num_batch", "num_gpu",
                     "main_gpu", "num_thread", "mirostat", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """2048.0 is 2048, as Ollama reads it (JavaScript clients and sliders send floats)."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    def sampling(self) -> dict[str, Any]:
        """The options the engine uses, as a dict without the unset ones."""
        return {k: getattr(self, k) for k in self.SAMPLING if getattr(self, k) is not None}


class ToolCallFunction(Wire):
    name: str = Field(description="The function to call.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Its arguments.")
    index: int | None = Field(None, description="Position of the call in the reply.")


class ToolCall(Wire):
    function: ToolCallFunction = Field(description="The call.")


class Message(Wire):
    role: str = Field(description="system, user, assistant or tool.")
    content: str | None = Field(None, description="The message text.")
    images: list[str] | None = Field(None, description="Base64 images (not supported: models here are text-only).")
    tool_calls: list[ToolCall] | None = Field(None, description="Calls the assistant made.")
    tool_name: str | None = Field(None, description="For a tool message: the tool whose result this is.")
    thinking: str | None = Field(None, description="(ignored) reasoning text of thinking models.")


class Tool(Wire):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str = Field("function", description="Always \"function\".")
    function: dict[str, Any] = Field(description="name, description and JSON-schema parameters.")


class GenerateRequest(Wire):
    model: str = Field(description="Model name, e.g. smollm2:135m.")
    prompt: str | None = Field(None, description="The prompt; empty or absent: just load the model (or unload with keep_alive 0).")
    suffix: str | None = Field(None, description="Text after the response (fill-in-the-middle); needs a model with FIM tokens.")
    images: list[str] | None = Field(None, description="Base64 images (not supported).")
    format: Format = Field(None, description="\"json\" or a JSON schema: the response is constrained to it.")
    options: Options | None = Field(None, description="Runtime options (see Options).")
    system: str | None = Field(None, description="System message, instead of the model's.")
    template: str | None = Field(None, description="Jinja chat template, instead of the model's.")
    context: list[int] | None = Field(None, description="(deprecated) `context` of an earlier response: continues that conversation.")
    stream: bool = Field(True, description="Stream NDJSON objects; false: one object.")
    raw: bool = Field(False, description="The prompt is complete: no template.")
    keep_alive: KeepAlive = Field(None, description="How long the model stays loaded after this request: seconds, or a duration like \"5m\"; negative: forever; 0: unload.")
    think: bool | str | None = Field(None, description="(ignored) thinking models only.")
    logprobs: bool | None = Field(None, description="Return each token's log-probability.")
    top_logprobs: int | None = Field(None, description="And this many most likely alternatives (0-20).")


class ChatRequest(Wire):
    model: str = Field(description="Model name.")
    messages: list[Message] | None = Field(None, description="The conversation; absent or empty: just load the model (or unload with keep_alive 0).")
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    format: Format = Field(None, description="\"json\" or a JSON schema.")
    options: Options | None = Field(None, description="Runtime options.")
    stream: bool = Field(True, description="Stream NDJSON objects; false: one object.")
    keep_alive: KeepAlive = Field(None, description="See GenerateRequest.keep_alive.")
    think: bool | str | None = Field(None, description="(ignored)")
    logprobs: bool | None = Field(None, description="Return each token's log-probability.")
    top_logprobs: int | None = Field(None, description="And this many alternatives (0-20).")


class TokenLogprobOut(Wire):
    token: str = Field(description="The token's text.")
    logprob: float = Field(description="Its natural-log probability under the model.")
    bytes: list[int] | None = Field(None, description="The token's UTF-8 bytes.")


class LogprobOut(TokenLogprobOut):
    top_logprobs: list[TokenLogprobOut] | None = Field(None, description="The most likely tokens at this position.")


class Stats(Wire):
    """The statistics of the final object (durations in nanoseconds)."""

    done_reason: str | None = Field(None, description="stop, length, load or unload.")
    total_duration: int | None = Field(None, description="Time spent on the whole request.")
    load_duration: int | None = Field(None, description="Time spent loading the model.")
    prompt_eval_count: int | None = Field(None, description="Prompt tokens evaluated.")
    prompt_eval_duration: int | None = Field(None, description="Time spent evaluating the prompt.")
    eval_count: int | None = Field(None, description="Tokens generated.")
    eval_duration: int | None = Field(None, description="Time spent generating.")
    num_ctx: int | None = Field(None, description="(llamaherd) The context the request ran with: num_ctx after clamping to the model's, or growing to fit the prompt.")
    safety: dict[str, Any] | None = Field(None, description="Moderation (HERD_GUARD, HERD_CODE_SHIELD): the "
                                          "guard's verdict when done_reason is content_filter, code-shield findings.")


class GenerateResponse(Stats):
    model: str = Field(description="The model's name.")
    created_at: str = Field(description="RFC 3339 time of this object.")
    response: str = Field("", description="Text (a piece of it when streaming).")
    done: bool = Field(False, description="Whether this is the last object.")
    context: list[int] | None = Field(None, description="Tokens of this exchange, to continue it (final object).")
    logprobs: list[LogprobOut] | None = Field(None, description="Per-token log-probabilities, when asked.")


class ChatMessageOut(Wire):
    role: str = Field("assistant", description="Always assistant.")
    content: str = Field("", description="Text (a piece of it when streaming).")
    tool_calls: list[ToolCall] | None = Field(None, description="Tool calls the model made.")


class ChatResponse(Stats):
    model: str = Field(description="The model's name.")
    created_at: str = Field(description="RFC 3339 time of this object.")
    message: ChatMessageOut = Field(default_factory=ChatMessageOut, description="The reply (a piece of it when streaming).")
    done: bool = Field(False, description="Whether this is the last object.")
    logprobs: list[LogprobOut] | None = Field(None, description="Per-token log-probabilities, when asked.")


class EmbedRequest(Wire):
    model: str = Field(description="Model name.")
    input: str | list[str] = Field(description="Text or texts to embed.")
    truncate: bool = Field(True, description="Cut inputs longer than the context; false: that is an error.")
    options: Options | None = Field(None, description="Runtime options (num_ctx).")
    keep_alive: KeepAlive = Field(None, description="See GenerateRequest.keep_alive.")
    dimensions: int | None = Field(None, description="Keep the first n dimensions (re-normalised).")


class EmbedResponse(Wire):
    model: str = Field(description="The model's name.")
    embeddings: list[list[float]] = Field(description="One L2-normalised vector per input.")
    total_duration: int | None = Field(None, description="Nanoseconds for the request.")
    load_duration: int | None = Field(None, description="Nanoseconds loading the model.")
    prompt_eval_count: int | None = Field(None, description="Tokens embedded.")


class EmbeddingsRequest(Wire):
    model: str = Field(description="Model name.")
    prompt: str = Field(description="Text to embed.")
    options: Options | None = Field(None, description="Runtime options.")
    keep_alive: KeepAlive = Field(None, description="See GenerateRequest.keep_alive.")


class EmbeddingsResponse(Wire):
    embedding: list[float] = Field(description="The L2-normalised vector.")


class ModelRequest(Wire):
    """/api/show, /api/delete and /api/pull name a model as `model` (or, formerly, `name`)."""

    model: str | None = Field(None, description="Model name.")
    name: str | None = Field(None, description="(deprecated) same as model.")
    verbose: bool = Field(False, description="/api/show: include large metadata (ignored).")
    insecure: bool = Field(False, description="/api/pull: (ignored) allow insecure registries.")
    stream: bool = Field(True, description="/api/pull: stream progress objects.")

    def model_name(self) -> str:
        from ..errors import HerdError

        name = self.model or self.name
        if not name:
            raise HerdError("model is required")
        return name


class CopyRequest(Wire):
    source: str = Field(description="Existing model name.")
    destination: str = Field(description="New name for it.")


class CreateRequest(Wire):
    model: str = Field(description="Name of the model to create.")
    from_: str | None = Field(None, alias="from", description="An existing model to build on.")
    files: dict[str, str] | None = Field(None, description="File name -> sha256 digest of a blob uploaded with POST /api/blobs/:digest (a GGUF file).")
    adapters: dict[str, str] | None = Field(None, description="LoRA adapter files, as files.")
    template: str | None = Field(None, description="Chat template.")
    license: str | list[str] | None = Field(None, description="License text(s).")
    system: str | None = Field(None, description="System prompt.")
    parameters: dict[str, Any] | None = Field(None, description="Default options.")
    messages: list[Message] | None = Field(None, description="Conversation every chat starts with.")
    stream: bool = Field(True, description="Stream progress objects.")
    quantize: str | None = Field(None, description="Store the weights quantized: q8_0, q4_0, q4_K_M (q4_k).")


class ModelDetails(Wire):
    parent_model: str = Field("", description="The model this one was made from.")
    format: str = Field("", description="gguf, safetensors or meta.")
    family: str = Field("", description="Architecture family, e.g. llama.")
    families: list[str] | None = Field(None, description="Families.")
    parameter_size: str = Field("", description="Parameters, e.g. 135M.")
    quantization_level: str = Field("", description="e.g. Q4_1, F16.")


class ListedModel(Wire):
    name: str = Field(description="Model name.")
    model: str = Field(description="Model name (again, as Ollama).")
    modified_at: str = Field(description="RFC 3339 modification time.")
    size: int = Field(description="Bytes on disk.")
    digest: str = Field(description="Manifest digest (hex).")
    details: ModelDetails = Field(description="Architecture facts.")
    error: str | None = Field(None, description="(llamaherd) Why the model cannot be read (a damaged manifest or config); "
                                                "absent for a good one. Its blobs are kept: `herd doctor` says more.")


class ListResponse(Wire):
    models: list[ListedModel] = Field(description="The models in the store.")


class RunningModelOut(Wire):
    name: str = Field(description="Model name.")
    model: str = Field(description="Model name.")
    size: int = Field(description="Bytes in memory (weights and KV cache).")
    digest: str = Field(description="Manifest digest (hex).")
    details: ModelDetails = Field(description="Architecture facts.")
    expires_at: str = Field(description="RFC 3339 time at which it will be unloaded if idle.")
    size_vram: int = Field(description="Bytes in GPU memory.")
    context_length: int = Field(description="The context in use (the latest request's num_ctx).")


class ProcessResponse(Wire):
    models: list[RunningModelOut] = Field(description="The loaded models, most recently used first.")


class ShowResponse(Wire):
    modelfile: str = Field(description="A Modelfile that recreates the model.")
    parameters: str = Field("", description="Default options, one \"name value\" per line.")
    template: str = Field("", description="The chat template.")
    system: str | None = Field(None, description="The system prompt.")
    license: str | None = Field(None, description="License text.")
    details: ModelDetails = Field(description="Architecture facts.")
    model_info: dict[str, Any] = Field(description="Architecture facts as GGUF-style keys (general.architecture, llama.context_length, ...).")
    capabilities: list[str] = Field(description="completion, tools, insert, embedding.")
    modified_at: str | None = Field(None, description="RFC 3339 modification time.")


class VersionResponse(Wire):
    version: str = Field(description="The Ollama version whose API the server matches (for clients that check one).")
    llamaherd: str | None = Field(None, description="llamaherd's own version.")


# == OpenAI ===================================================================================


class StreamOptions(Wire):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and no choices).")


class JsonSchemaFormat(Wire):
    name: str | None = Field(None, description="Schema name.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema.")
    strict: bool | None = Field(None, description="(always strict here)")
    description: str | None = Field(None, description="(ignored)")


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"] = Field(description="text, json_object or json_schema.")
    json_schema: JsonSchemaFormat | None = Field(None, description="With type json_schema.")


class OAIFunctionCall(Wire):
    name: str = Field(description="Function name.")
    arguments: str = Field(description="Arguments as a JSON string.")


class OAIToolCall(Wire):
    id: str | None = Field(None, description="Call id.")
    type: str = Field("function", description="Always function.")
    function: OAIFunctionCall = Field(description="The call.")
    index: int | None = Field(None, description="Position (streaming only).")


class OAIMessage(Wire):
    role: str = Field(description="system, developer, user, assistant or tool.")
    content: str | list[dict[str, Any]] | None = Field(None, description="Text, or a list of text parts.")
    name: str | None = Field(None, description="(ignored) participant name.")
    tool_calls: list[OAIToolCall] | None = Field(None, description="Calls the assistant made.")
    tool_call_id: str | None = Field(None, description="For a tool message: the call it answers.")


class OAITool(Wire):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["function"] = Field(description="Always function.")
    function: dict[str, Any] = Field(description="name, description, parameters.")


class ChatCompletionRequest(FiniteWire):
    model: str = Field(description="Model name.")
    messages: list[OAIMessage] = Field(description="The conversation (not empty).")
    frequency_penalty: float | None = Field(None, description="Subtracted once per earlier occurrence of a token.")
    presence_penalty: float | None = Field(None, description="Subtracted from tokens already present.")
    logprobs: bool | None = Field(None, description="Return log-probabilities of the output tokens.")
    top_logprobs: int | None = Field(None, description="Alternatives per position (0-20), with logprobs.")
    max_tokens: int | None = Field(None, description="(deprecated) most tokens to generate.")
    max_completion_tokens: int | None = Field(None, description="Most tokens to generate.")
    n: int | None = Field(None, description="Choices to generate: only 1.")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrained output.")
    seed: int | None = Field(None, description="Random seed.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stream: bool = Field(False, description="Stream server-sent events, ending with data: [DONE].")
    stream_options: StreamOptions | None = Field(None, description="include_usage.")
    temperature: float | None = Field(None, description="0-2; 0 is greedy.")
    top_p: float | None = Field(None, description="Nucleus sampling.")
    tools: list[OAITool] | None = Field(None, description="Functions the model may call.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="none, auto (default) or required.")
    parallel_tool_calls: bool | None = Field(None, description="(ignored)")
    user: str | None = Field(None, description="(ignored)")
    keep_alive: KeepAlive = Field(None, description="(extension) as Ollama's keep_alive.")


class CompletionRequest(FiniteWire):
    model: str = Field(description="Model name.")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="Text, token ids, or a batch of either.")
    suffix: str | None = Field(None, description="Text after the completion (FIM models only).")
    max_tokens: int | None = Field(None, description="Most tokens to generate; 0 with echo scores the prompt.")
    temperature: float | None = Field(None, description="0-2; 0 is greedy.")
    top_p: float | None = Field(None, description="Nucleus sampling.")
    n: int | None = Field(None, description="Completions per prompt: only 1.")
    stream: bool = Field(False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="include_usage.")
    logprobs: int | None = Field(None, description="Log-probabilities of the chosen tokens and this many alternatives (0-20).")
    echo: bool = Field(False, description="Put the prompt before the completion (with its logprobs).")
    stop: str | list[str] | None = Field(None, description="Stop strings.")
    presence_penalty: float | None = Field(None, description="As in chat.")
    frequency_penalty: float | None = Field(None, description="As in chat.")
    seed: int | None = Field(None, description="Random seed.")
    best_of: int | None = Field(None, description="Only 1.")
    user: str | None = Field(None, description="(ignored)")
    keep_alive: KeepAlive = Field(None, description="(extension) as Ollama's keep_alive.")


class EmbeddingRequest(Wire):
    model: str = Field(description="Model name.")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="Text, token ids, or a batch of either.")
    encoding_format: Literal["float", "base64"] = Field("float", description="float: a list; base64: little-endian float32 bytes.")
    dimensions: int | None = Field(None, description="Keep the first n dimensions (re-normalised).")
    user: str | None = Field(None, description="(ignored)")
