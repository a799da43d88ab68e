"""llmrun's tokenizer and chat templates against transformers' AutoTokenizer, on real tokenizer files."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from llmrun.engine.tokenizer import OWN_CLASS_MODEL_TYPES, Tokenizer, TransformersTokenizer, load_tokenizer
from llmrun.errors import InvalidModelError, UsageError
from llmrun.model.registry import FAMILIES
from tests import checkpoints

TEXTS = [
    "", " ", "Hello  world", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\n  \r\n end",
    "héllo wörld ☃ 日本語 Ελληνικά 🎉👩‍👩‍👧 \u200b\u00a0nbsp", "numbers 0 1 12 123 1234 3.14159 -7",
    "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b<|im_end|>c", "<|im_start|><|im_start|>", "<|im_end",
    "spaces , before punctuation . and ' quotes ' don't isn't we're", "def f(x):\n    return x  # done\n",
    " " * 17 + "x" + "\n" * 5, "Mixed CASE and UPPER lower",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say ☃ <|im_end|> twice"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": " two  "},
     {"role": "user", "content": "three\n\nfour"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  "}],
]
FAMILY_CONFIGS = {"LlamaForCausalLM": "llama_config", "MistralForCausalLM": "mistral_config",
                  "Qwen2ForCausalLM": "qwen2_config", "Qwen3ForCausalLM": "qwen3_config",
                  "Phi3ForCausalLM": "phi3_config", "Gemma2ForCausalLM": "gemma2_config",
                  "Gemma3ForCausalLM": "gemma3_config"}


def tokenizer_folder(root, name, config=None):
    """A folder as the tests' checkpoints have it: config.json plus the tiny tokenizer."""
    folder = root / name
    folder.mkdir()
    if config is not None:
        config.save_pretrained(folder)
    checkpoints.save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {arch: tokenizer_folder(root, arch, getattr(checkpoints, builder)())
            for arch, builder in FAMILY_CONFIGS.items()}


def assert_same_as_transformers(folder, texts=TEXTS, conversations=CONVERSATIONS):
    """Checked twice: as built, and as read back from the tokenizer cache by the next load."""
    hf = AutoTokenizer.from_pretrained(folder)
    built, cached = load_tokenizer(folder), load_tokenizer(folder)
    for ours in (built, cached):
        assert_tokenizer_matches(hf, ours, texts, conversations)
    assert type(cached) is type(built) and getattr(cached, "special_tokens", None) == getattr(built, "special_tokens", None)
    return cached


def assert_tokenizer_matches(hf, ours, texts, conversations):
    for text in texts:
        for add_special_tokens in (True, False):
            ids = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert ours.encode(text, add_special_tokens=add_special_tokens) == ids, (text, add_special_tokens)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for ids in ([], list(range(0, min(len(hf), 400), 3)), list(range(len(hf) - 1, -1, -7))):
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for messages in conversations if hf.chat_template else ():
        for generation_prompt in (True, False):
            expected = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert ours.render_chat(messages, add_generation_prompt=generation_prompt) == expected
    assert (ours.eos_token_id, ours.pad_token_id, bool(ours.chat_template)) == (
        hf.eos_token_id, hf.pad_token_id, bool(hf.chat_template))


def test_smollm2_tokens_and_template_match_transformers(smollm2_dir):
    ours = assert_same_as_transformers(smollm2_dir)
    assert isinstance(ours, Tokenizer)  # the run path's own tokenizer, not the transformers fallback


@pytest.mark.parametrize("architecture", list(FAMILY_CONFIGS))
def test_each_family_checkpoint_tokenizer_matches_transformers(family_folders, architecture):
    ours = assert_same_as_transformers(family_folders[architecture])
    model_type = next(f.model_type for f in FAMILIES if f.architecture == architecture)
    # Qwen2's folders load as transformers' Qwen2Tokenizer, which rebuilds the pipeline: handed over.
    expected = TransformersTokenizer if model_type in OWN_CLASS_MODEL_TYPES else Tokenizer
    assert isinstance(ours, expected)


def test_own_class_model_types_are_those_transformers_forces():
    from transformers.models.auto.tokenization_auto import (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
                                                            TOKENIZER_MAPPING_NAMES)

    generic = (None, "TokenizersBackend", "PreTrainedTokenizerFast")
    forced = {f.model_type for f in FAMILIES if f.model_type in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
              and TOKENIZER_MAPPING_NAMES.get(f.model_type) not in generic}
    assert forced == set(OWN_CLASS_MODEL_TYPES)


def edit_tokenizer_config(folder, **changes):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_tokenizer_config_details_apply_as_in_transformers(tmp_path):
    """add_bos_token (ignored beside a tokenizer.json), a pad token the vocabulary lacks (added as
    special), extra special tokens, split_special_tokens, and BPE's clean-up switch."""
    for index, changes in enumerate([
        dict(add_bos_token=True, add_eos_token=True),
        dict(pad_token="<pad>", extra_special_tokens=["<tool>", "<|im_end|>"]),
        dict(split_special_tokens=True),
        dict(clean_up_tokenization_spaces=True),
        dict(bos_token={"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "normalized": False,
                        "rstrip": False, "single_word": False, "special": True}),
    ]):
        folder = tokenizer_folder(tmp_path, f"case{index}", checkpoints.llama_config())
        edit_tokenizer_config(folder, **changes)
        assert_same_as_transformers(folder, TEXTS + ["<pad> and <tool> here"])


