"""Per-step schedule columns (learning rates, momenta, batch sizes) in bytes that do not grow with the run.

A "minimal" history must stay within a budget whatever the number of steps T, but a column holds one value per step.
Two facts bound it without losing what training schedules are made of:
  - many columns repeat: a data loader's batch sizes every epoch, warm restarts' rates every cycle. encode() finds
    the shortest period P with column[t] = column[t - P] (exactly), and keeps one period;
  - within a period, schedules are piecewise linear (constant, step, linear warm-up and decay: exactly, with a
    knot at each corner) or smooth (cosine, exponential, 1/t: close to a few hundred knots). encode() keeps at most
    `max_knots` knots of a piecewise-linear interpolant, chosen greedily where the interpolant is worst (top-down
    splitting), and stops once every step is reproduced to EXACT.
The encoding is exact (to EXACT of the column's scale) whenever the knots fit and the caller asks for it; otherwise it
is within the caller's tolerance or the closest the greedy split found, and encode() returns its error, which the
caller records (meta["schedule_error"]) and reports.
Integer columns are rounded back on decoding; they are exact whenever their error stays below half a unit.
"""
import heapq

import numpy as np
import torch

EXACT = 1e-12  # a float column's interpolant within this fraction of its largest |value| counts as exact
MAX_PERIOD_CANDIDATES = 4096  # periods looked at (the first rows compared)
MAX_PERIOD_TRIES = 64  # of those, compared over the whole column
MAX_SPLITS = 4096  # knots the greedy split places at most (each a look at its segment)
MAX_VALUES = 2**24  # a stored column decodes to at most this many values, steps x columns: a crafted span of a few bytes must
# not allocate gigabytes (16.7M steps of one parameter group: 134 MB as float64; a 1M-step run is 1/16 of it)
DECODE_BLOCK = 2**20  # positions of the period decoded at a time (the interpolation's temporaries stay this small)


def _period(rows):
    """The shortest P with rows[P:] == rows[:-P] among the first MAX_PERIOD_CANDIDATES candidates, else len(rows).
    A period repeats the first run (length L0) at P, so P + L0 is a change point: only those P are candidates."""
    T = rows.shape[0]
    change = np.flatnonzero(np.any(rows[1:] != rows[:-1], axis=1)) + 1  # c: rows[c] != rows[c - 1]
    if T < 2 or change.size == 0:
        return min(T, 1)
    full = 0
    for P in (change - change[0])[1:MAX_PERIOD_CANDIDATES]:
        m = min(T - P, 256)  # a cheap look at the start first
        if np.array_equal(rows[P : P + m], rows[:m]):
            if np.array_equal(rows[P:], rows[:-P]):
                return int(P)
            full += 1
            if full >= MAX_PERIOD_TRIES:
                break
    return T


def _knots(pattern, max_knots, tol):
    """Indices of the knots (ascending; 0 and len - 1 included) and the largest |interpolant - pattern| left."""
    P = pattern.shape[0]
    if P <= 2:
        return list(range(P)), 0.0

    def worst(a, b):  # (error, where) of the chord a..b
        if b - a < 2:
            return 0.0, a
        t = np.arange(1, b - a)[:, None] / (b - a)
        gap = np.abs(pattern[a] + (pattern[b] - pattern[a]) * t - pattern[a + 1 : b]).max(1)
        i = int(gap.argmax())
        return float(gap[i]), a + 1 + i

    knots = [0, P - 1]
    if max_knots >= P:
        # exactness asked for: a piecewise-linear column's corners (where its slope changes) are its knots, found in
        # one pass, the splitting below refining between them; a smooth column has more corners than MAX_SPLITS and is
        # exact only with every step a knot
        bend = np.abs(pattern[2:] - 2 * pattern[1:-1] + pattern[:-2]).max(1)
        knots = [0, *(np.flatnonzero(bend > tol) + 1).tolist(), P - 1]
        if len(knots) > MAX_SPLITS:
            return list(range(P)), 0.0
    heap = []
    for a, b in zip(knots[:-1], knots[1:]):
        err, at = worst(a, b)
        heapq.heappush(heap, (-err, a, b, at))
    while heap and -heap[0][0] > tol and len(knots) < max(2, min(max_knots, MAX_SPLITS)):
        _, a, b, at = heapq.heappop(heap)
        knots.append(at)
        for lo, hi in ((a, at), (at, b)):
            err, where = worst(lo, hi)
            heapq.heappush(heap, (-err, lo, hi, where))
    if heap and -heap[0][0] > tol and max_knots >= P:  # out of splits, not of knots: every step fits, keep them all
        return list(range(P)), 0.0
    return sorted(knots), (-heap[0][0] if heap else 0.0)


def knot_bytes(column):
    """Stored bytes per knot of `column`: its step (int32) and its values."""
    return 4 + (column[:1].numel() if column.dim() > 1 else 1) * column.element_size()


