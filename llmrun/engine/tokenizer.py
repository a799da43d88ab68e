"""The model's tokenizer: tokenizer.json through `tokenizers`, set up as transformers' fast tokenizer sets it up.

Where transformers would build something else (a model-specific tokenizer class that rebuilds the
pipeline, remote code, legacy special-token files), `load_tokenizer` hands the folder to
transformers' AutoTokenizer instead, behind the same interface, so tokens never differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from llmrun.engine.chat_template import render_chat
from llmrun.errors import InvalidModelError, StorageError, UsageError
from llmrun.paths import cache_dir
from llmrun.storage import atomic_write_bytes

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config classes that AutoTokenizer loads as its plain tokenizers backend.
GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# Model types (of the registry's families) whose own tokenizer class AutoTokenizer uses even where
# tokenizer_config names a generic class; that class rebuilds the pipeline from the vocabulary.
OWN_CLASS_MODEL_TYPES = frozenset({"qwen2"})


class Tokenizer:
    """encode / decode / render_chat over a `tokenizers.Tokenizer`, with transformers' special tokens."""

    def __init__(self, backend, special_tokens: Mapping[str, str], chat_template, clean_up_spaces: bool):
        self.backend = backend
        self.special_tokens = dict(special_tokens)  # bos_token, eos_token, ... as the template sees them
        self.chat_template = chat_template  # a string, a dict of named templates, or None
        self._clean_up_spaces = clean_up_spaces

    def token_id(self, name: str) -> Optional[int]:
        """The id of a named special token (`eos_token`, ...); the unknown token's id where it has none."""
        token = self.special_tokens.get(name)
        if token is None:
            return None
        index = self.backend.token_to_id(token)
        if index is None and name != "unk_token":
            return self.token_id("unk_token")
        return index

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.token_id("eos_token")

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.token_id("pad_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._clean_up_spaces else text

    def render_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        return render_chat(self.template_source(), messages, self.special_tokens, add_generation_prompt)

    def template_source(self) -> str:
        """The chat template to render: the only one, or the one named "default"."""
        template = self.chat_template
        if isinstance(template, dict):
            if "default" not in template:
                raise InvalidModelError(f"the model has chat templates {sorted(template)} but none named default")
            template = template["default"]
        if not template:
            raise InvalidModelError("the model has no chat template")
        return template


class TransformersTokenizer:
    """The same interface over transformers' AutoTokenizer, for the folders llmrun does not set up itself."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.chat_template = hf_tokenizer.chat_template
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.pad_token_id = hf_tokenizer.pad_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self.hf.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                               tokenize=False)
        except jinja2.exceptions.TemplateError as err:
            raise UsageError(f"the model's chat template rejected the conversation: {err}") from err


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: spaces before punctuation and English contractions go."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def load_tokenizer(folder: Path) -> Union[Tokenizer, TransformersTokenizer]:
    """The tokenizer of a model folder (see the module docstring for which route it takes)."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    if not _plain_fast_tokenizer(folder, config):
        return _load_with_transformers(folder)
    try:
        backend, special = _build_backend(folder / "tokenizer.json", config)
    except Exception as err:  # the Rust side raises plain Exceptions for unreadable files
        raise InvalidModelError(f"cannot load the tokenizer in {folder}: {str(err).splitlines()[0]}") from err
    clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
        type(backend.model).__name__ != "BPE"
        or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
    return Tokenizer(backend, {k: str(v) for k, v in special.items()}, _chat_template(folder, config), clean_up)


def _plain_fast_tokenizer(folder: Path, config: dict) -> bool:
    """Whether AutoTokenizer would load this folder as its plain backend over tokenizer.json, with
    nothing llmrun does not reproduce."""
    legacy_files = not config.get("added_tokens_decoder") and any(
        (folder / name).is_file() for name in ("special_tokens_map.json", "added_tokens.json"))
    model_specific = any(key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS for key in config)
    model_type = _read_json(folder / "config.json").get("model_type")
    return ((folder / "tokenizer.json").is_file() and config.get("tokenizer_class") in GENERIC_CLASSES
            and model_type not in OWN_CLASS_MODEL_TYPES and not legacy_files and not model_specific
            and not isinstance(config.get("extra_special_tokens"), dict)
            and not any(config.get(key) for key in ("auto_map", "fix_mistral_regex", "model_specific_special_tokens")))


def _build_backend(path: Path, config: dict):
    """tokenizer.json with the special tokens transformers' TokenizersBackend adds on loading (the same
    calls in the same order), no truncation or padding; returns it and the named special tokens.

    The result is kept, serialized, in the cache folder (keyed by the file, its size and time, the
    tokenizer config, the tokenizers version and this module's source; one entry per tokenizer file,
    a newer one replacing it): re-adding the special tokens costs more than reading the finished
    tokenizer back."""
    from tokenizers import Tokenizer as Backend

    cache_file = None
    try:
        cache_file = _cache_file(path, config)
        kept = json.loads(cache_file.read_text(encoding="utf-8"))
        backend = Backend.from_str(kept["backend"])
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        return backend, {str(k): str(v) for k, v in kept["named"].items()}
    except Exception:  # absent, damaged, unreadable (tokenizers raises plain Exceptions): build it
        pass
    backend, named = _build_backend_now(path, config)
    if cache_file is None:
        return backend, named
    try:
        text = json.dumps({"backend": backend.to_str(), "named": {k: str(v) for k, v in named.items()}})
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, text.encode("utf-8"))
        _drop_stale(cache_file)
    except (OSError, StorageError):  # a read-only cache folder: built again next time
        pass
    return backend, named


