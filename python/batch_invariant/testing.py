"""Invariance properties, written once and reused for every backend (tests, GPU acceptance script).

Each ``*_mismatches`` function runs an op on the same row in different company and returns a list
of human-readable failures (empty = invariant). Comparisons are bitwise (``torch.equal``), never a
tolerance. The functions take the op as a callable, so the test suite also feeds them a
deliberately batch-variant implementation (negative control) and expects failures.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

#: Batch sizes of the row-invariance sweep: tile tails around 16/64/128 and a large odd one.
BATCH_SIZES = (1, 2, 3, 7, 16, 17, 31, 64, 127, 128, 129, 500)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that also treats NaNs with the same bits as equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def row_invariance_mismatches(fn: Callable[[torch.Tensor], torch.Tensor], make_rows: Callable[[int, int], torch.Tensor],
                              batch_sizes: Sequence[int] = BATCH_SIZES) -> list[str]:
    """``fn`` maps rows ``[M, ...]`` to outputs ``[M, ...]``; ``make_rows(M, seed)`` makes inputs.

    The probe row (seed 0) is computed alone, then at the first, middle and last position of
    batches of every size in ``batch_sizes``, with two different sets of company rows.
    """
    probe = make_rows(1, 0)
    alone = fn(probe)[0]
    failures = []
    for m in batch_sizes:
        if m == 1:
            continue
        for seed in (1, 2):
            company = make_rows(m, 1000 * m + seed)
            for pos in sorted({0, m // 2, m - 1}):
                batch = company.clone()
                batch[pos] = probe[0]
                got = fn(batch)[pos]
                if not bits_equal(got, alone):
                    diff = (got.double() - alone.double()).abs().max().item()
                    failures.append(f"M={m} pos={pos} company={seed}: max |diff| {diff:.3g}")
    return failures


def batch_variant_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Negative control: a deliberately batch-variant linear whose K split depends on M (what
    split-K GEMMs do), built from the batch-invariant op of the current backend."""
    from .ops.linear import linear

    if x.size(0) < 8:
        return linear(x, w)
    half = x.size(1) // 2
    lo = linear(x[:, :half].contiguous(), w[:, :half].contiguous(), out_dtype=torch.float32)
    hi = linear(x[:, half:].contiguous(), w[:, half:].contiguous(), out_dtype=torch.float32)
    return (lo + hi).to(x.dtype)


