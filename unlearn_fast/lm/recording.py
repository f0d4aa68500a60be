"""Per-sample gradient history for language models: HistoryPolicy(kind="first_epoch" | "all_epochs").

During training, FirstEpochRecorder computes each sample's gradient of its own mean token loss with
torch.func (functional_call + vmap(grad)) over the selected parameters only, flattens it (parameters
concatenated in model order) and stores it through the codecs (ops.quantize_blockwise, one row per sample,
int8 by default). "first_epoch" keeps epoch 0 only; "all_epochs" keeps every epoch (the multi-epoch
baseline). FirstEpochHistory holds the rows; save/load go through store.py (a directory of crash-safe,
checksummed versions, no pickle; docs/storage.md). Single-file histories of format 1 are not read.

FirstEpochRecorder(..., path=DIR) streams the history to DIR while it records, as HistoryRecorder(path=) does
(the same store.append_chunk versions, the same background writer): rows are encoded at record() and appended
in chunks, so memory does not grow with the number of samples; a history loaded from chunks reads its rows one
chunk at a time when a method needs them. flush() marks a durable point with the weights' digest, and
FirstEpochRecorder.resume continues the recording from a trainer checkpoint saved there (HistoryRecorder.resume's
scheme: the chunks after the mark are dropped, the trainer repeats their steps).
"""
import collections
import dataclasses
import fnmatch
import json
import os
import time
import uuid

import torch
from torch.func import grad, vmap

from .. import ops, store
from ..hvp import call_with, parameter_paths
from ..history import CHUNK_BYTES, HistoryPolicy, param_spec, row_bytes, weights_digest
from ..recording import _ChunkWriter
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
    paths = parameter_paths(model)

    def loss_of_one(chosen_params, ids, lab):
        logits = call_with(model, paths, {**frozen, **chosen_params}, (), {"input_ids": ids[None], "use_cache": False}).logits
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


def _info(kind, codec, blocksize, names, shapes, dtypes, n_epochs, lrs, seconds, recording=None, recorder=None):
    info = {
        "kind": kind, "codec": codec, "blocksize": blocksize,
        "params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in zip(names, shapes, dtypes)],
        "n_epochs": n_epochs, "lrs": list(lrs), "record_seconds": seconds,
    }
    if recording is not None:  # set while a recorder streams to the directory (gone once it finishes)
        info["recording"] = recording
        if recorder is not None:  # what FirstEpochRecorder.resume checks: {"policy", "param_spec"} (gone once it finishes)
            info["recorder"] = recorder
    return info


def _table_fits(table, expected):
    """Whether a part's tensor table (from a manifest: {name: {"dtype", "shape"}}) is exactly `expected`
    ({name: (allowed dtype names, shape)})."""
    return set(table) == set(expected) and all(table[n]["dtype"] in dtypes and table[n]["shape"] == shape for n, (dtypes, shape) in expected.items())


# A streamed history keeps the encoded rows it read (a forget set's, read again at every ascent step) up to this many
# bytes; rows are gathered in batches of at most this size, each chunk read once per batch
ROW_CACHE_BYTES = CHUNK_BYTES


