"""Slash-command parsing and /set: pure functions over text and SamplingParams."""

import re

import pytest

from llmrun.chat.commands import COMMANDS, Command, apply_set, help_rows, parse_input, settings_rows
from llmrun.engine.sampler import SamplingParams
from llmrun.errors import UsageError


@pytest.mark.parametrize("text, expected", [
    ("/help", Command("help")),
    ("  /HELP  ", Command("help")),
    ("/?", Command("help")),
    ("/quit", Command("exit")),
    ("/exit", Command("exit")),
    ("/reset", Command("reset")),
    ("/system   Answer in French.  ", Command("system", "Answer in French.")),
    ("/system\nline one\nline two", Command("system", "line one\nline two")),
    ("/set temperature 0.2", Command("set", "temperature 0.2")),
    ("/set", Command("set")),
    ("/save ~/chat.json", Command("save", "~/chat.json")),
    ("/load chat.json", Command("load", "chat.json")),
    ("/stats", Command("stats")),
])
def test_commands_parse(text, expected):
    assert parse_input(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("hello /help", "hello /help"),
    ("What is 1/2?", "What is 1/2?"),
    ("//etc/hosts is a file", "/etc/hosts is a file"),
    ("  indented text", "  indented text"),
])
def test_other_input_is_text_to_send(text, expected):
    assert parse_input(text) == expected


def test_unknown_commands_get_a_helpful_line():
    with pytest.raises(UsageError, match=r"unknown command /frobnicate: /help lists the commands.*//"):
        parse_input("/frobnicate now")


@pytest.mark.parametrize("name", ["save", "load"])
def test_file_commands_need_a_file(name):
    with pytest.raises(UsageError, match=f"usage: /{name} FILE"):
        parse_input(f"/{name}")


@pytest.mark.parametrize("argument, field, value", [
    ("temperature 0.2", "temperature", 0.2),
    ("temp 0", "temperature", 0.0),
    ("top_k 5", "top_k", 5),
    ("top-k 0", "top_k", None),
    ("top_p 0.5", "top_p", 0.5),
    ("min_p 0", "min_p", None),
    ("min-p 0.1", "min_p", 0.1),
    ("repeat_penalty 1.3", "repetition_penalty", 1.3),
    ("max_tokens 64", "max_new_tokens", 64),
    ("n 7", "max_new_tokens", 7),
    ("seed 42", "seed", 42),
    ("seed random", "seed", None),
])
def test_set_changes_one_sampling_option(argument, field, value):
    before = SamplingParams(seed=1)
    after, change = apply_set(before, argument)
    assert getattr(after, field) == value
    unchanged = {f: getattr(before, f) for f in before.__dataclass_fields__ if f != field}
    assert {f: getattr(after, f) for f in unchanged} == unchanged
    assert "=" in change


@pytest.mark.parametrize("argument, message", [
    ("temperature", "usage: /set NAME VALUE"),
    ("warmth 3", "cannot /set warmth: choose one of temperature"),
    ("temperature hot", "temperature must be a number >= 0, got 'hot'"),
    ("temperature -1", "temperature must be a number >= 0, got -1.0"),
    ("temperature nan", "temperature must be a number >= 0, got nan"),
    ("temp inf", "temperature must be a number >= 0, got inf"),
    ("temperature 1e400", "temperature must be a number >= 0, got inf"),
    ("top_p 2", "top_p must be a number from 0 to 1, got 2.0"),
    ("top-p nan", "top_p must be a number from 0 to 1, got nan"),
    ("min_p -0.5", "min_p must be a number from 0 to 1"),
    ("top_k 2.5", "top_k must be an integer >= 0, got '2.5'"),
    ("top_k -3", "top_k must be an integer >= 0, got -3"),
    ("repeat_penalty 0", "repeat_penalty must be a number > 0, got 0.0"),
    ("max_tokens 0", "max_tokens must be an integer >= 1, got 0"),
    ("n 1.5", "max_tokens must be an integer >= 1, got '1.5'"),
    (f"seed {2**70}", f"seed must be an integer from 0 to {2**64 - 1}, got {2**70}"),
    ("seed -1", "seed must be an integer from 0 to"),
    ("seed 2**70", "seed must be an integer from 0 to"),
])
def test_bad_set_values_are_usage_errors(argument, message):
    """/set checks values by the rules the command-line options use, under its own names."""
    with pytest.raises(UsageError, match=re.escape(message)):
        apply_set(SamplingParams(), argument)


@pytest.mark.parametrize("argument, field", [
    ("top_k off", "top_k"), ("top_k NONE", "top_k"), ("min_p none", "min_p"), ("min_p 0.0", "min_p"),
    ("seed off", "seed"), ("seed none", "seed"),
])
def test_off_spellings_turn_an_option_off(argument, field):
    after, change = apply_set(SamplingParams(top_k=5, min_p=0.1, seed=3), argument)
    assert getattr(after, field) is None and change.endswith("= off")


def test_help_lists_every_command_and_the_input_rules():
    text = "\n".join(f"{a} {b}" for a, b in help_rows())
    for name in COMMANDS:
        assert f"/{name}" in text
    assert '"""' in text and "\\" in text and "temperature" in text


def test_settings_show_current_values_under_their_set_names():
    rows = dict(settings_rows(SamplingParams(temperature=0.3, top_k=None, max_new_tokens=9)))
    assert rows["temperature"] == "0.3" and rows["top_k"] == "off" and rows["max_tokens"] == "9"
