"""The Engine's contract (issue 15): one road from name to engine that reads config.json once, a
step observer given at construction (one that watches layers runs static steps eagerly), a
Generation that carries its results, and close() / `with` releasing the weights."""

import pytest

from llmrun.engine.build import EngineOptions
from llmrun.engine.sampler import SamplingParams
from llmrun.weights.observer import StepObserver
from tests.checkpoints import llama_config, save_checkpoint

GREEDY = SamplingParams(temperature=0, max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("contract") / "tiny", llama_config(), seed=2)


class Recording(StepObserver):
    watches_layers = True

    def __init__(self):
        self.layers, self.steps = [], 0

    def layer(self, layer_idx, num_layers, bytes_moved):
        self.layers.append(layer_idx)

    def step_done(self):
        self.steps += 1


def test_the_run_road_reads_config_json_once_and_plans_as_plan_does(tiny, monkeypatch):
    from llmrun.model import config
    from llmrun.plan.inputs import plan_inputs
    from llmrun.plan.make import make_plan
    from llmrun.runtime import open_model

    reads = []
    real = config.read_config_json
    monkeypatch.setattr(config, "read_config_json", lambda folder: reads.append(folder) or real(folder))
    options = EngineOptions(dtype="float32", gpu_mem_bytes=0, cpu_mem_bytes=2**30, ctx=64)
    with open_model(str(tiny), options, show_progress=False).engine as engine:
        assert len(reads) == 1
        planned = plan_inputs(str(tiny))
        assert planned.architecture == "LlamaForCausalLM"
        again = make_plan(planned.config, planned.index, options, planned.folder).placement
        # free disk space is measured at each plan, and loading writes caches (tokenizer, calibration)
        assert without_disk_budget(again) == without_disk_budget(engine.plan.placement)


def without_disk_budget(placement):
    from dataclasses import replace

    return replace(placement, budgets=replace(placement.budgets, disk_bytes=0))


def test_the_step_observer_sees_every_layer_and_turns_graph_replay_off(tiny):
    from llmrun.engine.build import engine_from_plan
    from llmrun.plan.inputs import folder_inputs
    from llmrun.plan.make import make_plan

    inputs, options = folder_inputs(tiny), EngineOptions(dtype="float32", gpu_mem_bytes=0)
    observer = Recording()
    with engine_from_plan(inputs, make_plan(inputs.config, inputs.index, options, tiny), options,
                          step_observer=observer) as engine:
        assert not engine.runner.replay_graphs
        [result] = engine.generate([[1, 2, 3]], GREEDY).run_to_end()
    num_layers = inputs.config["num_hidden_layers"]
    assert observer.steps == len(result.tokens)  # one forward a token (the prompt's included)
    assert observer.layers == list(range(num_layers)) * observer.steps
    with engine_from_plan(inputs, make_plan(inputs.config, inputs.index, options, tiny), options) as plain:
        assert plain.runner.replay_graphs


def test_a_generation_carries_its_results_and_close_releases_the_weights(tiny, monkeypatch):
    from llmrun.engine.build import build_engine

    engine = build_engine(tiny, EngineOptions(dtype="float32", gpu_mem_bytes=0, batch=2))
    first = engine.generate([[1, 2, 3], [4, 5]], GREEDY)
    assert first.results == []  # nothing runs until it is iterated
    events = list(first)
    assert [r.tokens for r in first.results] == [[e.token_id for e in events if e.request_index == i]
                                                 for i in range(2)]
    second = engine.generate([[1, 2, 3]], GREEDY)
    assert second.run_to_end()[0].tokens == first.results[0].tokens and len(first.results) == 2
    with engine.generate([[1, 2, 3]], GREEDY) as stopped:
        next(stopped)
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks  # closed early: blocks freed
    closed = []
    monkeypatch.setattr(engine.weights, "close", lambda: closed.append(True))
    with engine:
        pass
    engine.close()
    assert closed == [True]
