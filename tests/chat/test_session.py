"""ChatSession on a tiny random model: KV reuse across turns, dropping turns, interrupts, reset."""

import pytest

from llmrun.chat.session import ChatSession
from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.prompt import chat_prompt_ids
from llmrun.engine.sampler import SamplingParams
from llmrun.errors import ContextOverflowError

TURNS = ["Hello, how are you today?", "The capital of France is Paris.", "def main():",
         "Numbers: 1 2 3", "a b c d e f g", "The capital of Italy is Rome."]
GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


def fresh_tokens(engine, ids, params=GREEDY):
    """The reply of a fresh run: no kept sequence, nothing cached."""
    return engine.generate([ids], params).run_to_end()[0].tokens


def template_text(tokenizer, messages):
    return tokenizer.render_chat(messages, add_generation_prompt=True)  # checked against transformers elsewhere


def check_turn_five(engine, params=GREEDY):
    """Turn 5 prefills exactly its own tokens plus the template's glue, and equals a fresh run."""
    session = ChatSession(engine, params, system="You are terse.")
    tokenizer = engine.tokenizer
    for turn_text in TURNS[:4]:
        previous = session.add_user(turn_text)
        previous_reply = session.reply(previous, lambda text: None)
    previous_text = template_text(tokenizer, session.conversation.messages()[:-1]) + previous_reply.text
    turn = session.add_user(TURNS[4])
    reply = session.reply(turn, lambda text: None)

    # What turn 5 adds to the rendered conversation: template glue around the new user message.
    added = template_text(tokenizer, session.conversation.messages()[:-1])
    assert added.startswith(previous_text)
    suffix = added[len(previous_text):]
    assert TURNS[4] in suffix
    messages = session.conversation.messages()[:-1]
    empty_turn = template_text(tokenizer, messages[:-1] + [{"role": "user", "content": ""}])
    glue = empty_turn[len(previous_text):]  # the template's own text around a user message
    assert suffix.replace(TURNS[4], "", 1) == glue
    new_tokens = len(tokenizer.encode(suffix, add_special_tokens=False))
    # A reply cut at the token limit ends with a token that was sampled but never run: prefill it too.
    unrun = 1 if previous_reply.finish_reason == "length" else 0
    assert reply.prefilled_tokens == new_tokens + unrun
    assert reply.reused_tokens == len(previous.prompt_ids) + len(previous_reply.tokens) - 1
    assert reply.prompt_tokens == len(turn.prompt_ids) == reply.prefilled_tokens + reply.reused_tokens
    assert turn.prompt_ids == chat_prompt_ids(tokenizer, session.conversation.messages()[:-1])
    assert session.totals.num_replies == 5
    session.close()
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert reply.tokens == fresh_tokens(engine, turn.prompt_ids, params)


def test_turn_five_prefills_only_its_tokens_and_glue_and_equals_a_fresh_run(tiny_engine):
    check_turn_five(tiny_engine)


@pytest.mark.slow
def test_turn_five_with_smollm2(smollm2_dir):
    check_turn_five(build_engine(smollm2_dir, EngineOptions(gpu_mem_bytes=0)),
                    SamplingParams(temperature=0, max_new_tokens=16))


def test_replies_that_do_not_tokenize_back_fall_back_to_the_common_prefix(tmp_path):
    """Seed 5's replies are broken UTF-8: re-rendered history differs from the cached tokens, so
    less is reused, but every reply still equals a fresh run of the same conversation."""
    from tests.checkpoints import llama_config, save_checkpoint

    folder = save_checkpoint(tmp_path / "garbled", llama_config(), seed=5)
    options = EngineOptions(dtype="float32", gpu_mem_bytes=0)
    chat, fresh = build_engine(folder, options), build_engine(folder, options)
    session = ChatSession(chat, GREEDY)
    fallbacks = 0
    for text in TURNS[:4]:
        cached = list(session.kept.cached_ids)
        turn = session.add_user(text)
        reply = session.reply(turn, lambda delta: None)
        common = next((i for i, (a, b) in enumerate(zip(cached, turn.prompt_ids)) if a != b),
                      min(len(cached), len(turn.prompt_ids)))
        assert reply.reused_tokens == min(common, len(turn.prompt_ids) - 1)
        fallbacks += bool(cached) and common < len(cached)
        assert reply.tokens == fresh_tokens(fresh, turn.prompt_ids)
    assert fallbacks  # the case this test is about did happen


