"""Gradient history: what a recording holds, how it is stored, and how it is loaded back (recording.py records it).

A GradientHistory has up to three sections (each method reads only what it needs, and reports the
bytes it read):
  schedule   always: initial parameters w_0, every step's batch indices and learning rates, the
             optimizer's class and hyper-parameters (what `retrain` replays).
  trajectory kind="full": every step's batch gradient g_t as the optimizer stepped on it (the parameters w_t are
             rebuilt from w_0 and them, methods/trajectory.py).
  summary    kind="full" or "minimal": at the final parameters w*, the full-data loss gradient g* and a
             rank-k sketch of the loss curvature (Gauss-Newton eigenpairs U, Lambda, and the mean
             curvature left off their span); plus a few evenly spaced parameter checkpoints with the
             full-data gradient and the curvature along U there: what Mini-Unlearning reads
             (docs/mini_unlearning.md).
Float vectors are stored through a codec (fp32, bf16, int8, int4; int codecs use the blockwise ops).
save() / load() go through store.py (crash-safe versions, checksummed end to end, no pickle;
docs/storage.md); format-1 directories (torch.save files + manifest.json) are still read, read-only.
"""
import bisect
import dataclasses
import hashlib
import io
import json
import math
import os
import re

import numpy as np
import torch

from . import columns, ops, store

CODECS = ("fp32", "bf16", "int8", "int4")
KINDS = ("full", "minimal", "first_epoch", "all_epochs")
ROW_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class HistoryPolicy:
    """What HistoryRecorder keeps.

    kind:
      "full"        schedule + every step's gradient g_t + the final summary (retrain, deltagrad, mini)
      "minimal"     schedule + the final summary only (mini; at most a few % of "full")
      "first_epoch" per-sample gradients of `params` during the first epoch (language-model ascent)
      "all_epochs"  the same for every epoch (the multi-epoch baseline)
    codec: storage of recorded float vectors: fp32 (uncompressed; float64 models stay float64),
      bf16, int8 or int4 (blockwise absmax, `blocksize` values per scale). None: fp32 for the
      trajectory kinds (DeltaGrad replays them), int8 for the per-sample kinds.
    blocksize: values per scale for the int codecs. None: 256, or 4096 for the per-sample kinds,
      whose rows are long (one float32 scale per 4096 values makes int8 3.996x smaller than fp32;
      256 gives 3.94x; benchmarks/results/lm_unlearning.md measures both).
    rank: number of curvature eigenpairs in the summary; None sizes it to the training run:
      min(p, max(16, steps // 3)) with 8-bit eigenvectors, about 1/12 of the full trajectory's
      bytes (docs/mini_unlearning.md).
    budget_vectors: the most bytes Mini's summary may take, counted in int8 vectors of the model's size, whatever
      the run's length (checkpoints thinned, rank capped; docs/mini_unlearning.md). None: methods.mini's
      DEFAULT_BUDGET_VECTORS, 64 (logistic regression's requests model the directions off the stored basis
      from the formed curvature matrix; other models by Krylov blocks per request).
    summary_codec: storage of the summary's eigenvectors and parameter checkpoints (int8 default;
      both are decoded and re-orthonormalised / re-evaluated consistently, docs/mini_unlearning.md).
    params: which parameters the per-sample kinds record: a preset ("embeddings", "last_blocks:N",
      "all") or a list of name patterns (fnmatch).
    """

    kind: str = "full"
    codec: str = None
    blocksize: int = None
    rank: object = None
    budget_vectors: int = None
    summary_codec: str = "int8"
    params: object = "all"
    per_sample: bool = False
    activations: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"HistoryPolicy: kind must be one of {KINDS}, got {self.kind!r}")
        per_sample_kind = self.kind in ("first_epoch", "all_epochs")
        if self.codec is None:
            object.__setattr__(self, "codec", "int8" if per_sample_kind else "fp32")
        if self.blocksize is None:
            object.__setattr__(self, "blocksize", 4096 if per_sample_kind else 256)
        bs = self.blocksize
        if not (isinstance(bs, int) and 32 <= bs <= 4096 and bs & (bs - 1) == 0):
            raise ValueError(f"HistoryPolicy: blocksize must be a power of two in [32, 4096], got {bs!r}")
        if self.codec not in CODECS:
            raise ValueError(f"HistoryPolicy: codec must be one of {CODECS}, got {self.codec!r}")
        if self.summary_codec not in CODECS:
            raise ValueError(f"HistoryPolicy: summary_codec must be one of {CODECS}, got {self.summary_codec!r}")
        if self.budget_vectors is not None and not (isinstance(self.budget_vectors, int) and self.budget_vectors >= 1):
            raise ValueError(f"HistoryPolicy: budget_vectors must be a positive int or None, got {self.budget_vectors!r}")
        if self.rank is not None and not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise ValueError(f"HistoryPolicy: rank must be a positive int or None, got {self.rank!r}")


# ----------------------------------------------------------------------------- flat parameter helpers
def eager_module(model):
    """The module a torch.compile wrapper runs (its _orig_mod, through nested wrappers), else model itself. Histories
    name parameters as the eager module does (no "_orig_mod." prefix), so that a compiled model and its eager original
    are one model to them: record either, unlearn either."""
    while isinstance(model, torch.nn.Module) and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module) and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod
    return model


def param_spec(model):
    return [(name, list(p.shape), str(p.dtype).replace("torch.", "")) for name, p in model.named_parameters() if p.requires_grad]


def _momenta_as_recorded(momenta, meta):
    """Whether every step's momentum is its group's setting in meta (what the replay keeps when none is recorded)."""
    groups = meta.get("optimizer", {}).get("groups", [])
    fixed = [g.get("betas", [None])[0] if "betas" in g else g.get("momentum") for g in groups]
    return len(fixed) == momenta.shape[1] and all(isinstance(m, (int, float)) for m in fixed) and \
        bool((momenta == torch.tensor(fixed, dtype=momenta.dtype)).all())


