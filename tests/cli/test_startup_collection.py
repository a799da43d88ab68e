"""The console entry point starts with the garbage collector paused and turns it back on, with
start-up's objects frozen, once the model is loaded (startup.py; start-up time, issue 14). Each case
runs in its own interpreter: freezing objects in the test process would keep them forever."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

THROUGH_THE_ENTRY_POINT = """
import gc, sys
import llmrun.runtime as runtime
seen = {}
present = runtime.present_or_pulled
def watched_present(name):
    seen["resolving"] = (gc.isenabled(), gc.get_freeze_count())
    return present(name)
runtime.present_or_pulled = watched_present
import llmrun.oneshot as oneshot
generate = oneshot.generate_one
def watched_generate(*args, **kwargs):
    seen["generating"] = (gc.isenabled(), gc.get_freeze_count())
    return generate(*args, **kwargs)
oneshot.generate_one = watched_generate
import atexit
atexit.register(lambda: print("SEEN:" + repr(seen), file=sys.stderr))
sys.argv = ["llmrun", "run", "smollm2", "hi", "-t", "0", "-n", "2"]
from llmrun.launch import entry
entry()
"""


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env),
                          stdin=subprocess.DEVNULL)


def test_a_run_loads_with_collection_paused_and_generates_with_it_back_on(smollm2_home):
    proc = run_python(THROUGH_THE_ENTRY_POINT, LLMRUN_HOME=str(smollm2_home))
    assert proc.returncode == 0, proc.stderr
    seen = eval(proc.stderr.strip().splitlines()[-1].removeprefix("SEEN:"))
    assert seen["resolving"] == (False, 0)
    enabled, frozen = seen["generating"]
    assert enabled and frozen > 10_000  # torch's and the model's objects, out of every later pass


UNITS = """
import gc, sys, time
import llmrun.startup as startup
case = sys.argv[1]
if case == "untouched":  # never paused here: resume changes nothing
    gc.disable()
    startup.resume_collection()
    print(gc.isenabled(), gc.get_freeze_count())
elif case == "paused":
    startup.pause_collection()
    paused = (gc.isenabled(), startup.collection_paused())
    startup.resume_collection()
    print(paused, gc.isenabled(), gc.get_freeze_count() > 0, startup.collection_paused())
elif case == "timer":  # a command that never loads a model gets collection back anyway
    startup.RESUME_AFTER_S = 0.2
    startup.pause_collection()
    before = gc.isenabled()
    time.sleep(1.0)
    print(before, gc.isenabled())
"""


def test_resuming_without_a_pause_leaves_the_collector_as_it_was():
    assert run_python(UNITS.replace("sys.argv[1]", "'untouched'")).stdout.split() == ["False", "0"]


def test_pause_then_resume_freezes_and_turns_collection_back_on():
    out = run_python(UNITS.replace("sys.argv[1]", "'paused'")).stdout.strip()
    assert out == "(False, True) True True False"


def test_collection_comes_back_after_the_safety_delay_without_a_model():
    assert run_python(UNITS.replace("sys.argv[1]", "'timer'")).stdout.split() == ["False", "True"]