def test_an_overflow_drops_the_oldest_turns_keeps_the_system_and_frees_blocks(tiny_chat_model):
    options = EngineOptions(dtype="float32", gpu_mem_bytes=0, ctx=128)
    engine, fresh = build_engine(tiny_chat_model, options), build_engine(tiny_chat_model, options)
    session = ChatSession(engine, GREEDY, system="You are terse.")
    drops = []
    for text in TURNS * 2:
        held_before = session.held_blocks
        turn = session.add_user(text)
        reply = session.reply(turn, lambda delta: None)
        assert len(turn.prompt_ids) + GREEDY.max_new_tokens <= engine.max_context
        assert turn.prompt_ids == chat_prompt_ids(engine.tokenizer, session.conversation.messages()[:-1])
        assert reply.tokens == fresh_tokens(fresh, turn.prompt_ids)
        if turn.dropped_turns:
            drops.append(turn.dropped_turns)
            assert len(turn.prompt_ids) <= engine.max_context // 2
            assert session.held_blocks < held_before  # the dropped turns' blocks went back
            # The cache stayed valid only up to where the old and new first user messages differ.
            first = session.conversation.messages()[:2]
            assert reply.reused_tokens < len(chat_prompt_ids(engine.tokenizer, first))
    assert len(drops) >= 2
    assert session.totals.num_dropped_turns == sum(drops)
    assert session.conversation.system == "You are terse."
    assert session.conversation.messages()[0] == {"role": "system", "content": "You are terse."}
    assert session.conversation.turns[-1].user == TURNS[-1]


def test_a_message_that_cannot_fit_is_refused_and_forgotten(tiny_chat_model):
    engine = build_engine(tiny_chat_model, EngineOptions(dtype="float32", gpu_mem_bytes=0, ctx=64))
    session = ChatSession(engine, GREEDY)
    session.reply(session.add_user("Hi"), lambda delta: None)
    with pytest.raises(ContextOverflowError, match="the context holds 64"):
        session.add_user(" ".join(TURNS))
    assert [t.user for t in session.conversation.turns] == ["Hi"]


@pytest.mark.parametrize("how", ["should_stop", "KeyboardInterrupt"])
def test_an_interrupted_reply_stays_marked_and_the_next_turn_is_right(tiny_engine, how):
    session = ChatSession(tiny_engine, SamplingParams(temperature=0, max_new_tokens=40))
    seen = []

    def on_text(delta):
        seen.append(delta)
        if how == "KeyboardInterrupt" and len(seen) == 5:
            raise KeyboardInterrupt

    turn = session.add_user(TURNS[0])
    reply = session.reply(turn, on_text, should_stop=lambda: len(seen) >= 5)
    assert reply.interrupted and len(reply.tokens) == 5 and reply.text == "".join(seen)
    last = session.conversation.turns[-1]
    assert last.interrupted and last.assistant == reply.text
    assert session.kept.cached_ids == (turn.prompt_ids + reply.tokens)[: len(session.kept.cached_ids)]
    assert len(session.kept.cached_ids) >= len(turn.prompt_ids)
    after = session.add_user(TURNS[1])
    second = session.reply(after, lambda delta: None)
    assert not second.interrupted and second.reused_tokens >= len(turn.prompt_ids)
    session.close()
    assert second.tokens == fresh_tokens(tiny_engine, after.prompt_ids, session.params)


def test_reset_and_load_free_the_blocks_and_keep_what_they_should(tiny_engine):
    from llmrun.chat.conversation import Conversation, Turn

    session = ChatSession(tiny_engine, GREEDY, system="Be brief.")
    session.reply(session.add_user(TURNS[0]), lambda delta: None)
    assert session.held_blocks > 0
    session.reset()
    assert session.held_blocks == 0 and session.cached_tokens == 0
    assert session.conversation == Conversation("Be brief.", [])
    session.reset(Conversation(None, [Turn("a", "b")]))
    turn = session.add_user("c")
    assert [m["content"] for m in session.conversation.messages()] == ["a", "b", "c"]
    assert session.reply(turn, lambda delta: None).prefilled_tokens == len(turn.prompt_ids)
    session.close()
    assert tiny_engine.allocator.num_free_blocks == tiny_engine.allocator.num_blocks


class _StubEngine:
    max_context = 64

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def keep_sequence(self):
        return None


def test_a_model_without_a_chat_template_is_a_usage_error():
    from types import SimpleNamespace

    from llmrun.errors import UsageError

    with pytest.raises(UsageError, match="no chat template"):
        ChatSession(_StubEngine(SimpleNamespace(chat_template=None)), GREEDY)


def test_a_template_that_rejects_the_conversation_is_a_usage_error():
    from types import SimpleNamespace

    import jinja2

    from llmrun.errors import UsageError

    def render_chat(*args, **kwargs):
        raise jinja2.TemplateError("System role not supported")

    tokenizer = SimpleNamespace(chat_template="...", render_chat=render_chat)
    session = ChatSession(_StubEngine(tokenizer), GREEDY, system="x")
    with pytest.raises(UsageError, match="rejected the conversation: System role not supported"):
        session.add_user("hi")
    assert session.conversation.turns == []