def test_added_tokens_of_tokenizer_config_and_a_saved_truncation(tmp_path):
    """A plain added token listed only in tokenizer_config joins the vocabulary; truncation and
    padding saved in tokenizer.json do not apply to a prompt (transformers turns them off)."""
    folder = tokenizer_folder(tmp_path, "added", checkpoints.llama_config())
    backend = json.loads((folder / "tokenizer.json").read_text())
    listed = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in backend["added_tokens"]}
    listed["320"] = {"content": "<extra>", "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": False}
    edit_tokenizer_config(folder, added_tokens_decoder=listed)
    backend["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    backend["padding"] = {"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None,
                          "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (folder / "tokenizer.json").write_text(json.dumps(backend))
    ours = assert_same_as_transformers(folder, TEXTS + ["an <extra> token<extra>"])
    assert len(ours.encode("an <extra> token, long enough to be cut")) > 3


def test_templates_use_transformers_jinja_environment(tmp_path):
    """Loop controls, namespace, tojson without HTML escaping, dict(), {% generation %}, trim and
    lstrip of blocks, the special tokens as variables, strftime_now."""
    template = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}\n"
        "  {% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }}{{ dict(a=1) | tojson }}\n"
        "{% generation %}{{ m['content'] | trim }}{% endgeneration %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% endfor %}{{ eos_token }}{{ strftime_now('%Y') }}{% if add_generation_prompt %}>>{% endif %}"
    )
    folder = tokenizer_folder(tmp_path, "jinja", checkpoints.llama_config())
    edit_tokenizer_config(folder, chat_template=template)
    (folder / "chat_template.jinja").unlink()
    conversations = CONVERSATIONS + [[{"role": "user", "content": "<b>&'\"</b> ünï"}] * 4]
    assert_same_as_transformers(folder, conversations=conversations)


def test_a_template_that_raises_is_one_usage_error(tmp_path):
    folder = tokenizer_folder(tmp_path, "strict", checkpoints.llama_config())
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ messages[0]['content'] }}")
    ours = load_tokenizer(folder)
    assert ours.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(UsageError, match="rejected the conversation: System role not supported"):
        ours.render_chat([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}])


def test_unreadable_tokenizer_files_are_invalid_model_errors(tmp_path):
    folder = tokenizer_folder(tmp_path, "broken", checkpoints.llama_config())
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="cannot load the tokenizer"):
        load_tokenizer(folder)
    shutil.copy(folder / "config.json", folder / "tokenizer_config.json")
    (folder / "tokenizer_config.json").write_text("[")
    with pytest.raises(InvalidModelError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(folder)


def test_a_built_tokenizer_is_kept_and_read_back_until_its_files_change(tmp_path, monkeypatch):
    import llmrun.engine.tokenizer as module

    monkeypatch.setenv("LLMRUN_CACHE", str(tmp_path / "cache"))
    folder = tokenizer_folder(tmp_path, "tok", checkpoints.llama_config())
    first = load_tokenizer(folder)
    kept = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert len(kept) == 1

    def no_building(*args):
        raise AssertionError("built again although the cache holds it")
    monkeypatch.setattr(module, "_build_backend_now", no_building)
    again = load_tokenizer(folder)
    text = "<|im_start|>user\nhé ☃<|im_end|>"
    assert again.encode(text) == first.encode(text) and again.special_tokens == first.special_tokens
    monkeypatch.undo()
    monkeypatch.setenv("LLMRUN_CACHE", str(tmp_path / "cache"))

    kept[0].write_text("{damaged")  # a damaged entry is built again and rewritten
    assert load_tokenizer(folder).encode(text) == first.encode(text)
    assert json.loads(kept[0].read_text())["backend"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["split_special_tokens"] = True  # another config: another entry, another tokenizer
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    changed = load_tokenizer(folder)
    assert changed.encode(text) != first.encode(text)
    # one entry per tokenizer file: the new one replaced the old; another folder's entry stays
    assert [p.name for p in (tmp_path / "cache" / "tokenizers").glob("*.json")] != [kept[0].name]
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1
    other = load_tokenizer(tokenizer_folder(tmp_path, "other", checkpoints.llama_config()))
    assert other.encode(text) == first.encode(text)
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 2
    legacy = tmp_path / "cache" / "tokenizers" / ("0" * 32 + ".json")  # the unkeyed form of before
    legacy.write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": False}))
    load_tokenizer(folder)
    assert not legacy.exists() and len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 2


def test_an_unwritable_cache_still_loads_the_tokenizer(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("LLMRUN_CACHE", str(blocker))
    folder = tokenizer_folder(tmp_path, "tok", checkpoints.llama_config())
    assert load_tokenizer(folder).encode("hello") == AutoTokenizer.from_pretrained(folder)("hello")["input_ids"]
