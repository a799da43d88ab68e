"""The acceptance run: `llmrun chat smollm2` in a real terminal, asserting on what the screen shows."""

import json

import pytest

from tests.chat.screen import PROMPT, Terminal
from tests.cli.helpers import cli_env


@pytest.mark.slow
def test_a_conversation_at_the_terminal(smollm2_home, tmp_path):
    home = tmp_path / "home"  # its own history file; the store is the shared, converted SmolLM2
    home.mkdir()
    (home / "models").symlink_to(smollm2_home / "models")
    env = cli_env(tmp_path, LLMRUN_HOME=home, TERM="xterm")
    terminal = Terminal(["-m", "llmrun", "chat", "smollm2", "-t", "0", "--dtype", "float32"], env,
                        rows=50, cols=100, cwd=tmp_path)
    terminal.wait(lambda s: s.splitlines()[-1:] == [PROMPT], timeout=300, what="the first prompt")
    assert "smollm2, context 4096 tokens" in terminal.text()

    # Two turns; the second only makes sense with the first ("it" is the word banana).
    first = terminal.ask("Say the word banana.")
    assert "banana" in first.lower()
    second = terminal.ask("Say it again.")
    assert "banana" in second.lower()
    stats_line = [line for line in second.splitlines() if "prefilled" in line]
    assert stats_line and ", 0 reused" not in stats_line[0]  # the KV cache at work

    stats = terminal.ask("/stats")
    assert "2 in the conversation" in stats and "reused from the cache" in stats
    assert "temperature = 0.0" in terminal.ask("/set temperature 0")

    # Ctrl-C stops a long reply once it has begun; the prompt comes back.
    terminal.send_line("Write a long story about a dragon.")
    echoed = f"{PROMPT} Write a long story about a dragon."
    terminal.wait(lambda s: echoed in s and len(s.split(echoed)[-1].split()) >= 4, what="the story to begin")
    terminal.child.send("\x03")
    story = terminal.wait(lambda s: s.splitlines()[-1] == PROMPT and "[interrupted]" in s.split(echoed)[-1],
                          what="the interrupted story").split(echoed)[-1]
    assert [line for line in story.splitlines() if "prefilled" in line][-1].endswith("interrupted")

    # The chat goes on, and knows the conversation so far.
    after = terminal.ask("Say the word banana.")
    assert "banana" in after.lower() and "[interrupted]" not in after

    assert "saved 4 turns to chat.json" in terminal.ask("/save chat.json")
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    told = messages[5]
    assert told["role"] == "assistant" and told.get("interrupted") is True and told["content"].strip()
    assert told["content"].split()[0] in story

    # Without the earlier turns, "it" means nothing: the banana came from the conversation.
    assert "conversation cleared" in terminal.ask("/reset")
    assert "banana" not in terminal.ask("Say it again.").lower()

    terminal.send_line("/exit")
    assert terminal.exit_status() == 0
    assert "Say the word banana." in (home / "history").read_text()
