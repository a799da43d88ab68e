"""The OpenAI endpoints as the real `openai` client meets them, on a real server: completions and
chat equal to the engine's own greedy run, streaming with usage, stop, seed, n, logprobs, the
prefix cache in usage, /v1/models, /health, /metrics."""

import pytest
from openai import OpenAI

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.prompt import chat_prompt_ids
from llmrun.engine.sampler import SamplingParams

MODEL = "tiny-serve"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(serve_model):
    """The same model in this process, for each request's own greedy run."""
    return build_engine(serve_model, EngineOptions(dtype="float32", gpu_mem_bytes=0))


def alone(engine, ids, max_tokens, **params):
    result = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=max_tokens, **params)).run_to_end()[0]
    return result


def test_completion_equals_the_engines_greedy_run(client, engine):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24, temperature=0)
    want = alone(engine, engine.tokenizer.encode("The capital of France is"), 24)
    assert reply.object == "text_completion" and reply.model == MODEL
    assert reply.choices[0].text == want.text
    assert reply.choices[0].finish_reason == ("length" if want.finish_reason.value == "length" else "stop")
    assert reply.usage.prompt_tokens == want.prompt_tokens
    assert reply.usage.completion_tokens == len(want.tokens)
    assert reply.usage.total_tokens == want.prompt_tokens + len(want.tokens)


def test_chat_applies_the_template_and_equals_the_engine(client, engine):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    want = alone(engine, chat_prompt_ids(engine.tokenizer, MESSAGES), 20)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == want.prompt_tokens


def test_chat_stream_with_usage_joins_to_the_whole_reply(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_without_usage_has_no_usage_chunk(client):
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_end_the_reply_before_the_first_of_them(client):
    whole = client.completions.create(model=MODEL, prompt="Numbers: 0 1 2", max_tokens=40, temperature=0)
    text = whole.choices[0].text
    assert len(text) > 12, text
    first, later = text[4:7], text[9:12]
    reply = client.completions.create(model=MODEL, prompt="Numbers: 0 1 2", max_tokens=40, temperature=0,
                                      stop=[later, first])
    assert reply.choices[0].text == text[: min(text.index(first), text.index(later))]
    assert reply.choices[0].finish_reason == "stop"
    single = client.completions.create(model=MODEL, prompt="Numbers: 0 1 2", max_tokens=40, temperature=0,
                                       stop=later)
    assert single.choices[0].text == text[: text.index(later)]


def test_seed_repeats_a_sampled_reply_and_n_gives_each_choice_its_own(client):
    def sample(seed, n=1):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=1.0,
                                              seed=seed, n=n)

    first, again, other = sample(7), sample(7), sample(8)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    three = sample(7, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == first.choices[0].message.content  # choice i samples with seed + i
    assert three.choices[1].message.content == other.choices[0].message.content
    third = sample(9)
    assert three.choices[2].message.content == third.choices[0].message.content
    assert three.usage.prompt_tokens == first.usage.prompt_tokens  # the prompt counted once
    assert three.usage.completion_tokens == sum(r.usage.completion_tokens for r in (first, other, third))


def test_n_streams_every_choice_to_its_end(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=1.0, seed=3,
                                            n=2, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=1.0, seed=3, n=2)
    assert texts == {c.index: c.text for c in whole.choices}


def test_logprobs_report_the_greedy_token_as_the_likeliest(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs) <= 0
        assert entry.token == entry.top_logprobs[0].token
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_a_repeated_prompt_reports_cached_tokens(client):
    prompt = "The capital of France is Paris. The capital of Italy is Rome. " * 8
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens >= 64
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    assert second.choices[0].text == first.choices[0].text


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    status, body = server.get("/health")
    assert status == 200 and b'"ok"' in body
    metrics = server.metrics()
    for name in ("llmrun_requests_running", "llmrun_requests_waiting", "llmrun_kv_blocks_used",
                 "llmrun_kv_blocks_cached", "llmrun_prompt_tokens_total", "llmrun_generation_tokens_total",
                 "llmrun_prefix_cache_hit_rate", "llmrun_time_to_first_token_seconds_count"):
        assert name in metrics, name
    assert metrics["llmrun_generation_tokens_total"] > 0
    assert metrics["llmrun_time_to_first_token_seconds_count"] > 0
