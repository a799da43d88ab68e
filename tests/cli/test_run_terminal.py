"""`llmrun run` (and piped `chat`) at a real 80x24 terminal (pexpect + pyte): Ctrl-C during a live reply."""

import pytest

from tests.chat.screen import Terminal
from tests.cli.helpers import cli_env

# The prompt on a pipe, the terminal on stdout and stderr: `echo PROMPT | llmrun run ...`.
PIPED = ("import os, sys; r, w = os.pipe(); os.write(w, sys.argv[1].encode()); os.close(w); os.dup2(r, 0); "
         "os.execv(sys.executable, [sys.executable, '-m', 'llmrun', *sys.argv[2:]])")
PROMPT = "Write a long story about a cat"


@pytest.mark.slow
@pytest.mark.parametrize("command, prompt_on", [("run", "argument"), ("run", "pipe"), ("chat", "pipe")])
def test_ctrl_c_during_a_live_reply_leaves_it_once_where_it_belongs(smollm2_home, tmp_path, command, prompt_on):
    """Chat with piped input streams live to the terminal too, and a Ctrl-C there ends it (status 130)."""
    options = [command, "smollm2", "-n", "300", "-t", "0"]
    argv = (["-m", "llmrun", *options, PROMPT] if prompt_on == "argument"
            else ["-c", PIPED, PROMPT + "\n", *options])
    env = cli_env(tmp_path, LLMRUN_HOME=smollm2_home, TERM="xterm")
    terminal = Terminal(argv, env, rows=24, cols=80, cwd=tmp_path)
    shown = terminal.wait(lambda s: len(s.split()) >= 60, timeout=300, what="a few lines of the story")
    terminal.child.send("\x03")
    terminal.wait(lambda s: "llmrun: interrupted" in s, timeout=60, what="the interruption")
    assert terminal.exit_status() == 130

    screen = terminal.text().splitlines()
    assert terminal.all_text() == terminal.text()  # nothing scrolled away
    lines = [line for line in screen if line.strip()]
    assert lines[-1] == "llmrun: interrupted" and screen[-1] == lines[-1]
    story = lines[:-1]
    assert len(story) >= 3 and len(set(story)) == len(story), terminal.text()  # no line twice
    assert screen[0] == story[0]  # the reply starts on the first row, as it did while it streamed
    assert terminal.screen.cursor.y == len(screen)  # the shell's prompt would come on the next row
    assert "^C" not in terminal.text()
    words = " ".join(story).split()
    assert words[:len(shown.split()) - 1] == shown.split()[:-1]  # what was shown stays (its last word may grow)
