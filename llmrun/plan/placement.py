"""The planner: a pure function of model sizes, memory budgets and options -> Placement."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from llmrun.plan.model_sizes import ModelSizes
from llmrun.plan.tiers import Budgets, Placement, PlanError, PlanOptions, Reservation, Tier
from llmrun.sizes import format_bytes, size_option_text

CHUNK_SAVING = 0.05                     # each halving must stream this share fewer bytes per token


def workspace_bytes(sizes: ModelSizes, options: PlanOptions, fast: Tier = Tier.CPU,
                    chunk: Optional[int] = None) -> int:
    """Activations of one prefill chunk (`chunk` tokens, the largest choice by default): hidden/MLP
    buffers, last-token logits, on the CPU the attention scores (CUDA's fused attention kernels never
    materialise them), and what a compressed model's chunks dequantize for their GEMMs
    (ModelSizes.dequantized_workspace)."""
    chunk = min(chunk or options.prefill_chunks[0], options.ctx)
    per_token = (6 * sizes.hidden_size + 3 * sizes.intermediate_size) * options.dtype_bytes
    scores = chunk * options.ctx * sizes.num_attention_heads * 4
    logits = options.batch * sizes.vocab_size * 4
    dequantized = sizes.dequantized_workspace(options.batch, on_gpu=fast is Tier.GPU)
    return chunk * options.batch * per_token + logits + (0 if fast is Tier.GPU else scores) + dequantized


def _prefix_fit(layer_bytes: tuple[int, ...], start: int, room: int) -> int:
    """How many layers from `start` on fit, in order, in `room` bytes."""
    count = 0
    for size in layer_bytes[start:]:
        if size > room:
            break
        room -= size
        count += 1
    return count


class _NoRoom(Exception):
    """The fast tier's budget cannot hold the reservations and staging buffers (plan() advises)."""


def plan(sizes: ModelSizes, budgets: Budgets, options: PlanOptions) -> Placement:
    """Place every weight in the fastest tier that has room, reserving KV, workspace and staging first.

    When nothing fits, the PlanError says what would: a shorter --ctx or a larger budget, each
    found by planning with it (advice that does not hold is never printed)."""
    if options.ctx > sizes.max_context:
        raise PlanError(f"--ctx {options.ctx} is beyond the model's maximum context of {sizes.max_context} tokens")
    try:
        return _place(sizes, budgets, options)
    except _NoRoom:
        raise PlanError(_advice(sizes, budgets, options)) from None


def _place(sizes: ModelSizes, budgets: Budgets, options: PlanOptions) -> Placement:
    """The placement whose prefill chunk (one of options.prefill_chunks) streams the fewest weight
    bytes per decode token, each halving of the chunk counted CHUNK_SAVING dearer: a smaller chunk's
    workspace leaves room for more resident layers, but a long prompt then makes twice the passes
    over the streamed ones, which ~1/CHUNK_SAVING decoded tokens repay. Where nothing streams the
    largest chunk wins; where only a small chunk fits, it is taken."""
    best, best_cost = None, 0.0
    for halvings, chunk in enumerate(options.prefill_chunks):
        try:
            placement = _place_chunk(sizes, budgets, options, chunk)
        except _NoRoom:
            continue
        cost = placement.streamed_bytes() / (1 - CHUNK_SAVING) ** halvings
        if best is None or cost < best_cost:
            best, best_cost = placement, cost
        if not best.streams:
            break
    if best is None:
        raise _NoRoom()
    return best