class FirstEpochHistory:
    """Per-sample gradient rows of recorded parameters, per recorded epoch.

    epochs[e] = {"index": int64 sample indices (sorted), "codes"/"scales" (int8/int4) or "values" (fp32/bf16)}.
    activations (optional): {"index", "values" (n, d)} mean final hidden state per sample.

    A history streamed to a directory (FirstEpochRecorder(..., path=)) and loaded from it keeps only
    epochs[e]["index"] in memory: its rows stay in the stored chunks, read (sha256-verified) when a row is
    first needed, one chunk at a time. complete is False for a recording that did not finish (killed);
    methods refuse it (check_params)."""

    def __init__(self, kind, codec, blocksize, param_names, shapes, dtypes, epochs, lrs, activations=None, record_seconds=0.0):
        self.kind, self.codec, self.blocksize = kind, codec, blocksize
        self.param_names, self.shapes, self.dtypes = list(param_names), [tuple(s) for s in shapes], list(dtypes)
        self.epochs, self.lrs, self._activations = epochs, list(lrs), activations
        self.record_seconds = record_seconds
        self.path = None  # the directory saved to or loaded from
        self.recording_id = None  # a streamed recording that did not finish
        self.recorder_facts = None  # an unfinished recording: the settings FirstEpochRecorder.resume checks (kept by save)
        self.chunks = []  # a chunked (streamed) history: the stored chunks (manifest entries) holding the rows
        self._located = None  # a chunked history: per epoch, (chunk, row in it) of each position of epochs[e]["index"]
        self._row_cache, self._cached_bytes = collections.OrderedDict(), 0
        self.cache_bytes = ROW_CACHE_BYTES
        self.chunks_read = []  # the chunks read so far, in order (what a method's reads cost)

    @property
    def numel(self):
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def n_epochs(self):
        return len(self.epochs)

    @property
    def complete(self):
        """False for a streamed recording that did not finish (loaded from what a killed run wrote)."""
        return self.recording_id is None

    @property
    def activations(self):
        if self._activations is None and any("activations" in c["parts"] for c in self.chunks):
            self._activations = self._read_activations()
        return self._activations

    @activations.setter
    def activations(self, value):
        self._activations = value

    def _row_bytes(self):
        return row_bytes(self.codec, self.numel, self.blocksize, torch.float32)

    def bytes_per_sample(self):
        """Stored bytes per sample per epoch (codes + scales) and the same at fp32 before compression."""
        return {"stored": self._row_bytes(), "fp32": 4 * self.numel}

    def total_bytes(self):
        return sum(e["index"].numel() for e in self.epochs) * self._row_bytes()

    def _rows(self, epoch, indices):
        record = self.epochs[epoch]
        index = record["index"]
        wanted = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        pos = torch.searchsorted(index, wanted).clamp(max=max(index.numel() - 1, 0))
        missing = wanted[index[pos] != wanted] if index.numel() else wanted
        if missing.numel():
            raise ValueError(f"forget: samples {missing[:10].tolist()} were not recorded in epoch {epoch} of the history")
        return pos

    def check_complete(self):
        """ValueError naming the directory unless the recording finished (a killed one lacks its last rows)."""
        if not self.complete:
            rows = sum(c["steps"] for c in self.chunks)
            raise ValueError(f"history: its recording did not finish ({rows} rows in {len(self.chunks)} chunks were streamed to "
                             f"{self.path!r} before it stopped); record again")

    def check_params(self, model, names):
        """What a method checks before it reads rows: the recording finished, and every name in `names` was
        recorded with the model's current shape; ValueError otherwise."""
        self.check_complete()
        self._check_shapes(model, names)

    def _check_shapes(self, model, names):
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
        (default: every recorded epoch), added in the order of `indices` (a chunked history gives the same
        bits as one in memory). Quantized rows go through ops.dequantize_axpy_ without a copy."""
        if out.numel() != self.numel:
            raise ValueError(f"out: has {out.numel()} elements, the history rows have {self.numel}")
        for e in range(self.n_epochs) if epochs is None else epochs:
            if not 0 <= e < self.n_epochs:
                raise ValueError(f"epochs: epoch {e} not recorded (history has {self.n_epochs})")
            positions = self._rows(e, indices).tolist()
            if self._located is None:
                record = self.epochs[e]
                rows = ({k: t[pos] for k, t in record.items() if k != "index"} for pos in positions)
            else:
                rows = self._stored_rows(e, positions)
            for row in rows:
                if "codes" in row:
                    ops.dequantize_axpy_(out, row["codes"], row["scales"], alpha, self.blocksize, CODEC_BITS[self.codec])
                else:
                    out.add_(row["values"].float(), alpha=alpha)
        return out

    def row(self, epoch, index):
        """One sample's dequantized float32 gradient row."""
        out = torch.zeros(self.numel)
        return self.accumulate_(out, [index], 1.0, [epoch])

    # ------------------------------------------------------------------ rows of a chunked history
    def _stored_rows(self, epoch, positions):
        """The encoded rows ({name: 1-row tensor}) at `positions` of epochs[epoch]["index"], in order: gathered in
        batches of at most cache_bytes, each chunk read once per batch (rows already cached are not read again)."""
        batch = max(1, self.cache_bytes // max(self._row_bytes(), 1))
        for start in range(0, len(positions), batch):
            yield from self._gather(epoch, positions[start : start + batch])

    def _gather(self, epoch, positions):
        chunk_of, row_of = self._located[epoch]
        rows, wanted = [None] * len(positions), collections.defaultdict(list)
        for k, pos in enumerate(positions):
            cached = self._row_cache.get((epoch, pos))
            if cached is None:
                wanted[int(chunk_of[pos])].append((k, pos))
            else:
                self._row_cache.move_to_end((epoch, pos))
                rows[k] = cached
        for j in sorted(wanted):
            self.chunks_read.append(j)
            tensors = store.read_part(self.path, self.chunks[j]["parts"]["rows"], repr(self.path))
            for k, pos in wanted[j]:
                row = self._row_cache.get((epoch, pos))  # (a sample asked for twice in one call)
                if row is None:
                    row = {name: t[int(row_of[pos])].clone() for name, t in tensors.items()}  # a copy: the chunk is dropped
                    self._row_cache[(epoch, pos)] = row
                    self._cached_bytes += sum(t.numel() * t.element_size() for t in row.values())
                    # oldest first, as rows come in: memory holds the budget (this batch included) and one chunk
                    while self._cached_bytes > self.cache_bytes and self._row_cache:
                        _, old = self._row_cache.popitem(last=False)
                        self._cached_bytes -= sum(t.numel() * t.element_size() for t in old.values())
                rows[k] = row
            del tensors
        return rows

    def _read_activations(self):
        """The activations of a chunked history, assembled like FirstEpochRecorder.finish assembles them in memory."""
        index, values = [], []
        for c in self.chunks:
            if "activations" in c["parts"]:
                index.append(store.read_part(self.path, c["parts"]["index"], repr(self.path))["index"])
                values.append(store.read_part(self.path, c["parts"]["activations"], repr(self.path))["values"])
        index = torch.cat(index)
        order = torch.argsort(index)
        return {"index": index[order], "values": torch.cat(values)[order]}

    def _attach_chunks(self, chunks, where):
        """Index the rows of stored `chunks` (the small index part of each is read and verified now, the rows when
        needed): epochs[e]["index"] and where each sample's row is. A sample recorded twice in an epoch keeps its
        last row, as FirstEpochRecorder.finish keeps it in memory."""
        numel, bs = self.numel, max(self.blocksize, 1)
        if self.codec in CODEC_BITS:
            width = numel if self.codec == "int8" else (numel + 1) // 2  # int4: two codes a byte
            expected_rows = lambda n: {"codes": (("int8", "uint8"), [n, width]), "scales": (("float32",), [n, -(-numel // bs)])}  # noqa: E731
        else:
            expected_rows = lambda n: {"values": (("float32", "bfloat16"), [n, numel])}  # noqa: E731
        by_epoch, lrs = collections.defaultdict(list), {}
        for j, c in enumerate(chunks):
            n, parts = c["steps"], c["parts"]
            ok = set(parts) in ({"index", "rows"}, {"index", "rows", "activations"}) and _table_fits(parts["rows"]["tensors"], expected_rows(n))
            ok = ok and any(_table_fits(parts["index"]["tensors"], {"index": (("int64",), [n]), "epoch": (("int64",), [1]), "lr": (("float64",), [k])})
                            for k in (0, 1))  # lr: none without an optimizer
            if ok and "activations" in parts:
                table = parts["activations"]["tensors"]
                ok = set(table) == {"values"} and table["values"]["dtype"] == "float32" and len(table["values"]["shape"]) == 2 and table["values"]["shape"][0] == n
            if not ok:
                raise ValueError(f"path: {where}: chunk {j} ({ {k: p['tensors'] for k, p in parts.items()} }) does not hold {n} rows of "
                                 f"{numel} recorded values in codec {self.codec} with their index")
            head = store.read_part(self.path, parts["index"], where)
            index, epoch = head["index"], int(head["epoch"][0])
            if epoch < 0 or (index.numel() and int(index.min()) < 0):
                raise ValueError(f"path: {where}: chunk {j} holds epoch {epoch} or negative sample indices")
            if head["lr"].numel():
                lrs.setdefault(epoch, float(head["lr"][0]))
            if index.numel():  # (a chunk of no rows carries a flush mark only: it makes no epoch)
                by_epoch[epoch].append((j, index))
        self.chunks, self.epochs, self._located = list(chunks), [], []
        for epoch in sorted(by_epoch):  # epochs without rows are skipped, as in memory
            pieces = by_epoch[epoch]
            index = torch.cat([i for _, i in pieces])
            chunk_of = torch.cat([torch.full((i.numel(),), j, dtype=torch.int32) for j, i in pieces])
            row_of = torch.cat([torch.arange(i.numel(), dtype=torch.int32) for _, i in pieces])
            order = torch.argsort(index, stable=True)
            index = index[order]
            keep = torch.ones_like(index, dtype=torch.bool)
            keep[:-1] = index[1:] != index[:-1]  # the last of equal indices: the sample's last row
            self.epochs.append({"index": index[keep]})
            self._located.append((chunk_of[order][keep], row_of[order][keep]))
        return [lrs[e] for e in sorted(lrs)]

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
        """Write to directory `path` as a new version (store.py: crash-safe, checksummed, no pickle). A chunked
        history keeps its chunks: by reference in its own directory, copied (verified) to another one."""
        info = _info(self.kind, self.codec, self.blocksize, self.param_names, self.shapes, self.dtypes, self.n_epochs, self.lrs,
                     self.record_seconds, self.recording_id, self.recorder_facts if self.recording_id is not None else None)
        if self._located is None:
            store.write(path, "FirstEpochHistory", info, self._tensors())
        else:
            chunks = store.stored_chunks(self.path, self.chunks)
            store.write(path, "FirstEpochHistory", info, {}, chunks=chunks)
        self.path = path  # (objects are named by their bytes: the chunks read from here are the same)
        return path

    @classmethod
    def load(cls, path, model=None):
        """Read a saved history; ValueError on a missing, corrupted, inconsistent or crafted one, or (with
        model) a recorded parameter the model lacks or has with another shape. A streamed history loads its
        sample indices only (its rows are read when needed); a recording that did not finish loads up to its
        last chunk, with complete False."""
        snap = store.read(path, "FirstEpochHistory")
        try:
            history = cls._from_snapshot(snap, repr(os.fspath(path)), path)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"path: manifest of {path} lacks or mangles entry {err!r}") from None
        if model is not None:
            history._check_shapes(model, history.param_names)
        return history

    @classmethod
    def _from_snapshot(cls, snap, where, path=None):
        """The history of a stored version, checked so that a crafted one is a ValueError naming the
        tensor, not an IndexError in a later method."""
        info, tensors = snap.info, snap.tensors
        params = info["params"]
        if info["kind"] not in PER_SAMPLE_KINDS or info["codec"] not in ("int8", "int4", "fp32", "bf16") or type(info["blocksize"]) is not int:
            raise ValueError(f"path: {where}: kind {info['kind']!r}, codec {info['codec']!r} or blocksize {info['blocksize']!r} is invalid")
        numel = sum(int(torch.Size(p["shape"]).numel()) for p in params)
        args = (info["kind"], info["codec"], info["blocksize"], [p["name"] for p in params], [p["shape"] for p in params], [p["dtype"] for p in params])
        recording = info.get("recording")
        if snap.chunks or recording is not None:  # streamed: the rows stay in the chunks
            if tensors or not (recording is None or isinstance(recording, str)):
                raise ValueError(f"path: {where}: a streamed history holds head tensors {sorted(tensors)[:5]} or an invalid recording id")
            history = cls(*args, [], info["lrs"], None, info.get("record_seconds", 0.0))
            history.path = path
            lrs = history._attach_chunks(snap.chunks, where)
            if recording is None and info["n_epochs"] != history.n_epochs:
                raise ValueError(f"path: {where}: the manifest says {info['n_epochs']} epochs, the chunks hold {history.n_epochs}")
            if recording is not None:  # a killed recording: the learning rates its chunks carry
                history.recording_id, history.lrs = recording, lrs
                history.recorder_facts = info.get("recorder")
            return history
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
        history = cls(*args, epochs, info["lrs"], activations, info.get("record_seconds", 0.0))
        history.path = path
        return history


# ----------------------------------------------------------------------------- recorder
class FirstEpochRecorder:
    """Records per-sample gradients of the parameters chosen by policy.params.

    Call record(batch_indices, inputs, targets) after loss.backward() and before optimizer.step() (the
    gradients are those at the parameters the batch saw), end_epoch() after each epoch, finish() at the end.
    inputs are input_ids (n, L); targets the labels (-100 on padding), inputs when None.

    path: a new directory to stream the history to while it records (docs/storage.md): rows are encoded at
    record(), and every `chunk_rows` rows (about 64 MiB; an epoch ends its last chunk) are appended by a
    background thread through store.append_chunk, so memory holds the open chunk and at most two waiting
    ones, however many samples the run has; a run killed at any moment leaves a history that loads up to its
    last chunk. A directory that already holds a history is refused (recording never overwrites one).

    flush() makes every recorded row durable and marks the point with the model's weights digest; a trainer
    checkpoint saved right after it can continue the recording: FirstEpochRecorder.resume(path, model, optimizer)."""

    def __init__(self, model, optimizer, policy, chunk_size=16, path=None):
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
        self.pending = {}  # epoch -> list of (indices, encoded dict) (in memory, no path)
        self.activation_rows = []
        self.lrs = []
        self.seconds = 0.0
        self.rows = 0  # rows recorded
        self.finished = False
        numel = sum(int(torch.Size(s).numel()) for s in self.shapes)
        self.chunk_rows = max(1, CHUNK_BYTES // row_bytes(policy.codec, numel, policy.blocksize, torch.float32))
        self.path, self._writer = None, None
        self._open, self._open_rows = [], 0  # streamed: the rows of the chunk being filled, [(indices, encoded, activations)]
        if path is not None:
            self._start_stream(path)

    def _start_stream(self, path):
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(path, str):
            raise ValueError(f"path: must be a str or os.PathLike naming a new history directory, got {type(path).__name__}")
        if os.path.lexists(os.path.join(path, store.CURRENT)):
            raise ValueError(f"path: {path!r} already holds a history; record to a new directory (a recording never overwrites one)")
        self.recording_id = uuid.uuid4().hex
        store.write(path, "FirstEpochHistory", self._info(None, self.recording_id), {})
        self.path = path
        self._writer = _ChunkWriter(path, self.recording_id, "FirstEpochHistory")

    def _info(self, n_epochs, recording=None):
        p = self.policy
        return _info(p.kind, p.codec, p.blocksize, self.names, self.shapes, self.dtypes, n_epochs, self.lrs, self.seconds, recording,
                     {"policy": _policy_facts(p), "param_spec": [list(s) for s in param_spec(self.model)]})

    def _recording(self):
        return self.policy.kind == "all_epochs" or self.epoch == 0

    def _raise_writer_error(self, call):
        if self._writer is not None and self._writer.error is not None:
            raise RuntimeError(f"{call}: the background writer of {self.path!r} failed ({self._writer.error}); the history there "
                               "holds the chunks written before it") from self._writer.error

    def record(self, batch_indices, inputs, targets=None):
        if self.finished:
            raise RuntimeError("FirstEpochRecorder: record() called after finish()")
        if not self._recording():
            return
        self._raise_writer_error("record")
        start = time.perf_counter()
        indices = torch.as_tensor(batch_indices, dtype=torch.int64).reshape(-1)
        targets = inputs if targets is None else targets
        if indices.numel() != inputs.shape[0]:
            raise ValueError(f"batch_indices: {indices.numel()} indices for a batch of {inputs.shape[0]} samples")
        rows = per_sample_gradients(self.model, self.names, inputs, targets, self.chunk_size)
        encoded = _encode(rows, self.policy.codec, self.policy.blocksize)
        del rows
        hidden = mean_final_hidden(self.model, inputs, targets) if self.policy.activations and self.epoch == 0 else None
        if len(self.lrs) == self.epoch and self.optimizer is not None:
            self.lrs.append(float(self.optimizer.param_groups[0]["lr"]))
        if self.path is None:
            self.pending.setdefault(self.epoch, []).append((indices, encoded))
            if hidden is not None:
                self.activation_rows.append((indices, hidden))
        else:
            self._open.append((indices, encoded, hidden))
            self._open_rows += indices.numel()
            if self._open_rows >= self.chunk_rows:
                self._seal(whole=False)
        self.rows += indices.numel()
        self.seconds += time.perf_counter() - start

    def _seal(self, whole=True, mark=None):
        """Hand the open rows to the writer in chunks of chunk_rows (whole=True: the rest too, as a last shorter chunk).
        mark (flush): the last chunk carries it; with no open rows, a chunk of no rows does (resume finds the
        recorder's epoch at the mark in its index part)."""
        if not self._open:
            if mark is not None:
                lr = torch.tensor(self.lrs[self.epoch : self.epoch + 1], dtype=torch.float64)
                numel = sum(int(torch.Size(s).numel()) for s in self.shapes)
                empty = {k: t[:0] for k, t in _encode(torch.zeros(1, numel), self.policy.codec, self.policy.blocksize).items()}
                parts = {"index": {"index": torch.zeros(0, dtype=torch.int64), "epoch": torch.tensor([self.epoch]), "lr": lr}, "rows": empty}
                self._writer.put((0, parts, mark, None))
            return
        if len(self._open) == 1:  # (no copy of a single batch)
            index, encoded, hidden = self._open[0]
        else:
            index = torch.cat([i for i, _, _ in self._open])
            encoded = {k: torch.cat([e[k] for _, e, _ in self._open]) for k in self._open[0][1]}
            hidden = torch.cat([h for _, _, h in self._open]) if self._open[0][2] is not None else None
        n, start = index.numel(), 0
        lr = torch.tensor(self.lrs[self.epoch : self.epoch + 1], dtype=torch.float64)  # (none without an optimizer)
        while n - start >= self.chunk_rows or (whole and start < n):
            stop = min(n, start + self.chunk_rows)
            parts = {"index": {"index": index[start:stop], "epoch": torch.tensor([self.epoch]), "lr": lr},
                     "rows": {k: t[start:stop] for k, t in encoded.items()}}
            if hidden is not None:
                parts["activations"] = {"values": hidden[start:stop]}
            # blocks while two chunks wait: memory stays bounded
            self._writer.put((stop - start, parts, mark if whole and stop == n else None, None))
            start = stop
        rest = (index[start:].clone(), {k: t[start:].clone() for k, t in encoded.items()}, None if hidden is None else hidden[start:].clone())
        self._open, self._open_rows = ([rest] if start < n else []), n - start

    def end_epoch(self):
        if self.path is not None and not self.finished:
            self._raise_writer_error("end_epoch")
            self._seal()  # a chunk holds rows of one epoch
        self.epoch += 1

    def flush(self):
        """Make every row recorded so far durable at `path` (blocks until written) and mark this point with the
        model's weights digest (uf.history.weights_digest), so that FirstEpochRecorder.resume can continue the
        recording from a trainer checkpoint saved now: call it when the trainer saves one, after optimizer.step().
        The open rows are written as a shorter chunk (the rows, not the chunk boundaries, make the history).
        Without a path: nothing to do."""
        if self.finished:
            raise RuntimeError("FirstEpochRecorder: flush() called after finish() or close()")
        if self.path is None:
            return
        self._raise_writer_error("flush")
        self._seal(mark=weights_digest(self.model))
        self._writer.join()
        self._raise_writer_error("flush")

    def close(self):
        """Stop a streamed recording without finishing it: every recorded row is written, the history at `path`
        stays unfinished (methods refuse it). Safe to call twice, and after finish()."""
        if self._writer is not None:
            self._seal()
            self._writer.close()
            self._writer = None
        self.finished = True

    def finish(self):
        """-> FirstEpochHistory with rows sorted by sample index (a sample seen twice in an epoch keeps its last row).
        A streamed recording writes its last chunk and a finished version (its chunks kept where they are) and
        returns the history loaded from `path` (its rows are read from the chunks when needed)."""
        if self.finished:  # checked first: pending is emptied below, and "nothing was recorded" would mislead
            raise RuntimeError("FirstEpochRecorder: finish() was already called; it returned the history")
        if not self.rows:
            raise RuntimeError("FirstEpochRecorder: nothing was recorded (record() was never called)")
        if self.path is not None:
            self._raise_writer_error("finish")
            self.close()
            self._raise_writer_error("finish")  # (close() keeps the writer's error: raised here)
            history = FirstEpochHistory.load(self.path)
            if history.recording_id != self.recording_id:
                raise ValueError(f"path: {self.path!r} was replaced by another history while it was being recorded; not finished")
            history.recording_id, history.lrs, history.record_seconds = None, list(self.lrs), self.seconds
            history.save(self.path)  # the finished version: the chunks kept by reference
            return history
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

    # ------------------------------------------------------------------ resume
    @classmethod
    def check_resume(cls, path, model, policy=None, epoch=None):
        """What resume() checks, reading only: ValueError naming what does not match, else the plan resume()
        follows ({"policy", "recording_id", "mark" (the chunk index), "epoch", "rows", "lrs"})."""
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        history = FirstEpochHistory.load(path)  # (checks every chunk's tables and reads their index parts)
        if history.recording_id is None:
            raise ValueError(f"path: {path!r} holds a finished history; there is no recording to resume")
        facts = history.recorder_facts
        if not (isinstance(facts, dict) and isinstance(facts.get("policy"), dict) and isinstance(facts.get("param_spec"), list)):
            raise ValueError(f"path: the recording at {path!r} does not say which policy and model recorded it (recorded before "
                             "FirstEpochRecorder.resume existed); record the run again")
        spec = [list(s) for s in param_spec(model)]
        if spec != facts["param_spec"]:
            recorded = facts["param_spec"]
            diff = next(((a, b) for a, b in zip(recorded, spec) if a != b), (recorded[len(spec):][:3], spec[len(recorded):][:3]))
            raise ValueError(f"model: the recording at {path!r} was made on another model (recorded parameter {diff[0]} vs model "
                             f"parameter {diff[1]}; {len(recorded)} recorded vs {len(spec)} model parameters)")
        recorded = facts["policy"]
        if policy is None:
            try:
                policy = HistoryPolicy(**recorded)
            except (TypeError, ValueError) as err:
                raise ValueError(f"path: the recording at {path!r} holds an invalid policy {recorded!r:.200} ({err})") from None
        elif not isinstance(policy, HistoryPolicy):
            raise ValueError(f"policy: a HistoryPolicy (or None: the recording's own), got {type(policy).__name__}")
        now = _policy_facts(policy)
        if now != recorded:
            changed = {k: (recorded.get(k), now.get(k)) for k in sorted(set(now) | set(recorded)) if recorded.get(k) != now.get(k)}
            raise ValueError(f"policy: differs from the one the recording at {path!r} was made with (recorded, now): {changed}")
        names = select_params(model, policy.params)
        params = dict(model.named_parameters())
        if names != history.param_names or [tuple(params[n].shape) for n in names] != history.shapes:
            raise ValueError(f"model: policy.params selects {names[:5]} on the model, the recording at {path!r} holds {history.param_names[:5]}")
        snap_marks = [c["mark"] for c in history.chunks]
        digest = weights_digest(model)
        marks = [j for j, m in enumerate(snap_marks) if m == digest]
        if not marks:
            raise ValueError(f"model: its weights match none of the {sum(m is not None for m in snap_marks)} flush points of the recording at "
                             f"{path!r}; resume from the trainer checkpoint saved together with a flush() (the model's weights at that step)")
        j = marks[-1]  # (two flushes at one step: the later one, which may follow an end_epoch())
        epochs, lrs = [], {}
        for c in history.chunks[: j + 1]:
            head = store.read_part(path, c["parts"]["index"], repr(path))
            epochs.append(int(head["epoch"][0]))
            if head["lr"].numel():
                lrs.setdefault(epochs[-1], float(head["lr"][0]))
        at = epochs[-1]  # the recorder's epoch when it flushed (its open rows were of that epoch)
        if epoch is None:
            epoch = at
        elif type(epoch) is not int or epoch < at:
            raise ValueError(f"epoch: the recording at {path!r} was flushed in epoch {at}; it continues there or later, got {epoch!r}")
        return {"policy": policy, "recording_id": history.recording_id, "mark": j, "epoch": epoch,
                "rows": sum(c["steps"] for c in history.chunks[: j + 1]), "lrs": [lrs[e] for e in sorted(lrs)]}

    @classmethod
    def resume(cls, path, model, optimizer, policy=None, chunk_size=16, epoch=None):
        """Continue a recording streamed to `path` (FirstEpochRecorder(..., path=)) by a run that stopped (killed, or
        restarted from a trainer checkpoint): `model` and `optimizer` hold the state of a trainer checkpoint saved
        right after a flush() of that recording. Rows streamed after that flush are dropped (the trainer repeats
        their steps). policy: None takes the recording's; one given must equal it. epoch: the epoch training
        continues in (default: the one of the flush; a trainer that saved at an epoch's last step, before
        end_epoch(), continues in the next one).

        ValueError naming what does not match: a finished history (path), another model (its parameter names or
        shapes), weights that match no flush point (model), another policy (policy), an epoch before the flush's.
        The run that streamed to `path` must have stopped (close(), or its process ended: a recorder still streaming there
        is refused): the recording is cut back
        to the mark in place (copy the directory first to keep what followed, as hf.record does per checkpoint)."""
        plan = cls.check_resume(path, model, policy, epoch)
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        rec = cls(model, optimizer, plan["policy"], chunk_size)
        rec.epoch, rec.lrs, rec.rows = plan["epoch"], plan["lrs"], plan["rows"]
        rec.path, rec.recording_id = path, plan["recording_id"]
        lock = store.hold_recording(path)  # (refused while another recorder still streams here; before anything is truncated)
        try:
            store.truncate(path, "FirstEpochHistory", rec.recording_id, plan["mark"] + 1)
        except BaseException:
            os.close(lock)
            raise
        rec._writer = _ChunkWriter(path, rec.recording_id, "FirstEpochHistory", lock=lock)
        return rec


def _policy_facts(policy):
    """A policy as the recording stores it (JSON: a tuple of patterns reads back as a list)."""
    return json.loads(json.dumps(dataclasses.asdict(policy)))