def saved_buffers(model):
    """The model's persistent buffers (what its state_dict holds besides parameters: batch norm's running statistics), copies."""
    kept = set(model.state_dict(keep_vars=True))
    return {name: b.detach().clone() for name, b in model.named_buffers() if name in kept}


def restore_buffers(model, buffers, who="history"):
    """Copy `buffers` (saved_buffers of the recorded model at step 0) into the model's: a replay from w0 starts from the
    statistics training started from, not from the trained model's (which carry every trained sample, forgotten ones too).
    ValueError naming the buffer if the model's are others."""
    if not buffers:
        return
    own = dict(model.named_buffers())
    for name, value in buffers.items():
        b = own.get(name)
        if b is None or b.shape != value.shape or b.dtype != value.dtype:
            raise ValueError(f"{who}: recorded buffer {name!r} {tuple(value.shape)} {value.dtype} is not the model's "
                             f"({'missing' if b is None else f'{tuple(b.shape)} {b.dtype}'}); recorded for another model")
        with torch.no_grad():
            b.copy_(value)


def check_parameters(recorded, model, who):
    """ValueError (prefixed `who`) unless model's trainable parameters are `recorded` (a param_spec): same names,
    shapes, dtypes, in order. A recorded parameter that is frozen now is named as such."""
    spec = [list(s) for s in param_spec(model)]
    recorded = [list(s) for s in recorded]
    if spec == recorded:
        return
    trainable = {s[0] for s in spec}
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad and name in {s[0] for s in recorded} - trainable]
    if frozen:
        raise ValueError(f"{who}: recorded parameter {frozen[0]!r} is frozen in model (requires_grad=False); the history covers the "
                         "parameters trainable when recording began: make it trainable again (requires_grad_(True))")
    diff = next(((a, b) for a, b in zip(recorded, spec) if a != b), (recorded[len(spec):], spec[len(recorded):]))
    raise ValueError(
        f"{who}: recorded for another model (recorded parameter {diff[0]} vs model parameter {diff[1]}; "
        f"{len(recorded)} recorded vs {len(spec)} model parameters)"
    )


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def flat_grads(model):
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in model.parameters() if p.requires_grad]
    )


