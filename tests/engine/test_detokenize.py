import pytest

from llmrun.engine.detokenize import TextStream


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.checkpoints import save_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def stream_all(tokenizer, text, stop=()):
    stream = TextStream(tokenizer, stop)
    out, stopped = "", False
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        delta, stopped = stream.push(token)
        out += delta
        if stopped:
            break
    if not stopped:
        out += stream.flush()
    return out, stopped


def test_deltas_concatenate_to_the_full_text(tokenizer):
    text = "Hello, how are you today? The capital of France is Paris."
    assert stream_all(tokenizer, text) == (text, False)


def test_stop_string_ends_text_before_it(tokenizer):
    out, stopped = stream_all(tokenizer, "The capital of France is Paris. The capital of Italy", stop=("Paris",))
    assert stopped
    assert out == "The capital of France is "


def test_partial_stop_prefix_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, ("Rome!",))
    emitted = ""
    for token in tokenizer("of Rome. Yes", add_special_tokens=False)["input_ids"]:
        delta, stopped = stream.push(token)
        assert not stopped
        emitted += delta
        assert "Rome!" not in emitted
    assert emitted + stream.flush() == "of Rome. Yes"


def test_special_tokens_are_not_emitted(tokenizer):
    stream = TextStream(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = ""
    for token in tokenizer("hello", add_special_tokens=False)["input_ids"] + [im_end]:
        text += stream.push(token)[0]
    assert text + stream.flush() == "hello"
