"""Slash commands: parsing input into a Command or user text, /set names and values, the help."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

from llmrun.errors import UsageError

# name -> (argument shown in /help, what it does)
COMMANDS = {
    "help": ("", "show this help"),
    "set": ("[NAME VALUE]", "change a sampling option (no arguments: show them all)"),
    "system": ("[TEXT]", "replace the system prompt (no text: show it)"),
    "reset": ("", "forget the conversation (keeps the system prompt)"),
    "save": ("FILE", "save the conversation as JSON"),
    "load": ("FILE", "load a conversation saved with /save"),
    "stats": ("", "tokens, cache use and speed so far"),
    "exit": ("", "leave (also /quit, Ctrl-D, Ctrl-C at an empty prompt)"),
}
ALIASES = {"quit": "exit", "bye": "exit", "?": "help", "clear": "reset"}
NEEDS_ARGUMENT = ("save", "load")


@dataclass(frozen=True)
class Command:
    name: str           # a key of COMMANDS
    argument: str = ""  # the rest of the input, stripped (may span lines)


def parse_input(text: str) -> Union[Command, str]:
    """A slash command, or the text to send; a leading `//` sends a line that starts with `/`."""
    stripped = text.strip()
    if stripped.startswith("//"):
        return stripped[1:]
    if not stripped.startswith("/"):
        return text
    word, argument = re.match(r"/(\S*)\s*(.*)", stripped, re.DOTALL).groups()
    name = ALIASES.get(word.lower(), word.lower())
    if name not in COMMANDS:
        raise UsageError(f"unknown command /{word}: /help lists the commands "
                         f"(start with // to send a message that begins with /)")
    argument = argument.strip()
    if name in NEEDS_ARGUMENT and not argument:
        raise UsageError(f"usage: /{name} {COMMANDS[name][0]}")
    return Command(name, argument)


def help_rows() -> list[tuple[str, str]]:
    rows = [(f"/{name} {arg}".rstrip(), text) for name, (arg, text) in COMMANDS.items()]
    rows.append(("/set NAME VALUE", "names: " + ", ".join(SETTABLE)))
    rows.append(('a line ending in \\', "continues on the next line"))
    rows.append(('"""', 'starts a block of lines, closed by """'))
    rows.append(("Ctrl-C", "stops a reply; at an empty prompt, leaves"))
    return rows


def _number(kind: Callable, off: Optional[float] = None):
    """A parser for one option: `kind` of the text; `off` (e.g. 0 for top_k) means None."""

    def parse(text: str):
        if off is not None and text.lower() in ("off", "none"):
            return None
        value = kind(text)
        return None if off is not None and value == off else value

    return parse


def _seed(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "random", "off") else int(text)


# /set name -> (SamplingParams field, parser). Off values mirror the command-line options.
SETTABLE = {
    "temperature": ("temperature", _number(float)),
    "top_k": ("top_k", _number(int, off=0)),
    "top_p": ("top_p", _number(float)),
    "min_p": ("min_p", _number(float, off=0.0)),
    "repeat_penalty": ("repetition_penalty", _number(float)),
    "max_tokens": ("max_new_tokens", _number(int)),
    "seed": ("seed", _seed),
}
SET_ALIASES = {"temp": "temperature", "t": "temperature", "n": "max_tokens",
               "repetition_penalty": "repeat_penalty"}


def apply_set(params, argument: str):
    """`/set NAME VALUE` applied to frozen SamplingParams: returns (new params, "name = value")."""
    parts = argument.split()
    if len(parts) != 2:
        raise UsageError("usage: /set NAME VALUE, e.g. /set temperature 0.2 (names: "
                         + ", ".join(SETTABLE) + ")")
    raw_name, text = parts
    name = raw_name.lower().replace("-", "_")
    name = SET_ALIASES.get(name, name)
    if name not in SETTABLE:
        raise UsageError(f"cannot /set {raw_name}: choose one of " + ", ".join(SETTABLE))
    field, parse = SETTABLE[name]
    try:
        value = parse(text)
    except ValueError:
        raise UsageError(f"{name} needs a number, got {text!r}") from None
    return dataclasses.replace(params, **{field: value}), f"{name} = {'off' if value is None else value}"


def settings_rows(params) -> list[tuple[str, str]]:
    """The current sampling options under their /set names."""
    rows = []
    for name, (field, _) in SETTABLE.items():
        value = getattr(params, field)
        rows.append((name, "off" if value is None else str(value)))
    if params.stop:
        rows.append(("stop", ", ".join(repr(s) for s in params.stop)))
    return rows
