"""Usage errors and bad values through the real CLI: Typer's one-line message, the usage hint,
exit status 2, no traceback; every numeric option refuses what llmrun.options refuses."""

import math

import pytest

from llmrun.options import RULES, SEED_MAX, problem
from tests.cli.helpers import assert_usage_error, run_cli

MISSING_MODEL = "no-such-model-anywhere"  # a usage error must win before any resolving


@pytest.mark.parametrize("args,fragment", [
    (["foo"], "No such command 'foo'"),
    (["runn", "smollm2"], "No such command 'runn'"),
    (["run", MISSING_MODEL, "--bogus-flag", "hi"], "No such option: --bogus-flag"),
    (["plan", "--gpu", "6GB"], "No such option: --gpu"),
    (["models", "extra"], "unexpected extra argument"),
    (["run"], "Missing argument 'MODEL'"),
    (["pull"], "Missing argument"),
    (["import"], "Missing argument"),
    (["run", MISSING_MODEL, "-n", "abc", "hi"], "'-n' / '--max-tokens'"),
    (["chat", MISSING_MODEL, "--top-k", "2.5"], "'--top-k'"),
    (["plan", MISSING_MODEL, "--ctx", "lots"], "'--ctx'"),
    (["bench", MISSING_MODEL, "--reps", "x"], "'--reps'"),
    (["run", MISSING_MODEL, "hi", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["plan", MISSING_MODEL, "--gpu-mem", "banana"], "invalid size 'banana'"),
    (["chat", MISSING_MODEL, "--cpu-mem", "-4GB"], "invalid size '-4GB'"),
    (["bench", MISSING_MODEL, "--cpu-mem", "6"], "use a number with a unit"),
])
def test_usage_errors_are_one_line_with_the_usage_hint_and_exit_2(tmp_path, args, fragment):
    assert_usage_error(run_cli(args, tmp_path), fragment)


def test_an_option_missing_its_value_is_one_line_and_exit_2(tmp_path):
    assert_usage_error(run_cli(["run", MISSING_MODEL, "hi", "-n"], tmp_path), "'-n' requires an argument",
                       hint=False)


# Each checked option, with values its rule refuses: not finite, below, above, not an integer.
BAD_VALUES = {
    ("-t", "temperature"): ["nan", "inf", "-inf", "-0.5"],
    ("--top-k", "top_k"): ["-1"],
    ("--top-p", "top_p"): ["2", "-0.1", "nan", "inf"],
    ("--min-p", "min_p"): ["-1", "1.5", "nan"],
    ("--repeat-penalty", "repetition_penalty"): ["0", "-1", "inf", "nan"],
    ("--seed", "seed"): ["-1", str(SEED_MAX + 1), str(2**70)],
    ("-n", "max_new_tokens"): ["0", "-5"],
}


@pytest.mark.parametrize("command", ["run", "chat"])
@pytest.mark.parametrize("option,key,value", [(o, k, v) for (o, k), vs in BAD_VALUES.items() for v in vs])
def test_sampling_values_outside_their_range_are_refused_before_any_loading(tmp_path, command, option, key,
                                                                             value):
    args = [command, MISSING_MODEL, option, value]  # an option always takes the next word as its value
    if command == "run":
        args.append("hi")
    proc = run_cli(args, tmp_path)
    assert_usage_error(proc, f"must be {'an integer' if RULES[key].integer else 'a number'}")
    assert option in proc.stderr


@pytest.mark.parametrize("command,option,value", [
    ("plan", "--batch", "0"), ("run", "--batch", "-2"),
    ("bench", "--new-tokens", "0"), ("bench", "--reps", "0"), ("bench", "--batch", "0"),
])
def test_counts_below_one_are_refused(tmp_path, command, option, value):
    args = [command, MISSING_MODEL, f"{option}={value}"] + (["hi"] if command == "run" else [])
    assert_usage_error(run_cli(args, tmp_path), "must be an integer >= 1")


def test_a_context_below_two_tokens_is_refused(tmp_path):
    for value in ("0", "1", "-3"):
        assert_usage_error(run_cli(["plan", MISSING_MODEL, "--ctx", value], tmp_path), "must be an integer >= 2")


def test_the_rules_refuse_every_non_finite_value_and_accept_the_defaults():
    for key, rule in RULES.items():
        if not rule.integer:
            for value in (math.nan, math.inf, -math.inf):
                assert problem(key, value), (key, value)
    defaults = dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0,
                    seed=SEED_MAX, max_new_tokens=512, ctx=4096, batch=1, reps=3, new_tokens=128)
    for key, value in defaults.items():
        assert problem(key, value) is None, key
    assert problem("top_k", 2.5) and problem("seed", True)


def test_version_and_bare_command(tmp_path):
    from llmrun import __version__

    version = run_cli(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"llmrun {__version__}"
    bare = run_cli([], tmp_path)
    assert bare.returncode in (0, 2) and "Traceback" not in bare.stderr
    assert "Commands:" in bare.stdout + bare.stderr


def test_flags_are_shown_without_a_value(tmp_path):
    proc = run_cli(["run", "--help"], tmp_path)
    assert proc.returncode == 0
    assert "<bool>" not in proc.stdout
    for flag in ("--json", "--raw", "--each-line", "--quiet"):
        line = next(line for line in proc.stdout.splitlines() if flag in line)
        after = line.split(flag, 1)[1]
        assert not after.startswith(" <") and not after.startswith(" BOOL"), line
