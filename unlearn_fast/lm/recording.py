"""Per-sample gradient history for language models: HistoryPolicy(kind="first_epoch" | "all_epochs").

During training, FirstEpochRecorder computes each sample's gradient of its own mean token loss with
torch.func (functional_call + vmap(grad)) over the selected parameters only, flattens it (parameters
concatenated in model order) and stores it through the codecs (ops.quantize_blockwise, one row per sample,
int8 by default). "first_epoch" keeps epoch 0 only; "all_epochs" keeps every epoch (the multi-epoch
baseline). FirstEpochHistory holds the rows; save/load go through store.py (a directory of crash-safe,
checksummed versions, no pickle; docs/storage.md). Single-file histories of format 1 are not read.
"""
import fnmatch
import os
import time

import torch
from torch.func import functional_call, grad, vmap

from .. import ops, store
from .training import check_fits, eager_attention, eval_mode, sample_losses

CODEC_BITS = {"int8": 8, "int4": 4}
PER_SAMPLE_KINDS = ("first_epoch", "all_epochs")


# ----------------------------------------------------------------------------- parameter selection
def _block_list(model):
    """Name of the ModuleList holding the transformer blocks: the one with the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    return best


def select_params(model, spec):
    """Parameter names (model order) chosen by a preset or a list of fnmatch patterns.

    "embeddings": token and position embeddings (GPT-2 ties the output head to the token embedding, so its
    gradient includes the head's); "last_blocks:N": every parameter of the last N transformer blocks; "all".
    Raises ValueError naming `params` when the selection is empty or malformed."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    if isinstance(spec, str) and spec == "all":
        chosen = names
    elif isinstance(spec, str) and spec == "embeddings":
        by_id = {id(p): n for n, p in named}
        wanted = set()
        if hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
            wanted.add(id(model.get_input_embeddings().weight))
        for module_name, module in model.named_modules():
            last = module_name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Embedding) and last in ("wpe", "embed_positions", "position_embeddings"):
                wanted.add(id(module.weight))
        chosen = [by_id[i] for i in wanted if i in by_id]
    elif isinstance(spec, str) and spec.startswith("last_blocks:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"params: expected 'last_blocks:N' with an integer N, got {spec!r}") from None
        blocks = _block_list(model)
        if count < 1 or blocks is None:
            raise ValueError(f"params: {spec!r} names no parameter of the model (blocks found: {blocks})")
        n_blocks = len(model.get_submodule(blocks))
        prefixes = tuple(f"{blocks}.{i}." for i in range(max(0, n_blocks - count), n_blocks))
        chosen = [n for n in names if n.startswith(prefixes)]
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in spec)]
    else:
        raise ValueError(f"params: expected 'embeddings', 'last_blocks:N', 'all' or a list of name patterns, got {spec!r}")
    if not chosen:
        raise ValueError(f"params: {spec!r} names no parameter of the model")
    order = {n: k for k, n in enumerate(names)}
    return sorted(set(chosen), key=order.__getitem__)


# ----------------------------------------------------------------------------- per-sample gradients
def per_sample_gradients(model, names, input_ids, labels, chunk_size=16):
    """(n, p) float32: row i is the gradient of sample i's mean token loss over the parameters `names`,
    flattened and concatenated in the order of `names`. torch.func, batched with vmap over chunks of chunk_size
    samples (64 samples of the 2-layer test GPT-2: 0.34 s in chunks of 16 against 0.59 s in one vmap on this CPU;
    a larger chunk's per-sample intermediates fall out of cache)."""
    check_fits(model, input_ids)
    params = dict(model.named_parameters())
    chosen = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in chosen}

    def loss_of_one(chosen_params, ids, lab):
        logits = functional_call(model, {**frozen, **chosen_params}, (), {"input_ids": ids[None], "use_cache": False}).logits
        return sample_losses(logits, lab[None])[0]

    # eval mode: dropout's random masks cannot be drawn under vmap ("randomness error mode"), and a per-sample
    # gradient with one random mask is not the sample's gradient anyway; the rows are the gradients without dropout
    with eager_attention(model), eval_mode(model):
        grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(chosen, input_ids, labels)
    return torch.cat([grads[n].reshape(input_ids.shape[0], -1).float() for n in names], dim=1)


