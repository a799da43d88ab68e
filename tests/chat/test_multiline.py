"""Multi-line input: backslash continuation and \"\"\" blocks, fed one line at a time."""

import pytest

from llmrun.chat.multiline import InputAssembler


def feed_all(lines):
    assembler, done, pending = InputAssembler(), [], []
    for line in lines:
        text = assembler.feed(line)
        pending.append(assembler.pending)
        if text is not None:
            done.append(text)
    return done, pending


def test_a_plain_line_is_one_input():
    assert feed_all(["hello"]) == (["hello"], [False])


def test_backslash_continues_the_line():
    done, pending = feed_all(["first \\", "second\\", "third", "next"])
    assert done == ["first \nsecond\nthird", "next"]
    assert pending == [True, True, False, False]


def test_triple_quotes_open_a_block_until_closed():
    done, pending = feed_all(['"""', "def f():", "", "    return 1", '"""', "after"])
    assert done == ["def f():\n\n    return 1", "after"]
    assert pending == [True, True, True, True, False, False]


def test_block_text_may_start_and_end_on_the_fence_lines():
    assert feed_all(['"""Dear model,', "a backslash \\ inside", 'stays."""'])[0] == [
        "Dear model,\na backslash \\ inside\nstays."]
    assert feed_all(['"""one line"""'])[0] == ["one line"]


def test_flush_returns_an_unfinished_block_and_reset_forgets_it():
    assembler = InputAssembler()
    assert assembler.feed('"""') is None and assembler.feed("half") is None
    assert assembler.flush() == "half"
    assert assembler.flush() is None
    assembler.feed("x \\")
    assembler.reset()
    assert not assembler.pending and assembler.feed("y") == "y"


@pytest.mark.parametrize("line", ["hello\n", "hello\r\n"])
def test_newlines_are_stripped(line):
    assert InputAssembler().feed(line) == "hello"