def permutation_mismatches(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, seed: int = 0) -> list[str]:
    """fn(rows[perm]) must equal fn(rows)[perm] bitwise."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(rows.size(0), generator=gen)
    full = fn(rows)
    permuted = fn(rows[perm].contiguous())
    return [] if bits_equal(permuted, full[perm]) else ["output rows depend on row order"]


def column_block_mismatches(linear_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                            w: torch.Tensor, blocks: Sequence[tuple[int, int]]) -> list[str]:
    """N-invariance: linear(x, w[n0:n1]) must equal linear(x, w)[:, n0:n1] bitwise."""
    full = linear_fn(x, w)
    failures = []
    for n0, n1 in blocks:
        part = linear_fn(x, w[n0:n1].contiguous())
        if not bits_equal(part, full[:, n0:n1]):
            failures.append(f"columns [{n0}, {n1}) differ when computed alone")
    return failures


def thread_count_mismatches(fn: Callable[[], torch.Tensor], counts: Sequence[int] = (1, 2)) -> list[str]:
    """fn() must give the same bits for every intra-op thread count (CPU)."""
    before = torch.get_num_threads()
    try:
        outs = []
        for n in counts:
            torch.set_num_threads(n)
            outs.append(fn())
    finally:
        torch.set_num_threads(before)
    return [f"threads {counts[0]} vs {n} differ" for n, out in zip(counts[1:], outs[1:])
            if not bits_equal(outs[0], out)]


def max_abs_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0


# ------------------------------------------------------------------------------------------
# Paged attention scenarios: the same tokens scheduled differently must give the same bits.

def attention_schedule(attention_fn, write_fn, q_all, k_all, v_all, schedule, *, block_size: int,
                       shuffle_seed: int = 0, scale: float | None = None) -> list[torch.Tensor]:
    """Run sequences through the paged cache step by step, as an engine would.

    ``q_all[b]`` ``[L_b, Hq, D]``, ``k_all[b]``/``v_all[b]`` ``[L_b, Hk, D]``. ``schedule`` is a
    list of steps; a step is a list of ``(b, n)``: sequence b processes its next n tokens (its
    K/V written first, then attention over everything so far). Blocks are handed out in a
    shuffled order (``shuffle_seed``); unused cache memory holds garbage, not zeros.
    Returns the attention output of every token of every sequence.
    """
    heads_kv, head = k_all[0].shape[1], k_all[0].shape[2]
    dtype, device = k_all[0].dtype, k_all[0].device
    need = [-(-q.shape[0] // block_size) for q in q_all]
    num_blocks = sum(need) + 3
    gen = torch.Generator().manual_seed(shuffle_seed)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, cursor = [], 0
    for n in need:
        tables.append(order[cursor:cursor + n])
        cursor += n
    max_blocks = max(need) + 1
    garbage = torch.randn(num_blocks, block_size, heads_kv, head, generator=gen) * 100
    key_cache = garbage.to(dtype=dtype, device=device)
    value_cache = (-garbage).to(dtype=dtype, device=device)
    outs = [torch.full_like(q, float("nan")) for q in q_all]
    done = [0] * len(q_all)
    for step in schedule:
        qs, ks, vs, slots, qsl, lens, table = [], [], [], [], [0], [], []
        for b, n in step:
            lo, hi = done[b], done[b] + n
            qs.append(q_all[b][lo:hi]); ks.append(k_all[b][lo:hi]); vs.append(v_all[b][lo:hi])
            pos = torch.arange(lo, hi)
            blocks = torch.tensor(tables[b], dtype=torch.int64)[pos // block_size]
            slots.append(blocks * block_size + pos % block_size)
            qsl.append(qsl[-1] + n)
            lens.append(hi)
            row = tables[b] + [num_blocks - 1] * (max_blocks - len(tables[b]))  # padding: a valid id
            table.append(row)
        write_fn(torch.cat(ks), torch.cat(vs), key_cache, value_cache, torch.cat(slots).to(device))
        idx = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
        out = attention_fn(torch.cat(qs), key_cache, value_cache, idx(qsl), idx(lens), idx(table), scale)
        for i, (b, n) in enumerate(step):
            outs[b][done[b]:done[b] + n] = out[qsl[i]:qsl[i + 1]]
            done[b] += n
    return outs


def prefill_schedule(lengths) -> list:
    return [[(b, n) for b, n in enumerate(lengths)]]


def chunked_schedule(lengths, chunk: int) -> list:
    """Every sequence advances by up to `chunk` tokens per step, all in the same batch."""
    steps, done = [], [0] * len(lengths)
    while any(d < n for d, n in zip(done, lengths)):
        step = []
        for b, n in enumerate(lengths):
            take = min(chunk, n - done[b])
            if take:
                step.append((b, take))
                done[b] += take
        steps.append(step)
    return steps


def decode_schedule(lengths, prompt: int) -> list:
    """Prefill the first `prompt` tokens of each sequence alone, then decode one token per step,
    sequences in reverse order (other company, other positions in the batch)."""
    steps = [[(b, min(prompt, n))] for b, n in enumerate(lengths)]
    done = [min(prompt, n) for n in lengths]
    while any(d < n for d, n in zip(done, lengths)):
        step = [(b, 1) for b in reversed(range(len(lengths))) if done[b] < lengths[b]]
        for b, _ in step:
            done[b] += 1
        steps.append(step)
    return steps
def paged_attention_problem(dtype, *, D: int, hq: int, hk: int, ctx, qlens, block_size: int = 16, pad_front: int = 0,
                            pad_back: int = 0, seed: int = 0):
    """(q, key_cache, value_cache, query_start_loc, seq_lens, block_table) of sequences with
    seq_lens `ctx` whose last `qlens` tokens are the queries (a cached prefix: chunked-prefill and
    decode shapes), cache blocks in a shuffled order, spare table entries pointing at a garbage
    block, `pad_front` / `pad_back` padding tokens outside query_start_loc."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx]
    nb = sum(need) + 3
    order = torch.randperm(nb, generator=g).tolist()
    maxb = max(need) + 1
    table, cur = [], 0
    for n in need:
        table.append(order[cur:cur + n] + [nb - 1] * (maxb - n))
        cur += n
    kc = (torch.randn(nb, block_size, hk, D, generator=g) * 1.5).to(dtype)
    vc = torch.randn(nb, block_size, hk, D, generator=g).to(dtype)
    q = (torch.randn(pad_front + sum(qlens) + pad_back, hq, D, generator=g) * 1.5).to(dtype)
    qsl = [pad_front]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return q, kc, vc, i32(qsl), i32(list(ctx)), i32(table)


def schedule_mismatches(attention_fn, write_fn, q_all, k_all, v_all, lengths, *, chunk: int, prompt: int,
                        block_sizes: tuple[int, int], alone: int = 1) -> list[str]:
    """The standard schedule property of a paged attention: a whole prefill (pages of
    block_sizes[0]) against a chunked prefill, decode and a prefill on reshuffled pages of both
    sizes, and sequence `alone` run by itself in chunks. Returns the runs whose bits differ."""
    def run(schedule, block_size, shuffle_seed, sel=slice(None)):
        outs = attention_schedule(attention_fn, write_fn, q_all[sel], k_all[sel], v_all[sel], schedule,
                                  block_size=block_size, shuffle_seed=shuffle_seed)
        return torch.cat([o.reshape(-1) for o in outs]).view(torch.uint8)

    small, large = block_sizes
    base = run(prefill_schedule(lengths), small, 0)
    runs = {f"chunked {chunk} / page {large}": (chunked_schedule(lengths, chunk), large, 1),
            f"decode / page {small}": (decode_schedule(lengths, prompt), small, 2),
            f"prefill / page {large}": (prefill_schedule(lengths), large, 3)}
    failures = [name for name, (schedule, size, seed) in runs.items() if not torch.equal(run(schedule, size, seed), base)]
    one = slice(alone, alone + 1)
    expect = attention_schedule(attention_fn, write_fn, q_all, k_all, v_all, prefill_schedule(lengths),
                                block_size=small)[alone].reshape(-1).view(torch.uint8)
    if not torch.equal(run(chunked_schedule(lengths[one], max(1, chunk - 2)), small, 4, one), expect):
        failures.append(f"sequence {alone} alone")
    return failures


