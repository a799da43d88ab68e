"""`llmrun quantize --calibrate FILE`: how much each input of each layer matmul matters, measured on a
text, for the int4 fit (quant/quantize.py) to weigh its rounding errors by.

An input's importance is the mean square of the values it takes over the text's tokens (what
llama.cpp calls an importance matrix): a weight's rounding error e moves an output by e * x, so its
expected square is e^2 * E[x^2]. The float model runs the text through llmrun's own decoder (its plan
and placement, as `llmrun perplexity` runs it: in windows of its context, prompt chunks of 512
tokens) over ATen's ops, which record every matmul's input by the layout key of the weight it meets;
q/k/v (and gate/up) share their input, so their tensors share the vector.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from llmrun.kernels.interface import Kernels
from llmrun.quant.quantize import Calibration

if TYPE_CHECKING:
    from llmrun.engine.build import EngineOptions


class ImportanceKernels(Kernels):
    """ATen's ops that also sum the squares of each matmul's input rows, by (layer, layout key) of
    the weight met (the layer's tensors are known by identity, as `_TrackedLayer` hands them out)."""

    def __init__(self, shape, dtype, device):
        super().__init__(shape, dtype, device)
        self.layer_idx = -1
        self.handed: dict[int, str] = {}  # id(tensor) -> layout key, for the layer running
        self.sums: dict[tuple[int, str], torch.Tensor] = {}  # float64 [in]
        self.rows: dict[tuple[int, str], int] = {}

    def record(self, x: torch.Tensor, weight) -> None:
        key = self.handed.get(id(weight))
        if key is None:  # the head, or half of a gate/up weight (recorded whole in norm_gate_up)
            return
        where = (self.layer_idx, key)
        squares = x.reshape(-1, x.shape[-1]).to(torch.float64).square().sum(0).cpu()
        self.sums[where] = squares if where not in self.sums else self.sums[where] + squares
        self.rows[where] = self.rows.get(where, 0) + x.numel() // x.shape[-1]

    def linear(self, x, weight, bias=None):
        self.record(x, weight)
        return super().linear(x, weight, bias)

    def norm_gate_up(self, hidden, delta, norm_weight, weight, bias=None):
        hidden, x = self.add_norm(hidden, delta, norm_weight)
        self.record(x, weight)
        return super().norm_gate_up(hidden, None, norm_weight, weight, bias)  # (the norm again: the same x)

    def mean_squares(self) -> dict[tuple[int, str], torch.Tensor]:
        return {where: (total / self.rows[where]).to(torch.float32) for where, total in self.sums.items()}


class _TrackedLayer(Mapping):
    """A layer's tensors as the weights hand them out (a dict, or a layer staged matrix by matrix),
    each one handed over noted by identity for ImportanceKernels."""

    def __init__(self, tensors: Mapping, kernels: ImportanceKernels):
        self._tensors, self._kernels = tensors, kernels

    def __getitem__(self, key):
        tensor = self._tensors[key]
        self._kernels.handed[id(tensor)] = key
        return tensor

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class _TrackedWeights:
    """The engine's weights, each layer's tensors handed out through _TrackedLayer."""

    def __init__(self, weights, kernels: ImportanceKernels):
        self._weights, self._kernels = weights, kernels

    def __getattr__(self, name):
        return getattr(self._weights, name)

    @contextmanager
    def layer(self, layer_idx: int) -> Iterator[Mapping]:
        with self._weights.layer(layer_idx) as tensors:
            self._kernels.layer_idx, self._kernels.handed = layer_idx, {}
            yield _TrackedLayer(tensors, self._kernels)


def calibrate(folder: Path, text: str, file_name: str, expected: list[str],
              on_chunk: Callable[[int, int], None] = lambda done, total: None,
              options: Optional["EngineOptions"] = None) -> Calibration:
    """Run `text` through the float model in `folder` (planned by `options`, default: as `llmrun run`
    would place it, one sequence) and return each of `expected`'s (the layer matmul weights to
    quantize) input importance; `on_chunk(done, total)` reports progress in tokens."""
    from llmrun.bench.perplexity import CHUNK_TOKENS, context_windows, window_forwards
    from llmrun.engine.build import EngineOptions, build_engine
    from llmrun.errors import UsageError

    engine = build_engine(folder, options or EngineOptions(batch=1), kernels=ImportanceKernels)
    with engine:
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise UsageError(f"{file_name} has no tokens to calibrate on")
        kernels = engine.decoder.kernels
        weights = _TrackedWeights(engine.weights, kernels)
        for first, part in context_windows(engine, ids):
            for start, hidden in window_forwards(engine, part, CHUNK_TOKENS, weights):
                on_chunk(first + start + hidden.shape[0], len(ids))
        by_key = kernels.mean_squares()
        importance = {}
        for layer_idx in range(engine.decoder.config.num_hidden_layers):
            for key, names in engine.decoder.layer_layout(layer_idx).items():
                if (layer_idx, key) in by_key:
                    importance.update({name: by_key[(layer_idx, key)] for name in names})
    missing = [name for name in expected if name not in importance]
    if missing:
        raise RuntimeError(f"calibration did not reach {missing[0]} ({len(missing)} weights in all)")
    return Calibration({name: importance[name] for name in expected}, file_name, len(ids))
