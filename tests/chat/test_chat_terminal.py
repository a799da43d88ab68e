"""`llmrun chat` at a real terminal (pexpect + pyte) with a tiny model: keys, history, rendering."""

import json
from pathlib import Path

from tests.chat.screen import PROMPT, Terminal
from tests.cli.helpers import cli_env


def open_chat(model, home, *options, rows=30, **env):
    environment = cli_env(home, TERM="xterm", **env)
    terminal = Terminal(["-m", "llmrun", "chat", model, "-t", "0", "--dtype", "float32", "-n", "6", *options],
                        environment, rows=rows, cwd=home)
    terminal.at_prompt()
    return terminal


def test_ctrl_c_clears_a_typed_line_and_at_an_empty_prompt_leaves(tiny_chat_model, tmp_path):
    terminal = open_chat(tiny_chat_model, tmp_path)
    terminal.child.send("half a thought")
    terminal.wait(lambda s: s.endswith(f"{PROMPT} half a thought"), what="the typed text")
    terminal.child.send("\x03")
    terminal.wait(lambda s: s.splitlines()[-2:] == [f"{PROMPT} half a thought", PROMPT], what="a fresh prompt")
    terminal.child.send("\x03")
    assert terminal.exit_status() == 0
    assert "Traceback" not in terminal.raw.decode(errors="replace")


def test_ctrl_d_leaves_and_history_comes_back_with_the_up_arrow(tiny_chat_model, tmp_path):
    terminal = open_chat(tiny_chat_model, tmp_path)
    assert "/help for commands" in terminal.text()
    reply = terminal.ask("Hello, how are you today?")
    assert "prefilled" in reply  # the stats line under the reply
    terminal.child.send("\x04")
    assert terminal.exit_status() == 0
    history = tmp_path / "llmrun-home" / "history"
    assert "Hello, how are you today?" in history.read_text()

    again = open_chat(tiny_chat_model, tmp_path)
    again.child.send("\x1b[A")  # the up arrow
    again.wait(lambda s: s.endswith(f"{PROMPT} Hello, how are you today?"), what="the recalled line")
    again.child.send("\r")
    again.at_prompt()
    again.send_line("/exit")
    assert again.exit_status() == 0


def test_an_unwritable_data_dir_costs_only_the_history(tiny_chat_model, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    terminal = open_chat(tiny_chat_model, tmp_path, LLMRUN_HOME=not_a_dir)
    assert "prefilled" in terminal.ask("Hello")
    terminal.send_line("/exit")
    assert terminal.exit_status() == 0


def test_multi_line_input_commands_and_their_errors(tiny_chat_model, tmp_path):
    terminal = open_chat(tiny_chat_model, tmp_path, rows=50)
    terminal.send_line('"""')
    terminal.wait(lambda s: s.splitlines()[-1] == "...", what="the continuation prompt")
    terminal.send_line("first line")
    terminal.send_line('second line"""')
    terminal.at_prompt()
    terminal.send_line("one \\")
    terminal.wait(lambda s: s.splitlines()[-1] == "...", what="the continuation prompt")
    terminal.send_line("two")
    terminal.wait(lambda s: s.splitlines()[-1] == PROMPT and "... two" in s, what="the reply to two")
    assert "unknown command /nope" in terminal.ask("/nope")
    assert "temperature = 0.5" in terminal.ask("/set temperature 0.5")
    help_text = terminal.ask("/help")
    assert all(f"/{name}" in help_text for name in ("set", "system", "reset", "save", "load", "stats", "exit"))
    stats = terminal.ask("/stats")
    assert "2 in the conversation" in stats and "temperature 0.5" in stats
    terminal.ask("/save chat.json")  # relative to the chat's working directory
    users = [m["content"] for m in json.loads((tmp_path / "chat.json").read_text())["messages"]
             if m["role"] == "user"]
    assert users == ["first line\nsecond line", "one \ntwo"]
    terminal.send_line("/quit")
    assert terminal.exit_status() == 0


MARKDOWN = """Here is a list:

- apples
- pears

1. first
2. second

```python
def greet():
    return "hello"
```

Done.
"""

RENDER_SCRIPT = """
import sys, time
from llmrun.display import ReplyView
text = sys.argv[1]
with ReplyView(live=True) as view:
    for i in range(0, len(text), 7):
        view.write(text[i:i + 7])
        time.sleep(0.005)
    time.sleep(float(sys.argv[2]))  # the live view, before the final render
print("END")
"""


def render(text, rows=30, hold_s=0.0):
    """Stream `text` through the chat's reply view in a real terminal, 7 characters at a time."""
    env = {"TERM": "xterm", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    terminal = Terminal(["-c", RENDER_SCRIPT, text, hold_s], env, rows=rows)
    return terminal


def live_screen(terminal, last_words):
    """The screen while the reply is still live: streamed to the end, not yet finally rendered."""
    return terminal.wait(lambda s: last_words in s and "END" not in s, timeout=60, what="the live view")


def test_a_reply_renders_as_markdown_lists_and_code():
    terminal = render(MARKDOWN, hold_s=1.0)
    live = live_screen(terminal, "Done.")
    assert terminal.screen.cursor.y <= len(live.splitlines()) + 1  # no blank padding below it
    terminal.wait(lambda s: "END" in s, timeout=60, what="the final render")
    lines = terminal.text().splitlines()
    assert "```" not in terminal.text()  # fences are rendered, not shown
    for item in (" • apples", " • pears", " 1 first", " 2 second", " def greet():", '     return "hello"'):
        assert item in lines, lines
    row = lines.index(" def greet():")
    keyword = terminal.screen.buffer[row][1]
    assert keyword.data == "d" and keyword.bg != "default"  # a highlighted code block


def test_a_reply_taller_than_the_screen_shows_its_tail_and_leaves_no_copies():
    long_text = "\n\n".join(f"Paragraph number {i} of the reply." for i in range(40))
    terminal = render(long_text, rows=12, hold_s=1.0)
    live = live_screen(terminal, "Paragraph number 39 of the reply.")
    assert "Paragraph number 30 of the reply." not in live  # the tail is what shows while it streams
    terminal.wait(lambda s: "END" in s, timeout=60, what="the final render")
    everything = terminal.all_text()
    for i in range(40):
        assert everything.count(f"Paragraph number {i} of the reply.") == 1, everything
