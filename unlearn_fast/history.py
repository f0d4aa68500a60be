"""Gradient history: what is recorded while training, how it is stored, and how it is loaded back.

A GradientHistory has up to three sections (each method reads only what it needs, and reports the
bytes it read):
  schedule   always: initial parameters w_0, every step's batch indices and learning rates, the
             optimizer's class and hyper-parameters (what `retrain` replays).
  trajectory kind="full": every step's parameters w_t and batch gradient g_t (what DeltaGrad reads).
  summary    kind="full" or "minimal": at the final parameters w*, the full-data loss gradient g* and a
             rank-k sketch of the loss curvature (Gauss-Newton eigenpairs U, Lambda, and the mean
             curvature left off their span); plus a few evenly spaced parameter checkpoints with the
             full-data gradient and the curvature along U there: what Mini-Unlearning reads
             (docs/mini_unlearning.md).
Float vectors are stored through a codec (fp32, bf16, int8, int4; int codecs use the blockwise ops).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import torch

from . import ops

CODECS = ("fp32", "bf16", "int8", "int4")
KINDS = ("full", "minimal", "first_epoch", "all_epochs")
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class HistoryPolicy:
    """What HistoryRecorder keeps.

    kind:
      "full"        schedule + every step's w_t and g_t + the final summary (retrain, deltagrad, mini)
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
      min(p, max(16, steps // 3)) with 8-bit eigenvectors, about 1/24 of the full trajectory's
      bytes (docs/mini_unlearning.md).
    summary_codec: storage of the summary's eigenvectors and parameter checkpoints (int8 default;
      both are decoded and re-orthonormalised / re-evaluated consistently, docs/mini_unlearning.md).
    params: which parameters the per-sample kinds record: a preset ("embeddings", "last_blocks:N",
      "all") or a list of name patterns (fnmatch).
    """

    kind: str = "full"
    codec: str = None
    blocksize: int = None
    rank: object = None
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
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"HistoryPolicy: rank must be >= 1, got {self.rank}")


# ----------------------------------------------------------------------------- flat parameter helpers
def param_spec(model):
    return [(name, list(p.shape), str(p.dtype).replace("torch.", "")) for name, p in model.named_parameters() if p.requires_grad]


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def flat_grads(model):
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in model.parameters() if p.requires_grad]
    )


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

    def row(self, i):
        if "values" in self.tensors:
            return self.tensors["values"][i].to(self.dtype)
        t = self.tensors
        return ops.dequantize_blockwise(t["codes"][i], t["scales"][i], self.blocksize, self.bits, self.p, self.dtype)

    def all(self):
        if "values" in self.tensors:
            return self.tensors["values"].to(self.dtype)
        return torch.stack([self.row(i) for i in range(len(self))])

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def meta(self):
        return {"codec": self.codec, "blocksize": self.blocksize, "p": self.p, "dtype": str(self.dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------- the history
class GradientHistory:
    """Recorded training history; see the module docstring for its sections."""

    def __init__(self, meta, schedule, trajectory=None, summary=None):
        self.meta = meta  # policy, param_spec, optimizer, n_train, weight_decay, momentum
        self.schedule = schedule  # {"w0": (p,), "batches": [LongTensor], "lrs": (T, groups) float64}
        self.trajectory = trajectory  # {"w": EncodedRows, "g": EncodedRows} or None
        self.summary = summary  # {"w_star", "g_star", "eigvecs": EncodedRows, "eigvals", "rho", checkpoints, "response"} or None
        self._seen = None  # seen_mask(), computed on first use (the schedule does not change after recording)

    # -- facts methods rely on
    @property
    def num_steps(self):
        return len(self.schedule["batches"])

    @property
    def n_train(self):
        return self.meta["n_train"]

    def nbytes(self, section):
        def size(v):
            if isinstance(v, EncodedRows):
                return v.nbytes
            if isinstance(v, torch.Tensor):
                return v.numel() * v.element_size()
            if isinstance(v, list):
                return sum(size(x) for x in v)
            return 0

        part = getattr(self, section)
        return 0 if part is None else sum(size(v) for v in part.values())

    def seen_mask(self):
        """(n_train,) bool: which samples some recorded batch contains (kept: every request checks it)."""
        if self._seen is None:
            seen = torch.zeros(self.n_train, dtype=torch.bool)
            seen[torch.cat(self.schedule["batches"])] = True  # scatter, not unique: no sort (0.1 vs 0.7 ms on digits)
            self._seen = seen
        return self._seen

    def check_model(self, model):
        """Raise ValueError if this history was recorded for a model with other parameters."""
        spec = [list(s) for s in param_spec(model)]
        recorded = [list(s) for s in self.meta["param_spec"]]
        if spec != recorded:
            diff = next(((a, b) for a, b in zip(recorded, spec) if a != b), (recorded[len(spec):], spec[len(recorded):]))
            raise ValueError(
                f"history: recorded for another model (recorded parameter {diff[0]} vs model parameter {diff[1]}; "
                f"{len(recorded)} recorded vs {len(spec)} model parameters)"
            )

    def require(self, section, method):
        if getattr(self, section) is None:
            kind = "full" if section == "trajectory" else "full' or 'minimal"
            raise ValueError(f"{method} needs the history's {section}: record with HistoryPolicy(kind='{kind}')")

    # -- storage
    def _arrays(self):
        arrays = {"schedule.w0": self.schedule["w0"], "schedule.lrs": self.schedule["lrs"]}
        arrays["schedule.batch_sizes"] = torch.tensor([len(b) for b in self.schedule["batches"]], dtype=torch.int64)
        arrays["schedule.batch_indices"] = torch.cat(self.schedule["batches"]) if self.schedule["batches"] else torch.zeros(0, dtype=torch.int64)
        encoded = {}
        for section in ("trajectory", "summary"):
            for key, value in (getattr(self, section) or {}).items():
                if isinstance(value, EncodedRows):
                    encoded[f"{section}.{key}"] = value.meta()
                    for tname, t in value.tensors.items():
                        arrays[f"{section}.{key}.{tname}"] = t
                else:
                    arrays[f"{section}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        return arrays, encoded

    def save(self, path):
        """Write to directory `path` atomically: one file per array plus manifest.json with sha256 checksums."""
        arrays, encoded = self._arrays()
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".history-", dir=parent)
        old = None
        try:
            files = {}
            for name, tensor in arrays.items():
                fname = name + ".pt"
                torch.save(tensor.contiguous().cpu(), os.path.join(tmp, fname))
                files[name] = {"file": fname, "sha256": _sha256(os.path.join(tmp, fname)), "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
            manifest = {"format_version": FORMAT_VERSION, "meta": self.meta, "encoded": encoded, "files": files}
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=1)
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=".history-old-", dir=parent)
                os.replace(path, os.path.join(old, "h"))
            os.replace(tmp, path)
            if old:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old and not os.path.exists(path) and os.path.exists(os.path.join(old, "h")):
                os.replace(os.path.join(old, "h"), path)  # put the previous history back
                shutil.rmtree(old, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path):
        """Read a history written by save(); ValueError on a missing, corrupted or unknown file."""
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise ValueError(f"history: {path!r} has no manifest.json (not a saved GradientHistory)")
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"history: manifest.json in {path!r} is corrupted ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise ValueError(f"history: format_version {version} in {path!r}, expected {FORMAT_VERSION}")
        try:
            return cls._from_manifest(path, manifest)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"history: manifest.json in {path!r} lacks or mangles entry {err!r}") from None

    @classmethod
    def _from_manifest(cls, path, manifest):
        arrays = {}
        for name, entry in manifest["files"].items():
            fpath = os.path.join(path, entry["file"])
            if not os.path.isfile(fpath):
                raise ValueError(f"history: file {entry['file']} listed in the manifest is missing from {path!r}")
            if _sha256(fpath) != entry["sha256"]:
                raise ValueError(f"history: file {entry['file']} in {path!r} is corrupted (sha256 mismatch)")
            arrays[name] = torch.load(fpath, weights_only=True)
        sizes = arrays["schedule.batch_sizes"].tolist()
        schedule = {
            "w0": arrays["schedule.w0"],
            "lrs": arrays["schedule.lrs"],
            "batches": list(torch.split(arrays["schedule.batch_indices"], sizes)) if sizes else [],
        }
        sections = {}
        for section in ("trajectory", "summary"):
            keys = {n.split(".")[1] for n in arrays if n.startswith(section + ".")}
            part = {}
            for key in keys:
                full = f"{section}.{key}"
                if full in manifest["encoded"]:
                    m = manifest["encoded"][full]
                    tensors = {n.split(".")[2]: t for n, t in arrays.items() if n.startswith(full + ".")}
                    part[key] = EncodedRows(tensors, m["codec"], m["blocksize"], m["p"], getattr(torch, m["dtype"]))
                else:
                    part[key] = arrays[full]
            sections[section] = part or None
        return cls(manifest["meta"], schedule, sections["trajectory"], sections["summary"])


def _sha256(fpath):
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the recorder
class HistoryRecorder:
    """Records a GradientHistory while a model trains. Call record(batch_indices) after backward, before step.

    For kind "first_epoch" / "all_epochs" this returns the language-model per-sample recorder
    (unlearn_fast.lm.recording.FirstEpochRecorder), which takes the batch inputs as well.
    """

    def __new__(cls, model, optimizer, policy=None):
        policy = policy or HistoryPolicy()
        if policy.kind in ("first_epoch", "all_epochs"):
            from .lm.recording import FirstEpochRecorder

            return FirstEpochRecorder(model, optimizer, policy)
        return super().__new__(cls)

    def __init__(self, model, optimizer, policy=None):
        self.policy = policy or HistoryPolicy()
        self.model, self.optimizer = model, optimizer
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"HistoryRecorder: model must be an nn.Module, got {type(model).__name__}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("HistoryRecorder: model has no trainable parameters")
        opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) not in opt_ids for p in self.params):
            raise ValueError("HistoryRecorder: optimizer does not hold every trainable parameter of model")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.group_of_param = [next(i for i, g in enumerate(optimizer.param_groups) if any(q is p for q in g["params"])) for p in self.params]
        self.w0 = flat_params(model).clone()
        self.batches, self.lrs, self.ws, self.gs = [], [], [], []
        self.checkpoints, self.checkpoint_every = [], 1  # (step, EncodedRows of w_step): a few evenly spaced parameter snapshots for the summary
        self.meta = {
            "policy": dataclasses.asdict(self.policy),
            "param_spec": param_spec(model),
            "optimizer": {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}", "groups": _jsonable(groups)},
            "group_of_param": self.group_of_param,
        }

    def record(self, batch_indices):
        idx = torch.as_tensor(batch_indices, dtype=torch.int64).reshape(-1).cpu().clone()
        if idx.numel() == 0:
            raise ValueError("record: batch_indices is empty")
        if self.policy.kind == "full":
            # Check before appending anything, so a rejected step leaves batches, lrs, ws and gs aligned.
            w, g = flat_params(self.model), flat_grads(self.model)
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"record: step {len(self.batches)} has non-finite gradients; history not extended")
            self.ws.append(w.clone())
            self.gs.append(g.clone())
        if self.policy.kind in ("full", "minimal"):
            self._keep_checkpoint(len(self.batches))
        self.batches.append(idx)
        self.lrs.append([g["lr"] for g in self.optimizer.param_groups])

    def _keep_checkpoint(self, step):
        """Snapshots without knowing the run's length: every power-of-two step (training moves fastest at the
        start) and an even grid of spacing `checkpoint_every`; when the grid holds more than
        checkpoint_capacity(steps) points, every other one is dropped and the spacing doubles."""
        from .methods.mini import checkpoint_capacity

        early = lambda s: s & (s - 1) == 0  # noqa: E731  (0, 1, 2, 4, 8, ...)
        if step % self.checkpoint_every == 0 or early(step):
            # encoded now (the summary stores them through summary_codec anyway): an int8 snapshot holds a quarter of the memory
            w = flat_params(self.model)
            self.checkpoints.append((step, EncodedRows.encode(w[None], self.policy.summary_codec, self.policy.blocksize)))
        while sum(s % self.checkpoint_every == 0 for s, _ in self.checkpoints) > checkpoint_capacity(step + 1):
            self.checkpoint_every *= 2
            self.checkpoints = [(s, w) for s, w in self.checkpoints if s % self.checkpoint_every == 0 or early(s)]

    def finish(self, train_set, loss_fn, batch_size=1024):
        """Close the recording. For "full" and "minimal" this computes the final summary over train_set."""
        if not self.batches:
            raise ValueError("finish: nothing was recorded (call record() every training step)")
        n_train = len(train_set)
        top = int(torch.cat(self.batches).max())
        if top >= n_train:
            raise ValueError(f"finish: recorded batch index {top} is out of range for train_set of {n_train} samples")
        meta = dict(self.meta, n_train=n_train)
        schedule = {"w0": self.w0, "batches": self.batches, "lrs": torch.tensor(self.lrs, dtype=torch.float64)}
        trajectory = None
        if self.policy.kind == "full":
            c, bs = self.policy.codec, self.policy.blocksize
            trajectory = {"w": EncodedRows.encode(self.ws, c, bs), "g": EncodedRows.encode(self.gs, c, bs)}
        from .methods.mini import final_summary, sgd_settings

        try:
            sgd = sgd_settings(meta, "mini")
        except ValueError:  # not SGD: mini refuses such histories, so the schedule response is not computed
            sgd = None
        summary = final_summary(
            self.model, train_set, loss_fn, self.policy, len(self.batches), self.checkpoints, schedule["lrs"][:, 0], sgd, batch_size=batch_size
        )
        return GradientHistory(meta, schedule, trajectory, summary)


def _jsonable(groups):
    out = []
    for g in groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if isinstance(v, (int, float, bool, str, tuple, type(None)))})
    return out


def fetch(train_set, indices):
    """Collate the samples `indices` of a map-style data set into a batch (x, y)."""
    if isinstance(train_set, torch.utils.data.TensorDataset):
        return tuple(t[indices] for t in train_set.tensors)
    return torch.utils.data.default_collate([train_set[int(i)] for i in indices])
