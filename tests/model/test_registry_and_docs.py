"""The registry, the alias table and docs/models.md agree; unsupported architectures name the supported."""

import json

import pytest

from llmrun.errors import UnsupportedArchitectureError
from llmrun.hub.aliases import ALIASES
from llmrun.model.docs import PAGE, main, render_models_page
from llmrun.model.registry import FAMILIES, architecture_of, decoder_class, supported_architectures


def test_models_page_is_in_sync_with_the_tables():
    assert PAGE.read_text() == render_models_page(), "docs/models.md is stale: run python -m llmrun.model.docs"
    assert main(["--check"]) == 0


def test_page_lists_every_family_and_alias():
    page = render_models_page()
    assert all(f"`{arch}`" in page for arch in supported_architectures())
    assert all(f"`{name}`" in page for name in ALIASES)


def test_every_alias_points_at_a_family_that_runs():
    assert {a.architecture for a in ALIASES.values()} <= set(supported_architectures())
    added = {"phi-3-medium", "phi-3.5-mini", "qwen3-0.6b", "qwen3-1.7b", "gemma-3-1b", "llama-3.1-8b"}
    assert added <= set(ALIASES)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.architecture)
def test_each_family_resolves_to_its_decoder(family):
    assert family.architecture in decoder_class(family.architecture).architectures


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(UnsupportedArchitectureError) as err:
        architecture_of(tmp_path)
    assert str(err.value) == ("architecture MambaForCausalLM is not supported; supported: "
                              + ", ".join(supported_architectures()))
    assert len(supported_architectures()) == 7
