"""Slash commands: parsing input into a Command or user text, /set names and values, the help."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Union

from llmrun.errors import UsageError
from llmrun.options import parse_value

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


@dataclass(frozen=True)
class Settable:
    """A /set name: the SamplingParams field it changes, and its "off" spellings (words, and a number
    such as top_k's 0) that mean None, as on the command line."""

    field: str
    off_words: tuple[str, ...] = ()
    off_number: Optional[float] = None

    def parse(self, name: str, text: str):
        """The value `text` stands for, checked by options.RULES as the command-line options are."""
        if text.lower() in self.off_words:
            return None
        value = parse_value(self.field, text, name)
        return None if self.off_number is not None and value == self.off_number else value


OFF = ("off", "none")
SETTABLE = {
    "temperature": Settable("temperature"),
    "top_k": Settable("top_k", OFF, 0),
    "top_p": Settable("top_p"),
    "min_p": Settable("min_p", OFF, 0),
    "repeat_penalty": Settable("repetition_penalty"),
    "max_tokens": Settable("max_new_tokens"),
    "seed": Settable("seed", ("none", "random", "off")),
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
    settable = SETTABLE[name]
    value = settable.parse(name, text)
    return (dataclasses.replace(params, **{settable.field: value}),
            f"{name} = {'off' if value is None else value}")


def settings_rows(params) -> list[tuple[str, str]]:
    """The current sampling options under their /set names."""
    rows = []
    for name, settable in SETTABLE.items():
        value = getattr(params, settable.field)
        rows.append((name, "off" if value is None else str(value)))
    if params.stop:
        rows.append(("stop", ", ".join(repr(s) for s in params.stop)))
    return rows