def mean_final_hidden(model, input_ids, labels):
    """(n, d) mean last-layer hidden state over each sample's real tokens: the activation summary."""
    with torch.no_grad(), eval_mode(model):
        hidden = model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states[-1].float()
    mask = (labels != -100).float().unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------- storage
def _encode(rows, codec, blocksize):
    if codec in CODEC_BITS:
        codes, scales = ops.quantize_rows(rows.contiguous(), blocksize, CODEC_BITS[codec])
        return {"codes": codes, "scales": scales}
    return {"values": rows.to(torch.bfloat16 if codec == "bf16" else torch.float32).clone()}


class FirstEpochHistory:
    """Per-sample gradient rows of recorded parameters, per recorded epoch.

    epochs[e] = {"index": int64 sample indices (sorted), "codes"/"scales" (int8/int4) or "values" (fp32/bf16)}.
    activations (optional): {"index", "values" (n, d)} mean final hidden state per sample."""

    def __init__(self, kind, codec, blocksize, param_names, shapes, dtypes, epochs, lrs, activations=None, record_seconds=0.0):
        self.kind, self.codec, self.blocksize = kind, codec, blocksize
        self.param_names, self.shapes, self.dtypes = list(param_names), [tuple(s) for s in shapes], list(dtypes)
        self.epochs, self.lrs, self.activations = epochs, list(lrs), activations
        self.record_seconds = record_seconds

    @property
    def numel(self):
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def n_epochs(self):
        return len(self.epochs)

    def bytes_per_sample(self):
        """Stored bytes per sample per epoch (codes + scales) and the same at fp32 before compression."""
        first = self.epochs[0]
        stored = sum(t[0].numel() * t.element_size() for k, t in first.items() if k != "index")
        return {"stored": stored, "fp32": 4 * self.numel}

    def total_bytes(self):
        return sum(t.numel() * t.element_size() for e in self.epochs for k, t in e.items() if k != "index")

    def _rows(self, epoch, indices):
        record = self.epochs[epoch]
        index = record["index"]
        wanted = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        pos = torch.searchsorted(index, wanted).clamp(max=max(index.numel() - 1, 0))
        missing = wanted[index[pos] != wanted] if index.numel() else wanted
        if missing.numel():
            raise ValueError(f"forget: samples {missing[:10].tolist()} were not recorded in epoch {epoch} of the history")
        return pos

    def check_params(self, model, names):
        """ValueError unless every name in `names` was recorded with the model's current shape."""
        recorded = dict(zip(self.param_names, self.shapes))
        missing = [n for n in names if n not in recorded]
        if missing:
            raise ValueError(
                f"params: the history was recorded without {missing[:5]} (it holds {self.param_names[:5]}"
                f"{'...' if len(self.param_names) > 5 else ''}); record with a policy whose params include them"
            )
        params = dict(model.named_parameters())
        for n in names:
            if n not in params or tuple(params[n].shape) != recorded[n]:
                shape = tuple(params[n].shape) if n in params else None
                raise ValueError(f"history: parameter {n} was recorded with shape {recorded[n]}, the model has {shape}")

    def slices(self, names):
        """Offsets (start, stop) of each name in a stored row."""
        out, start = {}, 0
        for n, s in zip(self.param_names, self.shapes):
            size = int(torch.Size(s).numel())
            out[n] = (start, start + size)
            start += size
        return [out[n] for n in names]

    def accumulate_(self, out, indices, alpha, epochs=None):
        """out (flat float32, length numel) += alpha * sum of the stored rows of `indices` over `epochs`
        (default: every recorded epoch). Quantized rows go through ops.dequantize_axpy_ without a copy."""
        if out.numel() != self.numel:
            raise ValueError(f"out: has {out.numel()} elements, the history rows have {self.numel}")
        for e in range(self.n_epochs) if epochs is None else epochs:
            if not 0 <= e < self.n_epochs:
                raise ValueError(f"epochs: epoch {e} not recorded (history has {self.n_epochs})")
            record = self.epochs[e]
            for pos in self._rows(e, indices).tolist():
                if "codes" in record:
                    ops.dequantize_axpy_(out, record["codes"][pos], record["scales"][pos], alpha, self.blocksize, CODEC_BITS[self.codec])
                else:
                    out.add_(record["values"][pos].float(), alpha=alpha)
        return out

    def row(self, epoch, index):
        """One sample's dequantized float32 gradient row."""
        out = torch.zeros(self.numel)
        return self.accumulate_(out, [index], 1.0, [epoch])

    # ------------------------------------------------------------------ persistence
    def _tensors(self):
        tensors = {}
        for e, record in enumerate(self.epochs):
            for k, t in record.items():
                tensors[f"epoch{e}.{k}"] = t
        if self.activations is not None:
            for k, t in self.activations.items():
                tensors[f"activations.{k}"] = t
        return tensors

    def save(self, path):
        """Write to directory `path` as a new version (store.py: crash-safe, checksummed, no pickle)."""
        info = {
            "kind": self.kind, "codec": self.codec, "blocksize": self.blocksize,
            "params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in zip(self.param_names, self.shapes, self.dtypes)],
            "n_epochs": self.n_epochs, "lrs": self.lrs, "record_seconds": self.record_seconds,
        }
        store.write(path, "FirstEpochHistory", info, self._tensors())
        return path

    @classmethod
    def load(cls, path, model=None):
        """Read a saved history; ValueError on a missing, corrupted, inconsistent or crafted one, or (with
        model) a recorded parameter the model lacks or has with another shape."""
        snap = store.read(path, "FirstEpochHistory")
        try:
            history = cls._from_snapshot(snap, repr(os.fspath(path)))
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"path: manifest of {path} lacks or mangles entry {err!r}") from None
        if model is not None:
            history.check_params(model, history.param_names)
        return history

    @classmethod
    def _from_snapshot(cls, snap, where):
        """The history of a stored version, checked so that a crafted one is a ValueError naming the
        tensor, not an IndexError in a later method."""
        info, tensors = snap.info, snap.tensors
        params = info["params"]
        if info["kind"] not in PER_SAMPLE_KINDS or info["codec"] not in ("int8", "int4", "fp32", "bf16") or type(info["blocksize"]) is not int:
            raise ValueError(f"path: {where}: kind {info['kind']!r}, codec {info['codec']!r} or blocksize {info['blocksize']!r} is invalid")
        numel = sum(int(torch.Size(p["shape"]).numel()) for p in params)
        epochs = []
        for e in range(info["n_epochs"]):
            prefix = f"epoch{e}."
            record = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            index = store.check_tensor(record, "index", where, (torch.int64,), 1)
            if info["codec"] in CODEC_BITS:
                codes = store.check_tensor(record, "codes", where, (torch.int8, torch.uint8), 2)
                scales = store.check_tensor(record, "scales", where, (torch.float32,), 2)
                width = numel if info["codec"] == "int8" else (numel + 1) // 2  # int4: two codes a byte
                ok = set(record) == {"index", "codes", "scales"} and codes.shape == (index.numel(), width) and scales.shape[0] == index.numel()
                ok = ok and scales.shape[1] == -(-numel // max(info["blocksize"], 1))
            else:
                values = store.check_tensor(record, "values", where, (torch.float32, torch.bfloat16), 2)
                ok = set(record) == {"index", "values"} and values.shape == (index.numel(), numel)
            if not ok or bool((index[1:] <= index[:-1]).any()):
                raise ValueError(f"path: {where}: the tensors of epoch {e} ({ {k: list(t.shape) for k, t in record.items()} }) do not fit "
                                 f"{numel} recorded values per row in codec {info['codec']} with sorted, distinct indices")
            epochs.append(record)
        activations = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.startswith("activations.")} or None
        known = {f"epoch{e}.{k}" for e, r in enumerate(epochs) for k in r} | {f"activations.{k}" for k in activations or ()}
        if set(tensors) != known:
            raise ValueError(f"path: {where} holds tensors the manifest does not explain: {sorted(set(tensors) - known)[:5]}")
        return cls(
            info["kind"], info["codec"], info["blocksize"], [p["name"] for p in params], [p["shape"] for p in params],
            [p["dtype"] for p in params], epochs, info["lrs"], activations, info.get("record_seconds", 0.0),
        )


