"""`llmrun chat` with piped stdin: one turn per line, only replies on stdout, no escape codes."""

import json
import re

from tests.cli.helpers import assert_one_line_error, run_cli

ESCAPE = re.compile(r"\x1b|\x9b")  # ESC or CSI: any ANSI control sequence starts with one


def chat(model, home, lines, *options, **env):
    """`llmrun chat [MODEL]` with `lines` piped in (model None: $LLMRUN_MODEL decides)."""
    return run_cli(["chat", *([model] if model else []), "-t", "0", "--dtype", "float32", *options], home,
                   stdin="".join(f"{line}\n" for line in lines), **env)


def replies_of(path):
    return [m for m in json.loads(path.read_text())["messages"] if m["role"] == "assistant"]


def test_piped_turns_give_one_plain_reply_each_on_stdout(tiny_chat_model, tmp_path):
    saved = tmp_path / "chat.json"
    lines = ["Hello, how are you today?", "", "The capital of France is Paris.", "/set max_tokens 6",
             "def main():", f"/save {saved}"]
    # FORCE_COLOR would make Rich colour a pipe: the piped mode must not use Rich on stdout at all.
    proc = chat(tiny_chat_model, tmp_path, lines, "-n", "12", FORCE_COLOR="1", TERM="xterm-256color")
    assert proc.returncode == 0, proc.stderr
    assert not ESCAPE.search(proc.stdout)
    replies = replies_of(saved)
    assert len(replies) == 3  # three non-empty, non-command lines: three turns
    assert proc.stdout == "\n".join(r["content"] + "\n" for r in replies)
    assert [len(r["content"]) > 0 for r in replies] == [True] * 3
    stats = [line for line in proc.stderr.splitlines() if "prefilled" in line]
    assert len(stats) == 3 and ", 0 reused" in stats[0] and ", 0 reused" not in stats[1]
    assert "max_tokens = 6" in proc.stderr and f"to {saved}" in proc.stderr
    assert len(proc.stderr.splitlines()) == 5 and not ESCAPE.search(proc.stderr)  # no progress bars


def test_a_tiny_context_drops_the_oldest_turns_with_a_notice_and_keeps_the_system(tiny_chat_model, tmp_path):
    saved = tmp_path / "chat.json"
    turns = ["Hello, how are you today?", "The capital of France is Paris.", "def main():",
             "Numbers: 1 2 3", "a b c d e f g", "The capital of Italy is Rome."]
    proc = chat(tiny_chat_model, tmp_path, [*turns, f"/save {saved}"], "--ctx", "96", "-n", "8", "-q",
                "--system", "You are terse.")
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if "outgrew the context" in line]
    assert notices and all("context (96 tokens)" in n and "kept the system prompt" in n for n in notices)
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0] == {"role": "system", "content": "You are terse."}
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert 1 <= len(users) < len(turns) and users == turns[-len(users):]
    assert proc.stdout.count("\n\n") >= len(turns) - 1  # still one reply per turn


def test_a_mistake_in_a_script_ends_it_with_one_line_and_status_1(tiny_chat_model, tmp_path):
    proc = chat(None, tmp_path, ["/frobnicate", "never sent"], LLMRUN_MODEL=tiny_chat_model)
    assert_one_line_error(proc, "unknown command /frobnicate")  # after the model named by $LLMRUN_MODEL loaded


def test_a_model_without_a_chat_template_is_refused(tiny_chat_model, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_chat_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in bare.glob("chat_template.j*"):
        extra.unlink()
    assert_one_line_error(chat(bare, tmp_path, ["hi"]), "no chat template")


def test_ctrl_c_ends_a_piped_chat_with_status_130(tiny_chat_model, tmp_path):
    import signal
    import subprocess
    import sys

    from tests.cli.helpers import cli_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "llmrun", "chat", str(tiny_chat_model), "-t", "0", "-n", "4"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(tmp_path),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's `&` ignores it
    proc.stdin.write(b"Hello\n")
    proc.stdin.flush()
    assert proc.stdout.readline()  # the first reply; now it waits for the next line
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.decode().splitlines()[-1] == "llmrun: interrupted"