def _cache_file(path: Path, config: dict) -> Path:
    import hashlib

    import tokenizers

    stat = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    digest = hashlib.sha256()
    for part in (str(stat.st_size), str(stat.st_mtime_ns), tokenizers.__version__,
                 json.dumps(config, sort_keys=True, default=str)):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(Path(__file__).read_bytes())
    return cache_dir() / "tokenizers" / f"{where}-{digest.hexdigest()[:16]}.json"


def _drop_stale(kept: Path) -> None:
    """Once `kept` is written, the entries it replaces go: the same tokenizer file's older ones (its
    files, config, or llmrun since changed) and any of the unkeyed form before (never read again)."""
    where = kept.name.split("-", 1)[0]
    for entry in kept.parent.glob("*.json"):
        stale = entry.name.startswith(where + "-") or "-" not in entry.name
        if stale and entry != kept:
            entry.unlink(missing_ok=True)


def _build_backend_now(path: Path, config: dict):
    from tokenizers import AddedToken, Tokenizer as Backend, processors

    backend = Backend.from_file(str(path))
    backend.no_truncation()
    backend.no_padding()

    def as_token(value):
        if isinstance(value, dict):
            return AddedToken(**{k: v for k, v in value.items() if k != "__type"})
        return value

    if config.get("added_tokens_decoder"):
        listed = {int(i): as_token(t) for i, t in config["added_tokens_decoder"].items()}
    else:
        listed = {entry["id"]: AddedToken(**{k: v for k, v in entry.items() if k != "id"})
                  for entry in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])}
    by_text = {str(token): token for token in listed.values()}
    named = {key: by_text.get(str(as_token(config[key])), as_token(config[key]))
             for key in NAMED_SPECIAL_TOKENS if config.get(key) is not None}
    extra = [as_token(t) for t in (config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])]
    # As TokenizersBackend.__init__ (its check against the loaded added tokens compares ids with
    # tokens, so every listed token is added again) ...
    to_add = [token for _, token in sorted(listed.items())]
    known = [str(t) for t in backend.get_added_tokens_decoder().values()] + [str(t) for t in to_add]
    for token in [*named.values(), *extra]:
        if str(token) not in known and token not in to_add:
            to_add.append(token)
    named_texts = {str(t) for t in named.values()}
    to_add = [AddedToken(t, special=True) if isinstance(t, str) else t for t in to_add]
    for token in to_add:
        if not token.special and str(token) in named_texts:
            token.special = True
    if to_add:
        backend.add_tokens(to_add)
    if backend.post_processor is None:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    # ... then its _post_init: the named and extra special tokens once more, as special tokens.
    backend.add_special_tokens([t if isinstance(t, AddedToken) else AddedToken(t, special=True, normalized=False)
                                for t in [*named.values(), *extra]])
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return backend, named


def _chat_template(folder: Path, config: dict):
    """chat_template.jinja and additional_chat_templates/*.jinja first, then tokenizer_config's entry."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in extra_dir.glob("*.jinja"):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if list(templates) == ["default"]:
        return templates["default"]
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, (list, tuple)):
        return {entry["name"]: entry["template"] for entry in template}
    return template


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise InvalidModelError(f"{path} is not valid JSON") from err


def _load_with_transformers(folder: Path) -> TransformersTokenizer:
    from transformers import AutoTokenizer

    try:
        return TransformersTokenizer(AutoTokenizer.from_pretrained(folder))
    except (OSError, ValueError, TypeError) as err:
        raise InvalidModelError(f"cannot load the tokenizer in {folder}: {str(err).splitlines()[0]}") from err