# ----------------------------------------------------------------------------- recorder
class FirstEpochRecorder:
    """Records per-sample gradients of the parameters chosen by policy.params.

    Call record(batch_indices, inputs, targets) after loss.backward() and before optimizer.step() (the
    gradients are those at the parameters the batch saw), end_epoch() after each epoch, finish() at the end.
    inputs are input_ids (n, L); targets the labels (-100 on padding), inputs when None."""

    def __init__(self, model, optimizer, policy, chunk_size=16):
        if policy.kind not in PER_SAMPLE_KINDS:
            raise ValueError(f"policy: FirstEpochRecorder records kinds {PER_SAMPLE_KINDS}, got {policy.kind!r}")
        if not policy.per_sample:
            raise ValueError("policy: kind first_epoch/all_epochs records per-sample gradients; set per_sample=True")
        self.model, self.optimizer, self.policy = model, optimizer, policy
        self.names = select_params(model, policy.params)
        params = dict(model.named_parameters())
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.dtypes = [str(params[n].dtype).replace("torch.", "") for n in self.names]
        self.chunk_size = chunk_size
        self.epoch = 0
        self.pending = {}  # epoch -> list of (indices, encoded dict)
        self.activation_rows = []
        self.lrs = []
        self.seconds = 0.0
        self.finished = False

    def _recording(self):
        return self.policy.kind == "all_epochs" or self.epoch == 0

    def record(self, batch_indices, inputs, targets=None):
        if self.finished:
            raise RuntimeError("FirstEpochRecorder: record() called after finish()")
        if not self._recording():
            return
        start = time.perf_counter()
        indices = torch.as_tensor(batch_indices, dtype=torch.int64).reshape(-1)
        targets = inputs if targets is None else targets
        if indices.numel() != inputs.shape[0]:
            raise ValueError(f"batch_indices: {indices.numel()} indices for a batch of {inputs.shape[0]} samples")
        rows = per_sample_gradients(self.model, self.names, inputs, targets, self.chunk_size)
        self.pending.setdefault(self.epoch, []).append((indices, _encode(rows, self.policy.codec, self.policy.blocksize)))
        if self.policy.activations and self.epoch == 0:
            self.activation_rows.append((indices, mean_final_hidden(self.model, inputs, targets)))
        if len(self.lrs) == self.epoch and self.optimizer is not None:
            self.lrs.append(float(self.optimizer.param_groups[0]["lr"]))
        self.seconds += time.perf_counter() - start

    def end_epoch(self):
        self.epoch += 1

    def finish(self):
        """-> FirstEpochHistory with rows sorted by sample index (a sample seen twice in an epoch keeps its last row)."""
        if self.finished:  # checked first: pending is emptied below, and "nothing was recorded" would mislead
            raise RuntimeError("FirstEpochRecorder: finish() was already called; it returned the history")
        if not self.pending:
            raise RuntimeError("FirstEpochRecorder: nothing was recorded (record() was never called)")
        self.finished = True
        epochs = []
        for e in sorted(self.pending):
            chunks = self.pending[e]
            index = torch.cat([i for i, _ in chunks])
            merged = {k: torch.cat([c[k] for _, c in chunks]) for k in chunks[0][1]}
            order = torch.argsort(index, stable=True)
            index = index[order]
            keep = torch.ones_like(index, dtype=torch.bool)
            keep[:-1] = index[1:] != index[:-1]
            epochs.append({"index": index[keep], **{k: t[order][keep] for k, t in merged.items()}})
        activations = None
        if self.activation_rows:
            index = torch.cat([i for i, _ in self.activation_rows])
            order = torch.argsort(index)
            activations = {"index": index[order], "values": torch.cat([v for _, v in self.activation_rows])[order]}
        self.pending = {}
        return FirstEpochHistory(
            self.policy.kind, self.policy.codec, self.policy.blocksize, self.names, self.shapes, self.dtypes,
            epochs, self.lrs, activations, self.seconds,
        )
