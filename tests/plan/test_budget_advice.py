"""Advice in a plan that does not fit (a shorter --ctx, a larger budget) holds when followed, and a
size needs its unit."""

import json
import re

import pytest

from llmrun.plan.model_sizes import ModelSizes
from llmrun.plan.placement import plan
from llmrun.plan.tiers import Budgets, PlanError, PlanOptions
from llmrun.sizes import parse_size
from tests.cli.helpers import assert_one_line_error, assert_usage_error, run_cli

MB = 1_000_000
_SUGGESTION = re.compile(r"with (--[a-z-]+ [^\s,]+(?: --[a-z-]+ [^\s,]+)*)")


def suggestions(message: str) -> list[dict]:
    """Each `with --opt VALUE [--opt VALUE]` in an error, as {option: value}."""
    found = []
    for match in _SUGGESTION.finditer(message):
        words = match.group(1).split()
        found.append(dict(zip(words[::2], words[1::2])))
    return found


def toy(layer=100 * MB, head=50 * MB, num_layers=8, kv_per_token=20_000):
    return ModelSizes(
        layer_bytes=(layer,) * num_layers, embed_bytes=head, lm_head_bytes=head, other_bytes=1000,
        tied_embeddings=False, kv_bytes_per_token=kv_per_token, hidden_size=64, intermediate_size=128,
        vocab_size=1000, num_attention_heads=4, max_context=8192, dtype_bytes=2,
    )


def follow(budgets: Budgets, options: PlanOptions, advice: dict):
    """Plan again with one suggestion applied; everything else as before."""
    gpu, cpu, ctx = budgets.gpu_bytes, budgets.cpu_bytes, options.ctx
    for option, value in advice.items():
        if option == "--ctx":
            ctx = int(value)
        elif option == "--gpu-mem":
            gpu = parse_size(value)
        elif option == "--cpu-mem":
            cpu = parse_size(value)
        else:
            raise AssertionError(f"unexpected advice {option}")
    return Budgets(gpu, cpu, budgets.disk_bytes), PlanOptions(ctx, options.dtype_bytes, options.batch,
                                                              options.block_size, gpu_runtime_bytes=100 * MB)


@pytest.mark.parametrize("gpu_mb", [None, 150, 300, 420, 600, 900])
@pytest.mark.parametrize("cpu_mb", [1, 90, 180, 260, 400, 2000])
@pytest.mark.parametrize("ctx,batch", [(8192, 1), (2048, 4), (16, 1)])
def test_every_suggestion_plans(gpu_mb, cpu_mb, ctx, batch):
    budgets = Budgets(gpu_mb and gpu_mb * MB, cpu_mb * MB, 10**12)
    options = PlanOptions(ctx, 2, batch, 16, gpu_runtime_bytes=100 * MB)
    try:
        plan(toy(), budgets, options)
        return
    except PlanError as err:
        message = str(err)
    advice = suggestions(message)
    assert advice, message
    budget_flag = "--gpu-mem" if gpu_mb else "--cpu-mem"
    assert any(set(a) == {budget_flag} for a in advice), message  # the budget for the ctx asked for
    for suggestion in advice:
        plan(toy(), *follow(budgets, options, suggestion))  # raises if the advice does not hold


def test_shorter_context_is_the_longest_that_fits():
    budgets, options = Budgets(None, 260 * MB), PlanOptions(8192, 2, 1, 16)
    with pytest.raises(PlanError) as err:
        plan(toy(), budgets, options)
    ctx = int(next(a["--ctx"] for a in suggestions(str(err.value)) if "--ctx" in a))
    plan(toy(), budgets, PlanOptions(ctx, 2, 1, 16))
    with pytest.raises(PlanError):  # the next round number does not
        plan(toy(), budgets, PlanOptions(ctx + 256, 2, 1, 16))


def test_larger_budget_is_the_smallest_that_fits():
    options = PlanOptions(4096, 2, 1, 16)
    with pytest.raises(PlanError) as err:
        plan(toy(), Budgets(None, 1 * MB), options)
    size = next(a["--cpu-mem"] for a in suggestions(str(err.value)) if set(a) == {"--cpu-mem"})
    plan(toy(), Budgets(None, parse_size(size)), options)
    with pytest.raises(PlanError):  # a megabyte less does not
        plan(toy(), Budgets(None, parse_size(size) - MB), options)


@pytest.mark.parametrize("option", ["--cpu-mem", "--gpu-mem"])
@pytest.mark.parametrize("value", ["6", "1.5", "200"])
def test_a_size_without_its_unit_is_refused(smollm2_home, tmp_path, option, value):
    proc = run_cli(["plan", "smollm2", option, value], tmp_path, LLMRUN_HOME=smollm2_home)
    assert_usage_error(proc, f"invalid size '{value}': use a number with a unit")


def test_zero_gpu_memory_still_means_no_gpu(smollm2_home, tmp_path):
    proc = run_cli(["plan", "smollm2", "--gpu-mem", "0", "--json"], tmp_path, LLMRUN_HOME=smollm2_home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compute"] == "cpu"


def test_smollm2_advice_plans_and_runs(smollm2_home, tmp_path):
    """100MB of CPU memory at the default context (200MB, the first issue's case, plans since
    issue 18 stages a matrix at a time, 150MB since the plan chooses a smaller prefill chunk under
    pressure). Every suggestion plans, and the shorter context runs."""
    proc = run_cli(["plan", "smollm2", "--cpu-mem", "100MB"], tmp_path, LLMRUN_HOME=smollm2_home)
    assert_one_line_error(proc, "more than the 95.4 MiB budget")
    advice = suggestions(proc.stderr)
    assert {frozenset(a) for a in advice} == {frozenset({"--ctx"}), frozenset({"--cpu-mem"})}, proc.stderr
    for suggestion in advice:
        args = ["--cpu-mem", "100MB", *(word for pair in suggestion.items() for word in pair)]
        followed = run_cli(["plan", "smollm2", "--json", *args], tmp_path, LLMRUN_HOME=smollm2_home)
        assert followed.returncode == 0, (args, followed.stderr)
    ctx = next(a["--ctx"] for a in advice if "--ctx" in a)
    ran = run_cli(["run", "smollm2", "Hi", "-t", "0", "-n", "3", "-q", "--cpu-mem", "100MB", "--ctx", ctx],
                  tmp_path, LLMRUN_HOME=smollm2_home)
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr


def test_smollm2_in_one_megabyte_suggests_budgets_that_plan(smollm2_home, tmp_path):
    proc = run_cli(["plan", "smollm2", "--cpu-mem", "1MB"], tmp_path, LLMRUN_HOME=smollm2_home)
    assert_one_line_error(proc, "the model cannot run")
    advice = suggestions(proc.stderr)
    assert len(advice) == 2 and all("--cpu-mem" in a for a in advice), proc.stderr
    for suggestion in advice:
        args = ["--cpu-mem", "1MB", *(word for pair in suggestion.items() for word in pair)]
        followed = run_cli(["plan", "smollm2", "--json", *args], tmp_path, LLMRUN_HOME=smollm2_home)
        assert followed.returncode == 0, (args, followed.stderr)
