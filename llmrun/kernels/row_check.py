"""The batch-invariance check: whether a decoder's matmuls give each of n rows its bits alone.

A matmul library picks its kernel by the number of rows, and kernels sum in different orders: on
an AMX CPU, oneDNN's bf16 matmul gives every row the same bits for 1 to 32 rows and other bits
from 33 rows on. A decode step batches one row per sequence, so it may batch only as many rows as
give each row what it gets alone. This check answers for one row count (the engine asks once per
count it meets), on probe weights of the decoder's own matmul shapes in the forms its weights take (oneDNN-packed where
resident weights are packed, plain where they stream), with data whose large terms cancel so
that any other order of summation shows.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from llmrun.model.layers import linear
from llmrun.weights.packing import can_pack, pack_weight

PROBE_OUT = 4096  # probe rows of a weight at most: a kernel's order is per output, its layout repeats


LAYER_MATRICES = ("qkv", "o", "gate_up", "down")


def matmul_shapes(decoder, compressed: frozenset = frozenset()) -> list[tuple[int, int]]:
    """(out, in) of each matmul a decode step runs: fused q/k/v, o, fused gate/up (and each half,
    which plain CPU weights run apart: layers.linear_halves), down, the head; without the layer
    matrices named in `compressed` (compressed_rows_alone's)."""
    c = decoder.config
    by_matrix = {"qkv": [(decoder.q_size + 2 * decoder.kv_size, c.hidden_size)], "o": [(c.hidden_size, decoder.q_size)],
                 "gate_up": [(2 * c.intermediate_size, c.hidden_size), (c.intermediate_size, c.hidden_size)],
                 "down": [(c.hidden_size, c.intermediate_size)], "head": [(c.vocab_size, c.hidden_size)]}
    return sorted({shape for matrix, shapes in by_matrix.items() if matrix not in compressed for shape in shapes})


def compressed_rows_alone(decoder, weights) -> frozenset:
    """The layer matrices (LAYER_MATRICES' names) stored compressed in every layer in forms the decoder's
    quantized matmul computes row by row (the CPU's C kernels: `rows_alone`): no probe of a plain
    matmul of their shape says anything about them. A matrix stacked from tensors in unlike forms runs
    as int8 with their common group (format.concat_quant), so that form must pass too. The head is
    always probed."""
    formats = getattr(getattr(weights, "quant", None), "formats", None)
    row_by_row = getattr(decoder.kernels.quant, "rows_alone", None)
    if not formats or row_by_row is None:
        return frozenset()

    def runs_row_by_row(names: tuple[str, ...]) -> bool:
        if not names or not all(name in formats for name in names):
            return False
        forms = [formats[name] for name in names]
        if len(forms) > 1:  # (stacked alike: their form; unlike: int8 in their common group)
            forms.append(replace(forms[0], bits=8, group_size=math.gcd(*(f.group_size for f in forms))))
        return all(row_by_row(form, decoder.dtype) for form in forms)

    layouts = [decoder.layer_layout(i) for i in range(decoder.config.num_hidden_layers)]
    return frozenset(matrix for matrix in LAYER_MATRICES
                     if all(runs_row_by_row(layout.get(matrix, ())) for layout in layouts))


def rows_alone(decoder, num_rows: int, compressed: frozenset = frozenset()) -> bool:
    """Whether `num_rows` rows in one matmul give each row the bits it gets alone, on every matmul
    shape and weight form of this decoder (on two kinds of data: cancelling and plain), the
    compressed matrices that are computed row by row left out."""
    generator = torch.Generator().manual_seed(12)
    return all(_rows_agree(weight, decoder.dtype, decoder.device, num_rows, generator)
               for out_features, in_features in matmul_shapes(decoder, compressed)
               for weight in _probe_weights(decoder, min(out_features, PROBE_OUT), in_features, generator))


def _probe_weights(decoder, out_features: int, in_features: int, generator) -> list[torch.Tensor]:
    """A weight whose large entries cancel in pairs (the rest small), plain and, where the
    decoder's resident weights are packed, packed."""
    quarter = in_features // 4
    big = (torch.randn(out_features, quarter, generator=generator) * 3e4).to(decoder.dtype).float()
    small = torch.randn(out_features, in_features - 2 * quarter, generator=generator) * 0.01
    columns = torch.randperm(in_features, generator=generator)
    weight = torch.cat((big, -big, small), 1)[:, columns].to(decoder.dtype).to(decoder.device)
    return [weight, pack_weight(weight)] if can_pack(decoder.dtype, decoder.device) else [weight]


def _rows_agree(weight: torch.Tensor, dtype, device, num_rows: int, generator) -> bool:
    in_features = weight.shape[1]
    cancelling = (1 + torch.rand(num_rows, in_features, generator=generator)).to(dtype)
    cancelling[0] = 1  # row 0's large terms cancel exactly: only the small ones remain
    plain = torch.randn(num_rows, in_features, generator=generator).to(dtype)
    for x in (cancelling.to(device), plain.to(device)):
        alone = torch.cat([linear(x[row : row + 1], weight) for row in range(num_rows)])
        if not torch.equal(linear(x, weight), alone):
            return False
    return True