def checkpoint_capacity(steps):
    """How many parameter checkpoints the recorder may hold after `steps` steps: about steps / 48, 4..24
    (it keeps between half of that and that many, evenly spaced)."""
    return max(4, min(24, steps // 48))


class CheckpointGrid:
    """Which steps a kind="minimal" recorder keeps parameter checkpoints of, decided without knowing the run's
    length: every power-of-two step (training moves fastest at the start) and an even grid of spacing `every`;
    when the grid holds more than checkpoint_capacity(steps) points, every other one is dropped and the spacing
    doubles. The one rule for the recorder (online) and for Mini's preparation of a full history (replayed)."""

    def __init__(self):
        self.every, self.kept = 1, []

    @staticmethod
    def early(step):
        return step & (step - 1) == 0  # 0, 1, 2, 4, 8, ...

    def wants(self, step):
        """Whether offer(step) would take a checkpoint of step `step` (nothing changes)."""
        return step % self.every == 0 or self.early(step)

    def offer(self, step):
        """Step `step` is being recorded: whether to take a checkpoint of it. self.kept is updated (thinned)."""
        take = self.wants(step)
        if take:
            self.kept.append(step)
        # (only a step taken can overfill the grid: the capacity never shrinks as steps go on)
        while take and sum(s % self.every == 0 for s in self.kept) > checkpoint_capacity(step + 1):
            self.every *= 2
            self.kept = [s for s in self.kept if s % self.every == 0 or self.early(s)]
        return take


def checkpoint_steps(steps):
    """The steps a kind="minimal" recorder keeps for a run of `steps` steps."""
    grid = CheckpointGrid()
    for step in range(steps):
        grid.offer(step)
    return grid.kept


def weights_digest(model):
    """sha256 of a model's trainable parameters, bit for bit: binds a history to the model it trained and
    each logged request to the model it produced."""
    h = hashlib.sha256()
    for p in model.parameters():
        if p.requires_grad:
            h.update(str(p.dtype).encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # hashed in place: no copy
    return h.hexdigest()


def set_flat_params(model, flat):
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


# ----------------------------------------------------------------------------- encoded rows
class EncodedRows:
    """A (rows, p) float matrix stored through a codec; rows decode one at a time or all at once."""

    def __init__(self, tensors, codec, blocksize, p, dtype):
        self.tensors, self.codec, self.blocksize, self.p, self.dtype = tensors, codec, blocksize, p, dtype

    @classmethod
    def cat(cls, parts):
        """The rows of several EncodedRows of one codec, blocksize and width, in order (rows are encoded independently)."""
        first = parts[0]
        tensors = {key: torch.cat([part.tensors[key] for part in parts]) for key in first.tensors}
        return cls(tensors, first.codec, first.blocksize, first.p, first.dtype)

    @classmethod
    def encode(cls, rows, codec, blocksize):
        rows = rows if isinstance(rows, torch.Tensor) else torch.stack(rows)
        p, dtype = rows.shape[1], rows.dtype
        if codec == "fp32":
            tensors = {"values": rows.to(torch.float64 if dtype == torch.float64 else torch.float32)}
        elif codec == "bf16":
            tensors = {"values": rows.to(torch.bfloat16)}
        else:
            codes, scales = ops.quantize_rows(rows.float(), blocksize, 8 if codec == "int8" else 4)
            tensors = {"codes": codes, "scales": scales}
        return cls(tensors, codec, blocksize, p, dtype)

    @property
    def bits(self):
        return 8 if self.codec == "int8" else 4

    def __len__(self):
        return next(iter(self.tensors.values())).shape[0]

    def row(self, i, out=None):
        """Row i decoded; into `out` (p values, contiguous) where given: a reader decoding row after row into one buffer
        skips a fresh allocation per row, whose page faults cost several times the decode (40 MB rows: 8 ms vs 1.3 ms)."""
        if "values" in self.tensors:
            return self.tensors["values"][i].to(self.dtype) if out is None else out.copy_(self.tensors["values"][i])
        t = self.tensors
        if out is None:
            return ops.dequantize_blockwise(t["codes"][i], t["scales"][i], self.blocksize, self.bits, self.p, self.dtype)
        ops.dequantize_axpy_(out.zero_(), t["codes"][i], t["scales"][i], 1.0, self.blocksize, self.bits)  # 0 + 1 * x: x exactly
        return out

    def all(self):
        if "values" in self.tensors:
            return self.tensors["values"].to(self.dtype)
        return torch.stack([self.row(i) for i in range(len(self))])

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def meta(self):
        return {"codec": self.codec, "blocksize": self.blocksize, "p": self.p, "dtype": str(self.dtype).replace("torch.", "")}


def row_bytes(codec, p, blocksize, dtype):
    """Bytes of one encoded row of p values."""
    if codec == "fp32":
        return p * (8 if dtype == torch.float64 else 4)
    if codec == "bf16":
        return p * 2
    return (p if codec == "int8" else (p + 1) // 2) + 4 * -(-p // blocksize)


class ChunkedRows:
    """Rows stored in consecutive chunks (a streamed recording, or a history loaded from one), with the
    EncodedRows interface methods use. A chunk is an EncodedRows in memory or a part of a stored history,
    read (and verified) when a row of it is first needed; one stored chunk is held at a time, so methods
    that read rows in step order stream the history."""

    def __init__(self, parts, codec, blocksize, p, dtype):
        self.parts = parts  # [(rows, EncodedRows | _StoredRows)]
        self.codec, self.blocksize, self.p, self.dtype = codec, blocksize, p, dtype
        self.starts = [0]
        for n, _ in parts:
            self.starts.append(self.starts[-1] + n)

    def __len__(self):
        return self.starts[-1]

    def _part(self, j):
        src = self.parts[j][1]
        return src if isinstance(src, EncodedRows) else src.load()

    def row(self, i, out=None):
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        j = bisect.bisect_right(self.starts, i) - 1
        return self._part(j).row(i - self.starts[j], out)

    def all(self):
        return torch.cat([self._part(j).all() for j in range(len(self.parts))])

    @property
    def nbytes(self):
        return len(self) * row_bytes(self.codec, self.p, self.blocksize, self.dtype)

    def meta(self):
        return {"codec": self.codec, "blocksize": self.blocksize, "p": self.p, "dtype": str(self.dtype).replace("torch.", "")}


class _StoredRows:
    """One section's rows (e.g. trajectory.g) in a stored chunk part; the part is read through a cache
    shared by the sections, so w and g of one chunk are read once."""

    def __init__(self, cache, part, key, meta, rows, where):
        self.cache, self.part, self.key, self.m, self.rows, self.where = cache, part, key, meta, rows, where

    def load(self):
        tensors = self.cache.get(self.part, self.where)
        prefix = self.key + "."
        rows = _encoded_rows(self.key, self.m, {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}, self.where)
        if len(rows) != self.rows:
            raise ValueError(f"history: {self.where}: a chunk of {self.key} has {len(rows)} rows, its schedule {self.rows} steps")
        return rows


class _PartCache:
    """The last stored chunk part read: what sequential readers of several sections need."""

    def __init__(self, path):
        self.path, self.digest, self.tensors = path, None, None

    def get(self, part, where):
        if self.digest != part["data"]:
            self.tensors, self.digest = None, None  # drop the previous chunk before reading the next
            self.tensors, self.digest = store.read_part(self.path, part, where), part["data"]
        return self.tensors


# ----------------------------------------------------------------------------- the history
SCHEDULE_COLUMNS = ("batch_sizes", "momenta", "lrs")  # a minimal history's per-step columns, in the order bound_schedule gives them bytes
SPAN_BYTES = 16  # each stored column's span (int64 T, P)
SEEN_MAX_VALUES = 2**28  # a trained-sample mask stored as knots decodes to at most this many samples (256 MB; larger ones as bits)
# a saved history splits its steps into chunks of at most this many steps and about this many bytes of rows:
# a chunk is read (and verified) whole, so it bounds the memory a streaming reader holds
CHUNK_STEPS = 1024
CHUNK_BYTES = 64 << 20


class GradientHistory:
    """Recorded training history; see the module docstring for its sections.

    schedule: {"w0": (p,), "lrs": (T, groups) float64, "batch_sizes": (T,) int64, "micro_counts": (T,) int64 and
    "micro_sizes" (the micro-batches of gradient-accumulation steps: how many, and the sizes of those with more
    than one, in order; absent in older histories), "momenta": (T, groups) float64 (each step's momentum, or Adam's
    beta1, where a scheduler cycled it: absent when it stayed as recorded in meta), "rng_states": (T, state bytes) uint8
    (the random generator's state at each step's first training forward, kind "full" of a model with dropout), and either
    "batches": [LongTensor] (the order of every batch: kind "full") or "seen": (n_train,) bool (which
    samples were trained on: kind "minimal", whose methods do not replay batches)}."""

    def __init__(self, meta, schedule, trajectory=None, summary=None):
        self.meta = meta  # policy, param_spec, optimizer, n_train, weight_decay, momentum
        if "batch_sizes" not in schedule and "batches" in schedule:
            schedule = dict(schedule, batch_sizes=torch.tensor([len(b) for b in schedule["batches"]], dtype=torch.int64))
        if "momenta" in schedule and _momenta_as_recorded(schedule["momenta"], meta):
            schedule = {k: v for k, v in schedule.items() if k != "momenta"}  # the settings in meta say it all
        self.schedule = schedule
        self.trajectory = trajectory  # {"g": EncodedRows | ChunkedRows} or None (histories of format <= 4 also hold "w")
        self.summary = summary  # {"w_star", "g_star", "eigvecs": EncodedRows, "eigvals", "rho", checkpoints, "response"} or None
        self.chunk_marks = {}  # chunk index -> resume mark (weights digest) of a streamed recording
        self.chunk_steps = []  # steps of each stored chunk (a loaded history)
        self.recording_id = None  # a recording still being streamed (or killed): HistoryRecorder.resume continues it
        self._seen = None  # seen_mask(), computed on first use (the schedule does not change after recording)
        self.columns = {}  # schedule column -> its stored knots (columns.py) where bound_schedule or load set them
        # deletion requests served from this history, oldest first: {"forget": [int], "method": str, "model_digest": str}
        self.requests = []
        self.path = None  # the directory this history was saved to or loaded from; append_request logs there
        self._content = None  # store digest of the history at `path` (append_request checks it is still there)

    def append_request(self, forget, method, model_digest):
        """Log a served request (append-only): durably in the history's directory when it was saved to
        or loaded from one (self.path; a crash never loses earlier entries), else in memory."""
        request = {"forget": [int(i) for i in forget], "method": str(method), "model_digest": str(model_digest)}
        if self.path is None:
            self.requests.append(request)
        else:
            self.requests = store.append(self.path, "GradientHistory", request, self._content)

    # -- facts methods rely on
    @property
    def num_steps(self):
        return len(self.schedule["lrs"])

    @property
    def n_train(self):
        return self.meta["n_train"]

    @property
    def complete(self):
        """False for a recording that did not finish (loaded from what a killed run streamed to disk)."""
        return "final_digest" in self.meta

    def nbytes(self, section):
        def size(v):
            if isinstance(v, (EncodedRows, ChunkedRows)):
                return v.nbytes
            if isinstance(v, torch.Tensor):
                return v.numel() * v.element_size()
            if isinstance(v, (list, dict)):  # (batches; buffers0)
                return sum(size(x) for x in (v.values() if isinstance(v, dict) else v))
            return 0

        part = getattr(self, section)
        if section == "schedule" and part is not None:  # as stored: columns by their knots, seen as knots or bits
            return sum(self.column_bytes(k) if k in self.columns else -(-v.numel() // 8) if k == "seen" else size(v) for k, v in part.items())
        return 0 if part is None else sum(size(v) for v in part.values())

    def column_bytes(self, name):
        """Bytes of schedule column `name` as stored: its knots (bound_schedule, load), else its values."""
        code = self.columns.get(name)
        return columns.nbytes(code) if code is not None else self.schedule[name].numel() * self.schedule[name].element_size()

    def bound_schedule(self, max_bytes, tolerance):
        """Store the per-step columns of a history without batch order (kind="minimal") as knots (columns.py): each
        float column to `tolerance` of its peak, all in at most max_bytes (None: no limit), and replace them by what
        the knots decode to, so that this history and a saved and loaded one hold the same schedule. Batch sizes and
        momenta first (usually a few exact knots), the learning rates get what is left. Returns {column: error} of
        the columns not exact (also meta["schedule_error"])."""
        names = [n for n in SCHEDULE_COLUMNS if n in self.schedule]
        left, errors = max_bytes, {}
        for i, name in enumerate(names):
            column = self.schedule[name]
            cap = None if left is None else max(2, int((left // (len(names) - i) - SPAN_BYTES) // columns.knot_bytes(column)))
            code, err = columns.encode(column, cap, tolerance)
            self.columns[name] = code
            self.schedule[name] = columns.decode(code, column.dtype, "bound_schedule")
            if err:
                errors[name] = err
            if left is not None:
                left -= columns.nbytes(code)
        self.meta["schedule_error"] = errors
        return errors

    def compact_seen(self):
        """Store which samples were trained on as knots (exact) where that is at least 256 bytes smaller than its bits
        (3 tensors instead of 1 also take 3 entries of the file's JSON header, about 80 bytes each): a run that trained
        on every sample, or all but a few blocks. Counted by nbytes("schedule"), written by save()."""
        seen = self.schedule.get("seen")
        if seen is None or seen.numel() < 2:
            return
        bits = -(-seen.numel() // 8)
        runs = 1 + int((seen[1:] != seen[:-1]).sum())  # (a random subset: skip the encoding, bits win)
        if SPAN_BYTES + (2 * runs + 2) * 8 + 256 < bits and seen.numel() <= SEEN_MAX_VALUES:
            code = columns.encode(seen.to(torch.int32))[0]
            if columns.nbytes(code) + 256 < bits:
                self.columns["seen"] = code

    def seen_mask(self):
        """(n_train,) bool: which samples some recorded batch contains (kept: every request checks it)."""
        if self._seen is None:
            if "seen" in self.schedule:
                self._seen = self.schedule["seen"]
            else:
                seen = torch.zeros(self.n_train, dtype=torch.bool)
                seen[torch.cat(self.schedule["batches"])] = True  # scatter, not unique: no sort (0.1 vs 0.7 ms on digits)
                self._seen = seen
        return self._seen

    def check_model(self, model):
        """Raise ValueError if this history was recorded for a model with other parameters."""
        check_parameters(self.meta["param_spec"], model, "history")

    def step_settings(self, t):
        """Step t's recorded learning rates, and momenta (None unless a scheduler cycled them), as lists per group."""
        momenta = self.schedule.get("momenta")
        return self.schedule["lrs"][t].tolist(), (None if momenta is None else momenta[t].tolist())

    def require(self, section, method):
        if section == "batches":
            if "batches" not in self.schedule:
                raise ValueError(f"{method} replays the recorded batches, which a kind='minimal' history does not store: record with HistoryPolicy(kind='full')")
            return
        if getattr(self, section) is None:
            kind = "full" if section == "trajectory" else "full' or 'minimal"
            raise ValueError(f"{method} needs the history's {section}: record with HistoryPolicy(kind='{kind}')")

    # -- storage
    def _chunk_bounds(self):
        """[(first step, end step)] of the chunks a save writes: a streamed trajectory's own chunks, else
        at most CHUNK_STEPS steps and about CHUNK_BYTES of rows each."""
        T, traj = self.num_steps, self.trajectory
        rows = next(iter(traj.values())) if traj else None
        if isinstance(rows, ChunkedRows):
            starts = rows.starts
            return list(zip(starts[:-1], starts[1:])) or [(0, 0)]
        step = CHUNK_STEPS
        if traj:
            step = max(1, min(step, CHUNK_BYTES // max(1, sum(rows.nbytes for rows in traj.values()) // max(1, T))))
        return [(a, min(a + step, T)) for a in range(0, T, step)] or [(0, 0)]

    def _micro_ends(self):
        """Where each step's micro-batch sizes end in schedule["micro_sizes"] (None without them): computed once per save."""
        counts = self.schedule.get("micro_counts")
        return None if counts is None else torch.cumsum(torch.where(counts > 1, counts, 0), 0)

    def _schedule_part(self, a, b, micro_ends):
        sched = self.schedule
        part = {"schedule.lrs": sched["lrs"][a:b], "schedule.batch_sizes": sched["batch_sizes"][a:b].to(torch.int32)}
        if "momenta" in sched:
            part["schedule.momenta"] = sched["momenta"][a:b]
        if "rng_states" in sched:
            part["schedule.rng_states"] = sched["rng_states"][a:b]
        if micro_ends is not None:
            first, last = (int(micro_ends[a - 1]) if a else 0), (int(micro_ends[b - 1]) if b else 0)
            part["schedule.micro_counts"] = sched["micro_counts"][a:b].to(torch.int32)
            part["schedule.micro_sizes"] = sched["micro_sizes"][first:last].to(torch.int32)
        if "batches" in sched:
            part["schedule.batch_indices"] = compact_indices(torch.cat(sched["batches"][a:b]) if b > a else torch.zeros(0, dtype=torch.int64))
        return part

    def _rows_part(self, j, a, b):
        """Chunk j's trajectory rows: the stored part itself when both sections come from one (no copy
        through memory), else the tensors."""
        traj = self.trajectory
        if not traj:
            return None
        if isinstance(next(iter(traj.values())), ChunkedRows):
            sources = [rows.parts[j][1] for rows in traj.values()]
            if all(isinstance(src, _StoredRows) for src in sources) and len({src.part["data"] for src in sources}) == 1:
                part = sources[0].part
                return store.StoredPart(sources[0].cache.path, part["data"], part["tensors"])
            pieces = {key: rows._part(j) for key, rows in traj.items()}
        else:
            pieces = {key: EncodedRows({n: t[a:b] for n, t in rows.tensors.items()}, rows.codec, rows.blocksize, rows.p, rows.dtype)
                      for key, rows in traj.items()}
        return {f"trajectory.{key}.{n}": t for key, rows in pieces.items() for n, t in rows.tensors.items()}

    def save(self, path):
        """Write to directory `path` as a new version (store.py: crash-safe, checksummed, no pickle;
        docs/storage.md), with the request log; later append_request calls log there. Returns path."""
        head = {"schedule.w0": self.schedule["w0"], **{f"buffers0.{n}": b for n, b in self.schedule.get("buffers0", {}).items()}}
        if "seen" in self.columns:
            head.update({f"schedule.seen.{part}": t for part, t in self.columns["seen"].items()})
        elif "seen" in self.schedule:
            head["schedule.seen"] = pack_bits(self.schedule["seen"])
        encoded = {f"trajectory.{key}": rows.meta() for key, rows in (self.trajectory or {}).items()}
        for key, value in (self.summary or {}).items():
            if isinstance(value, EncodedRows):
                encoded[f"summary.{key}"] = value.meta()
                head.update({f"summary.{key}.{n}": t for n, t in value.tensors.items()})
            else:
                head[f"summary.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        chunks, micro_ends = [], self._micro_ends()
        if "batches" not in self.schedule:
            # no batch order to replay (kind="minimal"): the per-step columns as knots in the head (bound_schedule's,
            # else exact): a constant, step or periodic schedule costs a few bytes whatever the number of steps
            for name, column in self._schedule_part(0, self.num_steps, micro_ends).items():
                key = name[len("schedule."):]
                code = self.columns[key] if key in self.columns else columns.encode(column)[0]
                head.update({f"{name}.{part}": t for part, t in code.items()})
        for j, (a, b) in enumerate(self._chunk_bounds() if "batches" in self.schedule else ()):
            parts = {"schedule": self._schedule_part(a, b, micro_ends)}
            rows = self._rows_part(j, a, b)
            if rows is not None:
                parts["rows"] = rows
            chunks.append((b - a, self.chunk_marks.get(j), parts))
        self._content = store.write(path, "GradientHistory", {"meta": self.meta, "encoded": encoded}, head, self.requests, chunks)
        self.path = path
        return path

    @classmethod
    def load(cls, path):
        """Read a history written by save() or streamed by a recorder; ValueError on a missing, corrupted,
        inconsistent or crafted one (nothing in the files is executed). Trajectory rows are read chunk by
        chunk when a method first needs them. A format-1 directory is read read-only (path stays None)."""
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path: must be a str or os.PathLike naming a history directory, got {type(path).__name__}")
        if os.path.isfile(os.path.join(path, "manifest.json")) and not os.path.lexists(os.path.join(path, store.CURRENT)):
            return cls._load_format1(path)
        snap = store.read(path, "GradientHistory")
        where = f"{path!r}"
        try:
            arrays, parts = dict(snap.tensors), None
            if snap.chunks:  # version 3: the schedule and the trajectory in chunks
                scheds = [store.read_part(path, c["parts"]["schedule"], where) if "schedule" in c["parts"] else {} for c in snap.chunks]
                for name in ("schedule.lrs", "schedule.momenta", "schedule.rng_states", "schedule.batch_sizes", "schedule.batch_indices", "schedule.micro_counts",
                             "schedule.micro_sizes"):
                    got = [sc[name] for sc in scheds if name in sc]
                    if got:
                        if len(got) != len(scheds):
                            raise ValueError(f"history: {where}: {name} is missing from some chunks")
                        arrays[name] = torch.cat(got)
                cache = _PartCache(path)
                parts = [(c["steps"], c["parts"].get("rows")) for c in snap.chunks]
                parts = [(n, part, cache) for n, part in parts]
            for name in [n[: -len(".values")] for n in arrays if n.startswith("schedule.") and n.endswith(".values")]:
                # (minimal histories saved before 2026-12-07: run-length encoded columns)
                arrays[name] = expand_runs(arrays.pop(f"{name}.values"), arrays.pop(f"{name}.lengths", None), name, where)
            codes = {}
            for name in [n[: -len(".knot_values")] for n in arrays if n.startswith("schedule.") and n.endswith(".knot_values")]:
                if name in arrays:  # (a column stored twice, in two layouts: which one would be the truth?)
                    raise ValueError(f"history: {where}: {name} is stored both as knots and as values")
                code = {part: arrays.pop(f"{name}.{part}", None) for part in ("span", "knot_steps", "knot_values")}
                is_float = isinstance(code["knot_values"], torch.Tensor) and code["knot_values"].dtype.is_floating_point
                if name == "schedule.seen":  # (one value a sample: decoded as a mask, 0 / 1 knots only)
                    knots = code["knot_values"]
                    if not isinstance(knots, torch.Tensor) or is_float or bool(((knots != 0) & (knots != 1)).any()):
                        raise ValueError(f"history: {where}: schedule.seen's knots must be 0 / 1 integers")
                    arrays[name] = columns.decode(code, torch.bool, f"{where}: {name}", SEEN_MAX_VALUES)
                else:
                    arrays[name] = columns.decode(code, torch.float64 if is_float else torch.int64, f"{where}: {name}")
                codes[name[len("schedule."):]] = code
            history = cls._from_arrays(snap.info["meta"], snap.info["encoded"], arrays, where, parts)
            history.columns = codes
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"history: manifest in {path!r} lacks or mangles entry {err!r}") from None
        history.chunk_marks = {j: c["mark"] for j, c in enumerate(snap.chunks) if c["mark"] is not None}
        history.chunk_steps = [c["steps"] for c in snap.chunks]
        history.recording_id = snap.info.get("recording")  # set while a recorder streams to path (not finished)
        history.requests, history.path, history._content = snap.requests, path, snap.content
        return history

    @classmethod
    def _load_format1(cls, path):
        """Format 1: manifest.json (no checksum of its own) naming one torch.save file per array with its
        sha256. Names are confined to `path`, each file is read once and hashed from those bytes, and
        torch.load runs with weights_only=True on them (no code from the file)."""
        try:
            manifest = json.loads(store.read_file(os.path.join(path, "manifest.json")))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"history: manifest.json in {path!r} is corrupted ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != 1:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise ValueError(f"history: format_version {version!r} in {path!r}, expected {store.FORMAT_VERSION} (or 1)")
        try:
            arrays = {}
            for name, entry in manifest["files"].items():
                fname = entry["file"]
                if not (isinstance(fname, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", fname)):
                    raise ValueError(f"history: file name {fname!r:.200} in {path!r}/manifest.json is not a plain name inside the history")
                fpath = os.path.join(path, fname)
                try:
                    raw = store.read_file(fpath)
                except FileNotFoundError:
                    raise ValueError(f"history: file {fname} listed in the manifest is missing from {path!r}") from None
                if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
                    raise ValueError(f"history: file {fpath} is corrupted (sha256 mismatch)")
                try:
                    tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
                except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on foreign bytes
                    raise ValueError(f"history: file {fpath} is not a tensor saved by format 1 ({type(err).__name__})") from None
                if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != entry["shape"] or str(tensor.dtype) != entry["dtype"]:
                    raise ValueError(f"history: file {fpath} does not hold the {entry['dtype']} tensor of shape {entry['shape']} its manifest lists")
                arrays[name] = tensor
            return cls._from_arrays(manifest["meta"], manifest["encoded"], arrays, f"{path!r}")
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"history: manifest.json in {path!r} lacks or mangles entry {err!r}") from None

    @classmethod
    def _from_arrays(cls, meta, encoded, arrays, where, chunks=None):
        """The history of stored arrays, checked for consistency (a crafted file gets a ValueError naming
        the array, not an IndexError deep inside a method). chunks: [(steps, rows part or None, cache)] of a
        version-3 history, whose trajectory rows stay on disk until read."""
        if not isinstance(meta, dict) or not isinstance(encoded, dict):
            raise ValueError(f"history: {where}: meta and encoded must be JSON objects")
        check_meta(meta, where)
        ints, floats = (torch.int64, torch.int32), tuple(ROW_DTYPES.values())
        sizes = store.check_tensor(arrays, "schedule.batch_sizes", where, ints, 1).to(torch.int64)
        lrs = store.check_tensor(arrays, "schedule.lrs", where, (torch.float64,), 2)
        w0 = store.check_tensor(arrays, "schedule.w0", where, floats, 1)
        n_params = sum(int(torch.Size(shape).numel()) for _, shape, _ in meta["param_spec"])
        n_train = meta.get("n_train")  # None in a recording that did not finish
        if not (n_train is None or (type(n_train) is int and n_train >= 0)):
            raise ValueError(f"history: {where}: n_train must be a non-negative int, got {n_train!r:.60}")
        dist_meta = meta.get("distributed")
        if dist_meta is not None and not (isinstance(dist_meta, dict) and type(dist_meta.get("world_size")) is int
                                          and 1 <= dist_meta["world_size"] <= 2**20):
            # (its world size splits every replayed batch and generator-state row into ranks)
            raise ValueError(f"history: {where}: meta['distributed'] must hold the world size as an int in [1, 2**20], got {dist_meta!r:.100}")
        if bool((sizes < 0).any()) or lrs.shape[0] != sizes.numel():
            raise ValueError(f"history: {where}: schedule.batch_sizes ({sizes.numel()} steps) disagrees with schedule.lrs ({lrs.shape[0]} steps)")
        if w0.numel() != n_params:
            raise ValueError(f"history: {where}: schedule.w0 has {w0.numel()} values, the recorded parameters {n_params}")
        schedule = {"w0": w0, "lrs": lrs, "batch_sizes": sizes}
        buffers = {n[len("buffers0."):]: arrays[n] for n in arrays if n.startswith("buffers0.")}
        if buffers:  # (checked against the model when a replay restores them; histories before 2026-12-05 hold none)
            schedule["buffers0"] = buffers
        if "schedule.momenta" in arrays:
            momenta = store.check_tensor(arrays, "schedule.momenta", where, (torch.float64,), 2)
            if momenta.shape != lrs.shape or not bool((momenta >= 0).all()) or not bool(torch.isfinite(momenta).all()):
                raise ValueError(f"history: {where}: schedule.momenta must hold a finite momentum >= 0 per step and group, like schedule.lrs "
                                 f"{tuple(lrs.shape)}, got shape {tuple(momenta.shape)}")
            schedule["momenta"] = momenta
        if "schedule.rng_states" in arrays:  # (set as a generator's state only through torch's own checks: no code, no pickle)
            states = store.check_tensor(arrays, "schedule.rng_states", where, (torch.uint8,), 2)
            if states.shape[0] != lrs.shape[0]:
                raise ValueError(f"history: {where}: schedule.rng_states has {states.shape[0]} rows for {lrs.shape[0]} steps")
            schedule["rng_states"] = states
        if "schedule.batch_indices" in arrays:
            indices = store.check_tensor(arrays, "schedule.batch_indices", where, ints, 1).to(torch.int64)
            if int(sizes.sum()) != indices.numel():
                raise ValueError(f"history: {where}: schedule.batch_sizes ({int(sizes.sum())} samples) disagrees with schedule.batch_indices ({indices.numel()})")
            if indices.numel() and not (0 <= int(indices.min()) and (n_train is None or int(indices.max()) < n_train)):
                raise ValueError(f"history: {where}: schedule.batch_indices reaches outside the {n_train} training samples")
            schedule["batches"] = list(torch.split(indices, sizes.tolist())) if sizes.numel() else []
        if "schedule.micro_counts" in arrays:  # gradient accumulation: micro-batches per step and their sizes
            counts = store.check_tensor(arrays, "schedule.micro_counts", where, ints, 1).to(torch.int64)
            micro = store.check_tensor(arrays, "schedule.micro_sizes", where, ints, 1).to(torch.int64)
            accumulated = counts > 1
            if counts.numel() != sizes.numel() or bool((counts < 1).any()) or int(counts[accumulated].sum()) != micro.numel() or bool((micro < 1).any()) \
                    or (micro.numel() and int(micro.sum()) != int(sizes[accumulated].sum())):
                raise ValueError(f"history: {where}: schedule.micro_counts / micro_sizes do not split the recorded batches")
            schedule["micro_counts"], schedule["micro_sizes"] = counts, micro
        if "schedule.seen" in arrays:
            seen = store.check_tensor(arrays, "schedule.seen", where, (torch.uint8, torch.bool), 1)
            if seen.dtype == torch.bool:  # (stored as knots, decoded by load: one value a sample)
                if n_train is None or seen.numel() != n_train:
                    raise ValueError(f"history: {where}: schedule.seen's knots give {seen.numel()} values for {n_train} training samples")
                schedule["seen"] = seen
            else:
                if n_train is None or seen.numel() != -(-n_train // 8):
                    raise ValueError(f"history: {where}: schedule.seen has {seen.numel()} bytes for {n_train} training samples")
                schedule["seen"] = unpack_bits(seen, n_train)
        if "batches" not in schedule and "seen" not in schedule and n_train is not None:
            raise ValueError(f"history: {where}: the schedule has neither batch_indices nor seen")
        sections = {}
        for section in ("trajectory", "summary"):
            keys = {n.split(".")[1] for n in arrays if n.startswith(section + ".")}
            part = {}
            for key in keys:
                full = f"{section}.{key}"
                if full in encoded:
                    part[key] = _encoded_rows(full, encoded[full], {n.split(".")[2]: t for n, t in arrays.items() if n.startswith(full + ".")}, where)
                else:
                    part[key] = arrays[full]
            sections[section] = part or None
        if chunks is not None:
            sections["trajectory"] = _chunked_trajectory(encoded, chunks, where) or sections["trajectory"]
            if sum(n for n, _, _ in chunks) != sizes.numel():
                raise ValueError(f"history: {where}: the chunks hold {sum(n for n, _, _ in chunks)} steps, the schedule {sizes.numel()}")
        for key, rows in (sections["trajectory"] or {}).items():
            if len(rows) != sizes.numel() or rows.p != n_params:
                raise ValueError(f"history: {where}: trajectory.{key} has {len(rows)} rows of {rows.p} values, expected {sizes.numel()} of {n_params}")
        return cls(meta, schedule, sections["trajectory"], sections["summary"])


def _finite_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# optimizer settings the replays compute with: a finite number each (a crafted None or True failed deep inside torch)
NUMERIC_SETTINGS = ("lr", "momentum", "dampening", "weight_decay", "eps", "alpha", "lr_decay", "rho", "initial_accumulator_value")


def check_meta(meta, where):
    """The parts of meta the methods compute with, by type (a crafted file gets a ValueError naming the field, not a
    TypeError deep inside a replay): the optimizer's class and groups, the loss check, the recorder's features."""
    if not isinstance(meta.get("policy", {}), dict):
        raise ValueError(f"history: {where}: meta['policy'] must be a JSON object, got {type(meta['policy']).__name__}")
    if "optimizer" in meta:
        optimizer = meta["optimizer"]
        groups = optimizer.get("groups") if isinstance(optimizer, dict) else None
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("class"), str) or not isinstance(groups, list) or not groups \
                or not all(isinstance(g, dict) for g in groups):
            raise ValueError(f"history: {where}: meta['optimizer'] must hold a class name and a non-empty list of parameter groups, got {optimizer!r:.200}")
        for i, g in enumerate(groups):
            for key, v in g.items():
                numeric = key in NUMERIC_SETTINGS
                if numeric and not _finite_number(v) or key == "betas" and not (isinstance(v, list) and all(map(_finite_number, v))) \
                        or not numeric and not isinstance(v, (bool, int, float, str, list, type(None))):
                    raise ValueError(f"history: {where}: meta['optimizer']['groups'][{i}]['{key}'] is {v!r:.60}, not a setting the "
                                     "recorder writes (a finite number for learning rates, momentum, decay)")
    check = meta.get("loss_check")
    if check is not None:
        norms = check.get("param_norms", []) if isinstance(check, dict) else None
        if not isinstance(check, dict) or type(check.get("step")) is not int or check["step"] < 0 or not _finite_number(check.get("grad_norm")) \
                or not isinstance(norms, list) or not all(_finite_number(n) and n >= 0 for n in norms) \
                or not (isinstance(check.get("indices", []), list) and all(type(i) is int and i >= 0 for i in check.get("indices", []))):
            raise ValueError(f"history: {where}: meta['loss_check'] must hold a step, its batch's indices and finite gradient norms, got {check!r:.200}")
    recording = meta.get("recording", {})
    eval_modules = recording.get("eval_modules", []) if isinstance(recording, dict) else None
    if not isinstance(eval_modules, list) or not all(isinstance(name, str) for name in eval_modules):
        raise ValueError(f"history: {where}: meta['recording'] must be a JSON object naming the modules trained in eval mode, got {recording!r:.200}")


def _chunked_trajectory(encoded, chunks, where):
    """{key: ChunkedRows} over the rows parts of `chunks`, each checked against its table (shapes only;
    the bytes are verified when read)."""
    keys = sorted(name.split(".")[1] for name in encoded if name.startswith("trajectory."))
    out = {}
    for key in keys:
        m = encoded[f"trajectory.{key}"]
        if not (isinstance(m, dict) and m.get("codec") in CODECS and m.get("dtype") in ROW_DTYPES and type(m.get("p")) is int and type(m.get("blocksize")) is int):
            raise ValueError(f"history: {where}: trajectory.{key} has invalid codec metadata {m!r:.200}")
        parts = []
        for steps, part, cache in chunks:
            if steps == 0 and part is None:  # a flush with no step since the previous chunk: only its mark
                continue
            first = f"trajectory.{key}." + ("values" if m["codec"] in ("fp32", "bf16") else "codes")
            if part is None or part["tensors"].get(first, {}).get("shape", [None])[0] != steps:
                raise ValueError(f"history: {where}: a chunk of {steps} steps lacks its {steps} rows of trajectory.{key}")
            parts.append((steps, _StoredRows(cache, part, f"trajectory.{key}", m, steps, where)))
        out[key] = ChunkedRows(parts, m["codec"], m["blocksize"], m["p"], ROW_DTYPES[m["dtype"]])
    return out


def compact_indices(idx):
    """Sample indices as stored: int32 while they fit (half of int64's bytes), else int64."""
    return idx.to(torch.int32) if idx.numel() == 0 or int(idx.max()) < 2**31 else idx


def expand_runs(values, lengths, name, where):
    """values repeated by their run lengths (the layout of minimal histories saved before 2026-12-07); no lengths:
    every run is one step long."""
    if lengths is None:
        return values
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) or lengths.dim() != 1 \
            or lengths.numel() != values.shape[0] or bool((lengths < 1).any()) or int(lengths.sum()) * max(values[:1].numel(), 1) > columns.MAX_VALUES:
        raise ValueError(f"history: {where}: {name} has run lengths that do not match its values")
    return torch.repeat_interleave(values, lengths.to(torch.int64), dim=0)


def pack_bits(mask):
    """A bool vector as uint8, eight entries a byte (numpy's bit order)."""
    return torch.from_numpy(np.packbits(mask.numpy().astype(bool)))


def unpack_bits(packed, n):
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))


def _encoded_rows(name, m, tensors, where):
    """EncodedRows of stored tensors and their metadata `m`, checked against each other."""
    if not (isinstance(m, dict) and m.get("codec") in CODECS and m.get("dtype") in ROW_DTYPES and type(m.get("p")) is int and type(m.get("blocksize")) is int):
        raise ValueError(f"history: {where}: {name} has invalid codec metadata {m!r:.200}")
    p, bs = m["p"], m["blocksize"]
    if m["codec"] in ("fp32", "bf16"):
        values = store.check_tensor(tensors, "values", f"{where} ({name})", (torch.float32, torch.float64, torch.bfloat16), 2)
        ok = set(tensors) == {"values"} and values.shape[1] == p
    else:
        codes = store.check_tensor(tensors, "codes", f"{where} ({name})", (torch.int8, torch.uint8), 2)
        scales = store.check_tensor(tensors, "scales", f"{where} ({name})", (torch.float32,), 2)
        blocks = -(-p // bs) if bs > 0 else -1
        width = p if m["codec"] == "int8" else (p + 1) // 2  # int4: two codes a byte
        ok = set(tensors) == {"codes", "scales"} and codes.shape[0] == scales.shape[0] and scales.shape[1] == blocks and codes.shape[1] == width
    if not ok:
        raise ValueError(f"history: {where}: the tensors of {name} ({ {k: list(t.shape) for k, t in tensors.items()} }) do not fit its codec {m['codec']} with p={p}, blocksize={bs}")
    return EncodedRows(tensors, m["codec"], bs, p, ROW_DTYPES[m["dtype"]])


def fetch(train_set, indices):
    """Collate the samples `indices` of a map-style data set into a batch (x, y); a data set that batches its samples
    itself (padded text: integrations/hf.py) does so through its fetch_batch(indices)."""
    own = getattr(train_set, "fetch_batch", None)
    if callable(own):
        return own(indices)
    if isinstance(train_set, torch.utils.data.TensorDataset):
        return tuple(t[indices] for t in train_set.tensors)
    return torch.utils.data.default_collate([train_set[int(i)] for i in indices])