def encode(column, max_knots=None, tolerance=EXACT):
    """(tensors, error): `column` (T,) or (T, C) float or int as {"span": [T, P], "knot_steps": (K,) int32,
    "knot_values": (K,) or (K, C)}, and the largest error decode() leaves: relative to each column's largest |value|
    for floats, in units for ints (0.0: exact). Knots are added until a float column is within `tolerance` of its
    peak (ints: exact) or max_knots are placed (None: no limit)."""
    T = column.shape[0]
    rows = (column if column.dim() == 2 else column[:, None]).numpy()
    P = _period(rows)
    pattern = rows[:P].astype(np.float64)
    is_float = column.dtype.is_floating_point
    scale = np.maximum(np.abs(pattern).max(0), np.finfo(np.float64).tiny) if is_float and P else 1.0
    knots, err = _knots(pattern / scale, P if max_knots is None else max_knots, max(tolerance, EXACT) if is_float else 0.25)
    idx = torch.tensor(knots, dtype=torch.int64)
    values = column[:P][idx] if is_float else column[:P][idx].to(torch.int32 if P == 0 or int(column.abs().max()) < 2**31 else torch.int64)
    tensors = {"span": torch.tensor([T, P], dtype=torch.int64), "knot_steps": idx.to(torch.int32), "knot_values": values}
    # what decoding really gives (the split's bound is on the scaled pattern, before rounding)
    got = _interpolate(idx, values.to(torch.float64).reshape(len(knots), rows.shape[1]), P).numpy()
    gap = np.abs((got.round() if not is_float else got) - pattern) / scale
    err = float(gap.max()) if P else 0.0
    return tensors, (err if err > (EXACT if is_float else 0.0) else 0.0)


def decode(tensors, dtype, where, max_values=MAX_VALUES):
    """The column encode() stored, as `dtype` (bool: nonzero), written straight into the result a block of the period
    at a time; ValueError naming `where` on tensors that do not describe one or that decode to more than max_values."""
    span, steps, values = (tensors.get(k) for k in ("span", "knot_steps", "knot_values"))
    if not all(isinstance(t, torch.Tensor) for t in (span, steps, values)) or span.dtype != torch.int64 or span.shape != (2,) \
            or steps.dtype not in (torch.int32, torch.int64) or steps.dim() != 1 or values.dim() not in (1, 2) \
            or values.shape[0] != steps.numel() or (values.dtype.is_floating_point != dtype.is_floating_point):
        raise ValueError(f"history: {where}: a schedule column's knots are malformed")
    T, P = (int(v) for v in span)
    width = values.shape[1] if values.dim() == 2 else 1
    if not (0 <= P <= T and T * max(width, 1) <= max_values and (P > 0 or T == 0)):
        raise ValueError(f"history: {where}: a schedule column spans {T} steps of {width} values with period {P} (at most {max_values} values)")
    s = steps.to(torch.int64)
    if P and (s.numel() < 1 or int(s[0]) != 0 or int(s[-1]) != P - 1 or bool((s[1:] <= s[:-1]).any())) or (not P and s.numel()):
        raise ValueError(f"history: {where}: a schedule column's knot steps must rise from 0 to {P - 1}")
    if values.dtype.is_floating_point and not bool(torch.isfinite(values).all()):
        raise ValueError(f"history: {where}: a schedule column holds a non-finite value")
    v = values.to(torch.float64)
    v = v if v.dim() == 2 else v[:, None]
    out = torch.empty((T, width), dtype=dtype)
    reps, rest = divmod(T, P) if P else (0, 0)
    for a in range(0, P, DECODE_BLOCK):
        b = min(a + DECODE_BLOCK, P)
        block = _interpolate_at(s, v, torch.arange(a, b))
        if not bool(torch.isfinite(block).all()):  # (finite knots near float64's limit can interpolate to inf)
            raise ValueError(f"history: {where}: a schedule column's knots interpolate to a non-finite value")
        block = (block if dtype.is_floating_point else block.round()).to(dtype)
        out[: reps * P].view(reps, P, width)[:, a:b] = block
        if rest > a:
            out[reps * P + a : reps * P + min(b, rest)] = block[: min(b, rest) - a]
    return out.reshape((T,) + tuple(values.shape[1:]))


def _interpolate(steps, values, P):
    """(P, C) float64: the piecewise-linear interpolant of knots at `steps` (int64, rising from 0 to P - 1) with
    `values` (K, C) float64, at 0..P-1 (at a knot its value exactly)."""
    return values[:0] if P == 0 else _interpolate_at(steps, values, torch.arange(P, dtype=torch.int64))


def _interpolate_at(steps, values, t):
    """The same interpolant at the positions t (int64, within 0..P-1)."""
    right = torch.searchsorted(steps, t).clamp(max=steps.numel() - 1)  # the knot at or after t
    left = torch.where(steps[right] == t, right, right - 1).clamp(min=0)
    frac = ((t - steps[left]).to(torch.float64) / (steps[right] - steps[left]).clamp(min=1).to(torch.float64))[:, None]
    return values[left] + (values[right] - values[left]) * frac


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())
