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


class CountingTokenizer:
    """A tokenizer whose decode records how many ids each call was given."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, **kwargs)


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer: '▁' for spaces, stripped at the start of a decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *bytes_], show_progress=False)
    tok.train_from_iterator(["the capital of France is Paris, the capital of Italy is Rome"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


LONG_TEXT = ("Streaming  text, token by token: ünïcödé, 電腦 and 🙂 emoji split across byte tokens; "
             "spaces , before punctuation .\n\nNew paragraph\twith a tab. ") * 12


@pytest.mark.parametrize("kind", ["byte-level BPE", "metaspace"])
def test_long_output_streams_exactly_and_decodes_short_windows(tokenizer, kind):
    inner = tokenizer if kind == "byte-level BPE" else metaspace_tokenizer()
    ids = inner(LONG_TEXT, add_special_tokens=False)["input_ids"]
    ids += list(range(len(ids) % 7, inner.vocab_size, 3))[:300]  # arbitrary ids too (partial bytes)
    counting = CountingTokenizer(inner)
    stream = TextStream(counting)
    out = "".join(stream.push(token)[0] for token in ids) + stream.flush()
    assert len(ids) > 500
    assert out == inner.decode(ids, skip_special_tokens=True)
    # Each token decodes a window of recent ids, not the whole output so far (O(1) per token).
    typical = sorted(counting.lengths)[len(counting.lengths) * 9 // 10]
    assert typical <= 2 * TextStream.WINDOW
