"""From a parsed request body to what the engine loop takes: prompt token ids and SamplingParams,
with every value the engine would refuse refused here first, as a 400 naming the API's field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from llmrun.engine.sampler import SamplingParams
from llmrun.errors import LlmrunError
from llmrun.options import SEED_MAX, problem
from llmrun.serve.protocol import ApiError, ChatBody, CompletionBody, OllamaOptions, SamplingFields, message_dicts

MAX_CHOICES = 16  # n above this is refused: each choice is a sequence in the batch


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the context window and the vocabulary."""

    max_context: int
    vocab_size: int


def completion_prompts(body: CompletionBody, tokenizer, limits: ModelLimits) -> list[list[int]]:
    """The prompts of /v1/completions: text (tokenized as transformers' `tokenizer(text)` does,
    special tokens included) or token ids, one or a list."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(item, str) for item in prompt):
        prompts = [tokenizer.encode(text) for text in prompt]
    elif prompt and all(isinstance(item, int) for item in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(ids) for ids in prompt]
    if not prompts:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        if any(not 0 <= token < limits.vocab_size for token in ids):
            raise ApiError(400, f"prompt token ids must be from 0 to {limits.vocab_size - 1}", param="prompt")
    return prompts


def chat_prompt(messages: list[dict], tokenizer) -> list[int]:
    """The conversation rendered with the model's chat template and tokenized."""
    from llmrun.engine.prompt import chat_prompt_ids, has_chat_template

    if not has_chat_template(tokenizer):
        raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        return chat_prompt_ids(tokenizer, messages)
    except LlmrunError as err:  # the template's raise_exception(), or a template that does not parse
        raise ApiError(400, str(err), param="messages") from None


def chat_body_prompt(body: ChatBody, tokenizer) -> list[int]:
    return chat_prompt(message_dicts(body.messages), tokenizer)


def refuse_unsupported(body: SamplingFields) -> None:
    """Fields llmrun accepts only at their neutral value: a clear 400 rather than silently ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty (an extra field)", param=name)
    if isinstance(body, CompletionBody):
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, 1, body.n):
            raise ApiError(400, "best_of is not supported (only best_of = n)", param="best_of")
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
    if not 1 <= body.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be from 1 to {MAX_CHOICES}, got {body.n}", param="n")


def _checked(key: str, value, param: str):
    wrong = problem(key, value)
    if wrong:
        raise ApiError(400, f"{param} {wrong}", param=param)
    return value


def max_new_tokens(requested: Optional[int], prompt_len: int, limits: ModelLimits, param: str) -> int:
    """The reply's token budget: as requested, or all the room the context leaves (as vLLM does)."""
    room = limits.max_context - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens but this model's context window is "
                            f"{limits.max_context} tokens (leave room for the reply)",
                       param="prompt", code="context_length_exceeded")
    if requested is None:
        return room
    _checked("max_new_tokens", requested, param)
    if requested > room:
        raise ApiError(400, f"{param} is {requested} but the prompt has {prompt_len} tokens and the context "
                            f"window is {limits.max_context}: at most {room} tokens can be generated",
                       param=param, code="context_length_exceeded")
    return requested


def openai_sampling(body: SamplingFields, prompt_len: int, limits: ModelLimits, choice: int) -> SamplingParams:
    """SamplingParams for one choice of an OpenAI request: OpenAI's defaults (temperature 1, no
    top-p cut), llmrun's extras off unless given; choice i of n samples with seed + i."""
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    seed = _checked("seed", body.seed, "seed")
    return SamplingParams(
        temperature=_checked("temperature", 1.0 if body.temperature is None else body.temperature, "temperature"),
        top_p=_checked("top_p", 1.0 if body.top_p is None else body.top_p, "top_p"),
        top_k=_checked("top_k", body.top_k, "top_k") or None,
        min_p=_checked("min_p", body.min_p, "min_p") or None,
        repetition_penalty=_checked("repetition_penalty", 1.0 if body.repetition_penalty is None
                                    else body.repetition_penalty, "repetition_penalty"),
        seed=None if seed is None else (seed + choice) % (SEED_MAX + 1),
        max_new_tokens=max_new_tokens(requested, prompt_len, limits, param),
        stop=_stop_strings(body.stop_strings, "stop"),
        logprobs=_logprobs(body),
    )


def _logprobs(body: SamplingFields) -> Optional[int]:
    """How many likeliest tokens to report beside each sampled one (None: no logprobs at all):
    completions' `logprobs: N`, or chat's `logprobs: true` with `top_logprobs: N`."""
    if isinstance(body, ChatBody):
        return _checked("logprobs", body.top_logprobs or 0, "top_logprobs") if body.logprobs else None
    return _checked("logprobs", getattr(body, "logprobs", None), "logprobs")


def ollama_sampling(options: Optional[OllamaOptions], prompt_len: int, limits: ModelLimits) -> SamplingParams:
    """SamplingParams from Ollama's `options`; what is not given takes `llmrun run`'s defaults."""
    options = options or OllamaOptions()
    given = {
        "temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
        "min_p": options.min_p, "repetition_penalty": options.repeat_penalty, "seed": options.seed,
    }
    names = {"repetition_penalty": "repeat_penalty"}
    values = {key: _checked(key, value, f"options.{names.get(key, key)}") for key, value in given.items()
              if value is not None}
    for key in ("top_k", "min_p"):
        if key in values:
            values[key] = values[key] or None  # 0 turns them off, as on the command line
    predict = options.num_predict if options.num_predict is not None and options.num_predict >= 0 else None
    return SamplingParams(**values, max_new_tokens=max_new_tokens(predict, prompt_len, limits, "options.num_predict"),
                          stop=_stop_strings(tuple(options.stop or ()), "options.stop"))


def _stop_strings(stop: Sequence[str], param: str) -> tuple[str, ...]:
    if any(not text for text in stop):
        raise ApiError(400, f"{param}: stop strings must not be empty", param=param)
    return tuple(stop)