def _place_chunk(sizes: ModelSizes, budgets: Budgets, options: PlanOptions, chunk: int) -> Placement:
    chunk = min(chunk, options.ctx)
    fast = Tier.GPU if budgets.has_gpu else Tier.CPU
    fast_budget = budgets.gpu_bytes if budgets.has_gpu else budgets.cpu_bytes
    num_blocks = -(-options.ctx // options.block_size) * options.batch
    kv_bytes = num_blocks * options.block_size * sizes.kv_bytes_per_token
    reservations = [
        Reservation("kv_cache", fast, kv_bytes,
                    f"{num_blocks} blocks x {options.block_size} tokens ({options.ctx} ctx x {options.batch} seq)"),
        Reservation("workspace", fast, workspace_bytes(sizes, options, fast, chunk),
                    f"activations for a {chunk}-token prefill chunk"),
    ]
    if fast is Tier.GPU:
        reservations.insert(0, Reservation("runtime", Tier.GPU, options.gpu_runtime_bytes,
                                           "CUDA context and library workspaces"))
    fixed = sum(r.num_bytes for r in reservations)
    if fixed > fast_budget:
        raise _NoRoom()
    room = fast_budget - fixed
    head = sizes.head_bytes + sizes.other_bytes
    embed = 0 if sizes.tied_embeddings else sizes.embed_bytes
    num_layers = sizes.num_layers
    piece_bytes = 0
    if head + sum(sizes.layer_bytes) + embed <= room:
        layer_tiers, head_tier, embed_tier = [fast] * num_layers, fast, fast
    else:
        staging = _staging(sizes, room, head)
        head_tier = fast if staging.head_fast else _slow_tiers(fast)[0]
        piece_bytes = staging.piece_bytes
        reservations.append(Reservation("staging", fast, staging.num_bytes, staging.detail))
        room -= staging.num_bytes + (head if head_tier is fast else 0)
        num_fast = _prefix_fit(sizes.layer_bytes, 0, max(room, 0))
        layer_tiers = [fast] * num_fast
        layer_tiers += _place_slow(sizes, budgets, fast, num_fast, embed, head_tier, piece_bytes, reservations)
        embed_tier = Tier.CPU if fast is Tier.GPU else Tier.DISK
        if fast is Tier.GPU and _cpu_left(sizes, budgets, layer_tiers, head_tier, reservations) < embed:
            embed_tier = Tier.DISK
    if sizes.tied_embeddings:
        embed_tier = head_tier
    return Placement(tuple(layer_tiers), head_tier, embed_tier, fast, options.ctx, options.batch,
                     options.block_size, num_blocks, tuple(reservations), budgets, sizes, piece_bytes, chunk)


@dataclass(frozen=True)
class _Staging:
    piece_bytes: int
    num_bytes: int
    head_fast: bool
    detail: str


def _staging(sizes: ModelSizes, room: int, head: int) -> _Staging:
    """Two staging slots (one computing, one filling) of whole layers or, where those do not fit, of
    single matrices (the streamed layers' norms then resident). The head stays in the fast tier when
    any choice leaves room for it, else it streams in chunks of a slot's size (not a compressed head:
    there is then no room). Whole layers win even
    where matrices would keep one more layer resident: each piece handed over costs the step a wait,
    and SmolLM2 bf16 under --cpu-mem 150MB decoded ~12 % slower by matrices with 23 layers streamed
    than by layers with 24 (docs/performance.md)."""
    whole = max(sizes.layer_bytes)
    by_matrix = max(sizes.matrix_bytes(i) for i in range(sizes.num_layers))
    vectors = sum(sizes.vector_bytes(i) for i in range(sizes.num_layers))
    choices = [_Staging(piece, 2 * piece + extra, head_fast, f"double buffer for the largest streamed {what}"
                        + ("" if head_fast else ", the head streamed in chunks of its size"))
               for head_fast in (True, False)
               for piece, extra, what in ((whole, 0, "layer"), (by_matrix, vectors, "matrix, norms of streamed layers"))]
    fitting = [c for c in choices if c.num_bytes + (head if c.head_fast else 0) <= room
               and (c.head_fast or not sizes.head_compressed)]  # a compressed head is not streamed
    if not fitting:
        raise _NoRoom()

    return max(fitting, key=lambda c: (c.head_fast, c.piece_bytes == whole))


def _slow_tiers(fast: Tier) -> list[Tier]:
    return [Tier.CPU, Tier.DISK] if fast is Tier.GPU else [Tier.DISK]


def _place_slow(sizes, budgets, fast, num_fast, embed, head_tier, piece_bytes, reservations) -> list[Tier]:
    """Tiers of layers num_fast.. : pinned CPU memory while it lasts (GPU plans), then disk, read
    through two pinned slots of a piece each."""
    rest = sizes.layer_bytes[num_fast:]
    if fast is Tier.CPU or not rest:
        return [Tier.DISK] * len(rest)
    cpu_room = budgets.cpu_bytes - (sizes.head_bytes + sizes.other_bytes if head_tier is Tier.CPU else 0)
    if sum(rest) + embed <= cpu_room:
        return [Tier.CPU] * len(rest)
    pinned = 2 * min(piece_bytes, max(rest))
    reservations.append(Reservation("pinned_staging", Tier.CPU, pinned, "pinned buffers for disk reads"))
    num_cpu = _prefix_fit(sizes.layer_bytes, num_fast, max(cpu_room - pinned, 0))
    return [Tier.CPU] * num_cpu + [Tier.DISK] * (len(rest) - num_cpu)


def _cpu_left(sizes, budgets, layer_tiers, head_tier, reservations) -> int:
    used = sum(b for b, t in zip(sizes.layer_bytes, layer_tiers) if t is Tier.CPU)
    used += sum(r.num_bytes for r in reservations if r.tier is Tier.CPU)
    if head_tier is Tier.CPU:
        used += sizes.head_bytes + sizes.other_bytes
    return budgets.cpu_bytes - used


def _fits(sizes: ModelSizes, budgets: Budgets, options: PlanOptions) -> bool:
    try:
        _place(sizes, budgets, options)
    except _NoRoom:
        return False
    return True


def _with_budget(budgets: Budgets, num_bytes: int) -> Budgets:
    if budgets.has_gpu:
        return replace(budgets, gpu_bytes=max(num_bytes, 1))  # 0 would mean "no GPU"
    return replace(budgets, cpu_bytes=num_bytes)


def _longest_fitting_ctx(sizes: ModelSizes, budgets: Budgets, options: PlanOptions) -> Optional[int]:
    """The longest context below options.ctx that plans in these budgets (a round number), if any."""
    lo, hi = 1, options.ctx - 1  # fits(ctx) only gets harder as ctx grows: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(sizes, budgets, replace(options, ctx=mid)) else (lo, mid - 1)
    if lo < 2:
        return None
    step = 256 if lo >= 256 else options.block_size if lo >= options.block_size else 1
    return lo // step * step


def smallest_budget(sizes: ModelSizes, budgets: Budgets, options: PlanOptions) -> int:
    """The floor: the smallest fast-tier budget (bytes) in which options.ctx and options.batch plan.

    Found by planning (`_place`), so it follows the placement's own reservations and staging rule."""
    lo, hi = 0, 1 << 20
    while not _fits(sizes, _with_budget(budgets, hi), options):
        lo, hi = hi, hi * 2
    while lo + 1 < hi:  # invariant: lo does not fit, hi does
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(sizes, _with_budget(budgets, mid), options) else (mid, hi)
    return hi


def _advice(sizes: ModelSizes, budgets: Budgets, options: PlanOptions) -> str:
    """Why the plan does not fit and what would, each suggestion checked by planning with it."""
    where, flag = ("GPU", "--gpu-mem") if budgets.has_gpu else ("CPU", "--cpu-mem")
    budget = budgets.gpu_bytes if budgets.has_gpu else budgets.cpu_bytes
    needed = smallest_budget(sizes, budgets, options)
    parts = ("KV cache, workspace, staging buffers" + (", the compressed output head" if sizes.head_compressed else "")
             + (", CUDA runtime" if budgets.has_gpu else ""))
    head = (f"a {options.ctx}-token context x {options.batch} sequence(s) needs at least {format_bytes(needed)} "
            f"of {where} memory ({parts}), more than the {format_bytes(budget)} budget")
    bigger = f"with {flag} {size_option_text(needed)}"
    shorter = _longest_fitting_ctx(sizes, budgets, options)
    if shorter is not None:
        return f"{head}; it fits with --ctx {shorter}, or {bigger}"
    smallest = min(options.block_size, options.ctx)
    if smallest == options.ctx:
        return f"the model cannot run: {head}; it fits {bigger}"
    least = size_option_text(smallest_budget(sizes, budgets, replace(options, ctx=smallest)))
    return f"the model cannot run: {head}; it fits {bigger}, or with --ctx {smallest} {flag} {least}"
