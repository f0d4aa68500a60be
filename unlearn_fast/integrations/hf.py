"""Record a GradientHistory from a Hugging Face `transformers.Trainer` (causal language models).

    from unlearn_fast.integrations import hf
    trainer = Trainer(model, TrainingArguments(..., remove_unused_columns=False), train_dataset=ds, data_collator=c)
    cb = hf.record(trainer, policy=uf.HistoryPolicy(kind="full"))   # "full": finish() computes no summary
    trainer.train()
    history = cb.finish()                       # or GradientHistory.load(<checkpoint>/unlearn_history)
    result = uf.unlearn(model, history, forget, cb.replay_set, cb.replay_loss, method="retrain")

How a step's indices reach the recorder: `record` wraps the data set so that each example carries its index
(INDEX_KEY), and the data collator so that the batch carries them as a tensor; a forward pre-hook on the model
takes them out before the model sees them and queues them. The forward hook, not the collator, queues: the
Trainer (and accelerate's DataLoader) collate batches ahead of their use, possibly in worker processes, but run
forward in order, one call per micro-batch. `on_pre_optimizer_step` (after the Trainer's clipping) records the
micro-batches of that optimizer step as one step.

What the replay reproduces (measured in tests/test_integrations.py, docs/integrations.md): the Trainer's step
loss is the next-token cross-entropy summed over all micro-batches of the step and divided by its label count
(`num_items_in_batch`), so replaying the step's samples as one batch with `TrainerLoss` gives the same gradient;
its clipping (`max_grad_norm`, on by default at 1.0, `clip_grad_norm_`) goes into the history as
meta["recording"]["clip_max_norm"], which retrain and rewind replay after each replayed backward (so a retrain
without some samples clips what it really would) and deltagrad / mini refuse. Dropout is replayed with the Trainer's
masks by a single-process kind="full" recording (each step's random generator state is recorded, the replay pads each
batch as the collator did: ReplayTexts, and with accumulation replays the micro-batches one by one, weighted by their
label tokens), and under DDP (every rank's states; with accumulation every rank's micro-batches, replayed one by one);
a kind="minimal" recording refuses it unless allow_dropout=True (the replay then draws other masks). bf16=True (CPU autocast) is recorded and replayed under it, the micro-batches
of an accumulated step one by one (a bfloat16 product rounds once per call), each DDP rank's part as its own forward
(with accumulation its micro-batches one by one, as with dropout). fp16 (its gradient scaler), label smoothing, a
custom loss, NEFTune noise, FSDP and DeepSpeed are refused, each naming the setting. Under DDP (torchrun)
a distributed.DistributedRecorder on the Trainer's DDP model gathers every rank's indices into the world batch and
rank 0 records it (cb.finish() returns None on the other ranks).

Checkpoints and resume (docs/integrations.md). A run that saves checkpoints streams its recording
(HistoryRecorder(path=...), under <output_dir>/RECORDING_DIR); on_save flushes it (the last chunk is marked with the
weights' digest) and copies it, chunks and marks included, into checkpoint-<step>/HISTORY_DIR, bound to the
checkpoint (meta["checkpoint"]). trainer.train(resume_from_checkpoint=...) after hf.record on a new Trainer loads that
copy, checks it against the restored Trainer (weights digest, global step, n_train, policy, parameter names,
settings), copies it to a new recording directory and continues it with HistoryRecorder.resume: the finished history
equals an uninterrupted run's (schedule, trajectory rows, Mini's checkpoints). The checkpoint is only read.
A per_sample= recording (lm.FirstEpochRecorder) of a resumable run streams beside it (<run directory>PER_SAMPLE_SUFFIX),
is flushed and copied into checkpoint-<step>/PER_SAMPLE_DIR by on_save, and is continued from that copy
(FirstEpochRecorder.resume) by a resumed train(): its rows equal an uninterrupted run's.
"""
import collections
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import time
import uuid
import weakref

import torch
from transformers import TrainerCallback

from .. import store
from . import distributed  # before the Trainer initialises torch.distributed (see distributed.py's imports)
from ..history import GradientHistory, HistoryPolicy, weights_digest
from ..recording import HistoryRecorder, optimizer_meta, optimizer_settings
from ..methods._common import graph_leaves

INDEX_KEY = "uf_index"
HISTORY_DIR = "unlearn_history"  # saved inside each checkpoint-<step> folder of the Trainer
# a resumable per_sample= recording: its copy in each checkpoint-<step> folder, and the suffix of the directory it streams
# to (beside the run's step recording)
PER_SAMPLE_DIR = "unlearn_per_sample_history"
PER_SAMPLE_SUFFIX = "-per_sample"
# a run that saves checkpoints streams its recording to <output_dir>/RECORDING_DIR/run-<time>-<id> (one directory per
# train() call, resumed ones included); each checkpoint gets a copy of it as it stands at that step
RECORDING_DIR = "unlearn_recording"
# meta keys the callback or the recorder's finish()/snapshot() add to the recorder's own (policy, param_spec,
# optimizer, group_of_param): dropped from the copy a resumed run continues, which is an unfinished recording
BOUND_KEYS = ("n_train", "final_digest", "checkpoint", "hf_trainer", "recording", "loss_check")


class IndexedExamples(torch.utils.data.Dataset):
    """A map-style data set of dict examples whose example i also carries INDEX_KEY: i."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        example = self.dataset[i]
        if not isinstance(example, collections.abc.Mapping):
            raise ValueError(f"train_dataset: example {i} is a {type(example).__name__}; the Trainer integration needs dict examples")
        if INDEX_KEY in example:
            raise ValueError(f"train_dataset: example {i} already has a field {INDEX_KEY!r}, which the recorder reserves")
        return {**example, INDEX_KEY: int(i)}


class IndexCollator:
    """Wraps a data collator: takes INDEX_KEY out of every example, collates the rest with the wrapped collator,
    and puts the indices back as an int64 tensor under INDEX_KEY. Batches with no index at all (evaluation
    sets) pass through unchanged."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        has = [INDEX_KEY in f for f in features]
        if not any(has):
            return self.collator(features)
        if not all(has):
            raise ValueError(f"data collator: {has.count(False)} of {len(features)} examples carry no {INDEX_KEY!r} field")
        indices = torch.tensor([int(f[INDEX_KEY]) for f in features], dtype=torch.int64)
        batch = self.collator([{k: v for k, v in f.items() if k != INDEX_KEY} for f in features])
        batch[INDEX_KEY] = indices
        return batch


class TrainerLoss:
    """The Trainer's step loss for a causal LM, as a loss_fn(output, labels) for the methods.

    The Trainer sums the next-token cross-entropy over all micro-batches of a step and divides by
    num_items_in_batch, the count of labels other than -100 in the step. transformers 5.24 counts them over
    labels[..., 1:] (the predicted positions) only when the model declares a causal-LM loss_type; GPT-2 declares
    none, and its count includes each row's first label, which is never predicted (measured: 45 labels for 41
    predictions, a gradient 41/45 of the shifted mean). count="all" divides like that, count="shifted" by the
    predicted positions; the callback reads which one the Trainer uses.

    max_grad_norm > 0 (not used by the callback since the methods replay clipping from the history; for replays
    that clip in the loss): clip_grad_norm_ multiplies the
    step's gradient g by min(1, max_norm / (|g| + 1e-6)), which is the gradient of the loss times the same
    (detached) coefficient, computed here from the replayed batch's own gradient, so that a retrain without
    some samples clips as the Trainer would have. That gradient needs the parameters, which a loss function is
    not given: they are the leaves of the loss's autograd graph (the methods work on a private copy of the
    model, so no reference to it could be kept). Costs one extra backward pass per step."""

    def __init__(self, count="shifted", max_grad_norm=0.0):
        if count not in ("shifted", "all"):
            raise ValueError(f"TrainerLoss: count must be 'shifted' or 'all', got {count!r}")
        self.count, self.max_grad_norm = count, float(max_grad_norm)

    def count_items(self, labels):
        """The label tokens this loss averages over in `labels`: a micro-batch's share of the Trainer's num_items_in_batch."""
        return int(((labels[:, 1:] if self.count == "shifted" else labels) != -100).sum())

    def __call__(self, output, labels):
        logits = output.logits if hasattr(output, "logits") else output
        shift_logits = logits[:, :-1].float()  # the model's own loss upcasts too
        shift_labels = labels[:, 1:]
        count = (shift_labels != -100).sum() if self.count == "shifted" else (labels != -100).sum()
        # no data-dependent check here (torch.func transforms call loss functions per sample): a batch without
        # labels contributes zero instead of the Trainer's 0 / 0
        count = count.clamp(min=1)
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum") / count
        if self.max_grad_norm <= 0 or not loss.requires_grad:
            return loss
        leaves = graph_leaves(loss)
        grads = torch.autograd.grad(loss, leaves, retain_graph=True)
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        return loss * coef.detach()


def replay_set(dataset, collator, pad_id=0):
    """The training set as (input_ids, labels) pairs for the methods (a TensorDataset, right-padded to one
    length: labels -100 there). Each example is collated alone with the Trainer's collator, so its labels are
    the ones the Trainer trained on; without an attention mask right padding changes nothing for a causal
    model (a position never attends to later ones), which the recording hook checks the Trainer's batches for."""
    rows = []
    for i in range(len(dataset)):
        example = dataset[i]
        if isinstance(example, collections.abc.Mapping) and INDEX_KEY in example:
            example = {k: v for k, v in example.items() if k != INDEX_KEY}
        batch = collator([example])
        if "input_ids" not in batch or "labels" not in batch:
            raise ValueError(f"data collator: the batch of example {i} has no 'input_ids' or 'labels' (keys {sorted(batch)})")
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        if "attention_mask" in batch:  # padding of a one-example batch (pad_to_multiple_of): keep only real tokens
            mask = batch["attention_mask"][0].bool()
            _check_right_padded(mask[None], labels[None], f"example {i}")
            ids, labels = ids[mask], labels[mask]
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), length), -100, dtype=torch.int64)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)], labels[i, : len(lab)] = ids, lab
    return ReplayTexts(input_ids, labels, torch.tensor([len(ids) for ids, _ in rows]), getattr(collator, "pad_to_multiple_of", None) or 1)


class ReplayTexts(torch.utils.data.TensorDataset):
    """replay_set()'s data set: (input_ids, labels) right-padded to the longest example, whose batches (fetch_batch)
    are padded as the Trainer's collator pads them: to the batch's longest example, rounded up to pad_multiple. The
    shape matters to dropout: its masks are drawn over the padded batch, so only a batch of the Trainer's shape
    replays the Trainer's masks."""

    def __init__(self, input_ids, labels, lengths, pad_multiple=1):
        super().__init__(input_ids, labels)
        self.lengths, self.pad_multiple = lengths, int(pad_multiple)  # real tokens per example (the hook compares batches with them)

    def width(self, indices):
        longest = int(self.lengths[indices].max()) if len(indices) else 0
        return min(-(-longest // self.pad_multiple) * self.pad_multiple, self.tensors[0].shape[1])

    def fetch_batch(self, indices):
        w = self.width(indices)
        return tuple(t[indices, :w] for t in self.tensors)


def _check_right_padded(mask, labels, where):
    mask = mask.bool()
    # right padding: each row of the mask is ones then zeros (non-increasing)
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"{where}: attention_mask is not right-padded (left padding or holes); the replay needs "
                         "right padding (tokenizer.padding_side='right')")
    if bool(((labels != -100) & ~mask).any()):
        raise ValueError(f"{where}: padding positions have labels other than -100; the Trainer trains on padding, which depends "
                         "on the batch's other samples and cannot be replayed")


def dropout_settings(model):
    """Names and probabilities of the dropout a model applies in training mode (modules and config fields)."""
    found = []  # config fields first: they are what a user changes
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        for key, value in config.to_dict().items():
            # summary_* fields configure GPT-2's sequence-summary head (double-heads models), absent from causal LMs
            if ("dropout" in key or "pdrop" in key) and not key.startswith("summary_") and isinstance(value, float) and value > 0:
                found.append((f"config.{key}", value))
    found += [(name, m.p) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
    return found


def _check_trainer(trainer, allow_dropout, kind):
    from transformers import Trainer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    args = trainer.args
    if args.remove_unused_columns:
        raise ValueError(f"TrainingArguments.remove_unused_columns=True drops the {INDEX_KEY!r} field the recorder needs; "
                         "set remove_unused_columns=False")
    if args.world_size > 1:
        # DDP through the Trainer: rank 0 records the world batches (distributed.DistributedRecorder)
        from transformers.training_args import ParallelMode

        if args.parallel_mode != ParallelMode.DISTRIBUTED or getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise ValueError(f"TrainingArguments: world_size={args.world_size} with parallel mode {args.parallel_mode}"
                             f"{' (FSDP)' if getattr(args, 'fsdp', None) else ''}{' (DeepSpeed)' if getattr(args, 'deepspeed', None) else ''}; "
                             "the Trainer integration records single-process and DDP runs")
        if not args.average_tokens_across_devices:
            raise ValueError(f"TrainingArguments.average_tokens_across_devices=False with world_size={args.world_size}: each rank divides "
                             "by its own label count and DDP averages the ranks, which is not the world batch's loss the replay computes")
        if not trainer.model_accepts_loss_kwargs:
            raise ValueError(f"world_size={args.world_size} with a model that takes no num_items_in_batch: each rank averages its own "
                             "tokens and DDP averages the ranks, which is not the world batch's loss the replay computes")
    if getattr(args, "load_best_model_at_end", False):
        raise ValueError("TrainingArguments.load_best_model_at_end=True: the Trainer ends on the weights of its best checkpoint, "
                         "which the recorded steps do not replay to; train without it and use that checkpoint's own history "
                         f"(checkpoint-N/{HISTORY_DIR}, bound to its weights)")
    if args.n_gpu > 1:
        raise ValueError(f"TrainingArguments: n_gpu={args.n_gpu} (DataParallel); the Trainer integration records single-device runs")
    if getattr(args, "fp16", False):
        raise ValueError("TrainingArguments.fp16=True: float16 steps with a gradient scaler are not replayed exactly; train in "
                         "full precision or with bf16=True")
    if getattr(args, "label_smoothing_factor", 0):
        raise ValueError(f"TrainingArguments.label_smoothing_factor={args.label_smoothing_factor}: the replay loss has no label smoothing")
    if getattr(args, "neftune_noise_alpha", None):
        raise ValueError("TrainingArguments.neftune_noise_alpha: random embedding noise cannot be replayed")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError("Trainer(compute_loss_func=...): a custom loss is not what the replay computes")
    for method in ("compute_loss", "training_step"):
        if getattr(type(trainer), method) is not getattr(Trainer, method):
            raise ValueError(f"{type(trainer).__name__}.{method} is overridden: the replay computes the stock Trainer's loss only")
    model = trainer.model
    if type(model).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise ValueError(f"model: {type(model).__name__} is not a causal language model; the replay loss is next-token cross-entropy")
    if args.gradient_accumulation_steps > 1 and not trainer.model_accepts_loss_kwargs:
        raise ValueError(f"TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps} with a model that takes no "
                         "num_items_in_batch: the Trainer averages per micro-batch means, which one replayed batch does not")
    drop = dropout_settings(model)
    # a kind="full" recording keeps each step's random generator state (under DDP every rank's, and with accumulation every
    # rank's micro-batches, which the replay forwards one by one): its replay draws the Trainer's masks
    if drop and not allow_dropout and kind != "full":
        names = ", ".join(f"{n}={p}" for n, p in drop[:6])
        raise ValueError(f"model: dropout is active in training ({names}); a kind={kind!r} recording keeps no random generator states "
                         "to replay its masks, so retrain would not reproduce the model. Record kind='full', set these to 0 "
                         "(e.g. GPT2Config(resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)) or pass allow_dropout=True to record anyway (replays then differ)")
    return drop


class HistoryCallback(TrainerCallback):
    """Records every optimizer step of a Trainer into a HistoryRecorder. Build it with `record(trainer)`."""

    def __init__(self, trainer, policy=None, allow_dropout=False, save_history=True, per_sample=None, resumable=None, recording_dir=None):
        self.policy, self.save_history = policy or HistoryPolicy(), save_history
        if resumable is None:  # stream (and so be resumable) exactly when the Trainer will write checkpoints
            strategy = getattr(trainer.args.save_strategy, "value", trainer.args.save_strategy)
            resumable = bool(save_history) and str(strategy) != "no"
        if resumable and not save_history:
            raise ValueError("hf.record: resumable=True needs save_history=True (a resume continues the history saved with its checkpoint)")
        self.world_size = int(trainer.args.world_size)
        if self.world_size > 1 and per_sample is not None:
            raise ValueError(f"hf.record: per_sample= with world_size={self.world_size} is not implemented (each rank sees its own samples)")
        self.resumable, self.recording_dir = bool(resumable), recording_dir
        self._dist, self._trainer = None, None  # DDP: the DistributedRecorder (every rank); a weak reference to the Trainer
        if per_sample is not None and getattr(per_sample, "kind", None) not in ("first_epoch", "all_epochs"):
            raise ValueError(f"per_sample: a HistoryPolicy of kind 'first_epoch' or 'all_epochs', got {per_sample!r}")
        if per_sample is not None and not per_sample.per_sample:
            raise ValueError("per_sample: the policy records per-sample gradients; set HistoryPolicy(..., per_sample=True)")
        self.per_sample_policy, self.per_sample, self._per_sample_history = per_sample, None, None
        self.dropout, self.allow_dropout = _check_trainer(trainer, allow_dropout, self.policy.kind), allow_dropout
        self.dataset = trainer.train_dataset.dataset if isinstance(trainer.train_dataset, IndexedExamples) else trainer.train_dataset
        self.collator = trainer.data_collator.collator if isinstance(trainer.data_collator, IndexCollator) else trainer.data_collator
        self.max_grad_norm = float(trainer.args.max_grad_norm or 0.0)
        self.accumulation = trainer.args.gradient_accumulation_steps
        # how the Trainer counts num_items_in_batch (see TrainerLoss); a model that takes no num_items_in_batch
        # averages its own loss over the predicted positions (accumulation > 1 is refused then)
        shifted = getattr(trainer, "_loss_shifts_labels", False) or not trainer.model_accepts_loss_kwargs
        self.count = "shifted" if shifted else "all"
        self.recorder, self.queue, self.inputs, self.micro_batches = None, [], [], 0
        self._replay_set, self._hook, self._data_digest = None, None, None
        self._resume_from = None  # the checkpoint folder of the coming train() call (set by the wrapper record() installs)
        self.resumed_from = []  # [{"global_step", "checkpoint"}] of every resume this recording went through

    # -- the forward pre-hook (registered on the model by `record`)
    def _pre_forward(self, module, args, kwargs):
        if INDEX_KEY not in kwargs:
            if module.training and (self.recorder is not None or self._dist is not None):
                raise ValueError(f"a training batch reached the model without {INDEX_KEY!r}: the data set or collator was replaced "
                                 "after hf.record(trainer), or TrainingArguments.remove_unused_columns dropped it")
            return None
        kwargs = dict(kwargs)
        indices = kwargs.pop(INDEX_KEY)
        if module.training and torch.is_grad_enabled():
            mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
            extra = sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask", "labels", "num_items_in_batch"))
            if extra:
                raise ValueError(f"training batch: fields {extra} are not replayed (only input_ids, attention_mask and labels)")
            if labels is None:
                raise ValueError("training batch: no 'labels'; the recorder replays the Trainer's label loss")
            if mask is not None:
                _check_right_padded(mask, labels, "training batch")
            self._check_same_as_replay(indices.detach().cpu(), kwargs["input_ids"], labels, mask)
            self.queue.append(indices.detach().cpu())
            if self.per_sample is not None and self.per_sample._recording():  # per-sample gradients at these weights, before the step
                self.inputs.append((indices.detach().cpu(), kwargs["input_ids"].detach(), labels.detach()))
        return args, kwargs

    def _check_same_as_replay(self, indices, input_ids, labels, mask):
        """The replay feeds each example as collated alone: a random transform of the data set or a collator whose
        output depends on the batch (masking, packing) would make it replay other data than the Trainer saw."""
        ids_all, labels_all = self.replay_set.tensors
        lengths = self.replay_set.lengths
        n_real = mask.sum(1) if mask is not None else torch.full((len(indices),), input_ids.shape[1])
        for r, i in enumerate(indices.tolist()):
            n = int(n_real[r])
            if (n != int(lengths[i]) or not torch.equal(input_ids[r, :n].cpu(), ids_all[i, :n])
                    or not torch.equal(labels[r, :n].cpu(), labels_all[i, :n])):
                raise ValueError(f"training batch: example {i} differs from the same example collated alone (a random transform "
                                 "in the data set, or a collator whose output depends on the batch); the replay could not feed "
                                 "what the Trainer trained on")
        width = self.replay_set.width(indices)
        if self.dropout and not self.allow_dropout and input_ids.shape[1] != width:
            raise ValueError(f"training batch: padded to {input_ids.shape[1]} tokens where the replay pads to {width} (the longest "
                             f"example, rounded up to the collator's pad_to_multiple_of={self.replay_set.pad_multiple}); dropout masks "
                             "are drawn over the padded batch, so the replay would draw others. Pad to the longest example (or to a "
                             "multiple of it), set the dropout to 0, or pass allow_dropout=True to record anyway (replays then differ)")

    # -- Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        checkpoint, self._resume_from = self._resume_from, None
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer: {type(optimizer).__name__} is not a torch.optim.Optimizer; the replay rebuilds a torch optimizer")
        # the replay loss reproduces the Trainer's accumulation (one token mean over the step), so the recorder is told
        # not to refuse it; the Trainer's clipping (clip_grad_norm_ at max_grad_norm) is norm clipping, which the
        # recorder notes itself and retrain / rewind replay (meta["recording"]["clip_max_norm"], set from the
        # TrainingArguments by finish() and snapshot(), also when no step happened to clip)
        # With dropout, though, one replayed batch would draw other masks than the micro-batches did, and under bf16 autocast
        # round otherwise (a bfloat16 product rounds its output once per call): the recorder then records the micro-batches
        # and the replay runs them one by one, each weighted by its share of the step's label tokens
        # (accumulation_weighting "loss_count", TrainerLoss.count_items)
        per_micro = (bool(self.dropout) or bool(args.bf16)) and self.accumulation > 1 and self.world_size == 1
        allow = ("accumulation",) if self.accumulation > 1 and not per_micro else ()
        if self.recorder is not None:
            self.recorder.close()  # a second train() on this Trainer: the earlier recording stops (its hooks come off)
        if self.per_sample is not None and self.per_sample.path is not None and not self.per_sample.finished:
            self.per_sample.close()  # (its writer thread stops; the history there stays unfinished)
        self._per_sample_history = None
        per_sample = None
        if self.world_size > 1:
            self.recorder = self._distributed(args, state, model, optimizer, allow, checkpoint)
        elif state.global_step > 0:
            self.recorder, per_sample = self._continue(args, state, model, optimizer, allow, checkpoint)
        else:
            self.resumed_from = []
            path = self._new_recording_path(args) if self.resumable else None
            self.recorder = _Recorder(model, optimizer, self.policy, allow=allow, path=path)
        if per_micro:
            self.recorder._seen_features["accumulation_weighting"] = "loss_count"
        if self.per_sample_policy is not None and per_sample is None:
            from ..lm.recording import FirstEpochRecorder

            # streamed beside the step recording when that one is (resumable): on_save copies it into each checkpoint
            path = None if self.recorder.path is None else self.recorder.path + PER_SAMPLE_SUFFIX
            per_sample = FirstEpochRecorder(model, optimizer, self.per_sample_policy, path=path)
        self.per_sample = per_sample
        self.queue, self.inputs, self.micro_batches = [], [], 0

    def _distributed(self, args, state, model, optimizer, allow, checkpoint):
        """DDP through the Trainer: a DistributedRecorder on the DDP-wrapped model (every rank); it gathers every
        rank's indices of a step into the world batch and rank 0 records it (streamed when resumable, like a
        single-process run). A resumed train(): rank 0 checks and copies the checkpoint's recording as _continue does,
        every rank raises its refusal alike, and DistributedRecorder.resume continues the copy. Returns rank 0's
        HistoryRecorder (None on the other ranks). The Trainer clips after DDP's all-reduce, which the
        DistributedRecorder would refuse as an edit: clipping is allowed there and replayed from the TrainingArguments
        (meta["recording"]["clip_max_norm"])."""
        trainer = self._trainer() if self._trainer is not None else None
        wrapped = getattr(trainer, "model_wrapped", None)
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"world_size={self.world_size}: the Trainer's model is not DistributedDataParallel "
                             f"({type(wrapped).__name__}); the integration records DDP runs only")
        if self.max_grad_norm > 0:
            allow = tuple(allow) + ("clipping",)
        if self.dropout and self.allow_dropout:  # (else each rank's generator states are kept: DistributedRecorder)
            allow = tuple(allow) + ("dropout",)
        if state.global_step == 0:
            self.resumed_from = []
            path = self._new_recording_path(args) if self.resumable else None
            self._dist = distributed.DistributedRecorder(wrapped, optimizer, self.policy, allow=allow, path=path)
            return self._dist.recorder
        rank = torch.distributed.get_rank()
        copied = distributed.on_rank0(None, rank, lambda: self._copy_for_resume(args, state, model, optimizer, checkpoint))
        self._dist = distributed.DistributedRecorder.resume(copied[0] if copied else None, wrapped, optimizer, allow=allow,
                                                            features=copied[1].meta.get("recording") if copied else None)
        if copied:
            self._note_resume(copied[1], state.global_step, checkpoint)
        return self._dist.recorder

    def on_train_end(self, args, state, control, **kwargs):
        # the model outlives the run (deep copies, torch.save): it must not keep a hook that expects indexed batches
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        expected = self.micro_batches + 1
        if len(self.queue) != expected:
            raise ValueError(f"step {state.global_step}: {len(self.queue)} indexed micro-batches reached the model for {expected} "
                             "backward passes; the recorder cannot tell which samples made this step")
        (self._dist or self.recorder).record(torch.cat(self.queue))  # DDP: collective, every rank its own indices
        for indices, input_ids, labels in self.inputs:  # (the parameters are still those the micro-batches saw)
            self.per_sample.record(indices, input_ids, labels)
        self.queue, self.inputs, self.micro_batches = [], [], 0

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.per_sample is not None:
            self.per_sample.end_epoch()

    def on_save(self, args, state, control, **kwargs):
        if not self.save_history or self.recorder is None or not self.recorder.num_steps:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", HISTORY_DIR)
        if self.recorder.num_steps != state.global_step:
            raise ValueError(f"checkpoint at global step {state.global_step}: the recording holds {self.recorder.num_steps} steps")
        if self.recorder.path is None and self.recorder.policy.kind != "full":
            return  # a kind="minimal" recording in memory keeps no batch order: nothing a checkpoint's history could replay
        history = self.snapshot()  # a streamed recording is flushed first: its last chunk is marked with the weights' digest
        # binds the saved history to the checkpoint's weights (what a resume checks)
        history.meta["checkpoint"] = {"global_step": state.global_step, "weights_digest": history.meta["final_digest"]}
        if self.recorder.path is None:
            history.save(path)  # the schedule only: enough for retrain to this checkpoint, not to continue the recording
            return
        # the recording as it stands, chunks (rows, Mini's checkpoints) and flush marks included, under the snapshot's
        # meta: retrain replays it to this checkpoint, and a resume copies it and continues the copy
        # (HistoryRecorder.resume); the checkpoint is self-contained and never written to again by a later run
        snap = store.read(self.recorder.path, "GradientHistory")
        if sum(c["steps"] for c in snap.chunks) != state.global_step or not snap.chunks:
            raise ValueError(f"checkpoint at global step {state.global_step}: the recording at {self.recorder.path} holds "
                             f"{sum(c['steps'] for c in snap.chunks)} steps after flush()")
        # the last chunk ends at this step: it carries the weights' digest (flush() marks it, unless it was sealed before)
        store.link_copy(self.recorder.path, snap, path, "GradientHistory", dict(snap.info, meta=history.meta),
                        [c["mark"] for c in snap.chunks[:-1]] + [history.meta["final_digest"]])
        if self.per_sample is not None and self.per_sample.path is not None and not self.per_sample.finished:
            self._save_per_sample(os.path.join(os.path.dirname(path), PER_SAMPLE_DIR), state.global_step, history.meta["final_digest"])

    def _save_per_sample(self, path, step, digest):
        """The per-sample recording as it stands, copied into the checkpoint (chunks and flush marks included, like the
        step recording's copy): flushed first, so its last chunk carries the checkpoint weights' digest that
        FirstEpochRecorder.resume looks for; bound to the checkpoint (info["checkpoint"])."""
        rec = self.per_sample
        rec.flush()
        snap = store.read(rec.path, "FirstEpochHistory")
        if not snap.chunks or snap.chunks[-1]["mark"] != digest:
            raise ValueError(f"checkpoint at global step {step}: the per-sample recording at {rec.path} does not end with a flush mark "
                             "of the checkpoint's weights")
        info = dict(snap.info, checkpoint={"global_step": step, "weights_digest": digest})
        store.link_copy(rec.path, snap, path, "FirstEpochHistory", info)

    # -- resume
    def _new_recording_path(self, args):
        base = self.recording_dir or os.path.join(args.output_dir, RECORDING_DIR)
        return os.path.join(base, f"run-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}")

    def _continue(self, args, state, model, optimizer, allow, checkpoint):
        """The recorder of a train() resumed from `checkpoint`: the recording saved there, checked against the restored
        Trainer, copied to a new recording directory and continued (HistoryRecorder.resume). Every check runs before
        anything is written; the checkpoint is only read."""
        new, history, per_sample_path, epoch = self._copy_for_resume(args, state, model, optimizer, checkpoint)
        recorder = _Recorder.resume(new, model, optimizer, allow=allow, features=history.meta.get("recording"))
        per_sample = None
        if self.per_sample_policy is not None:  # the same: a copy of the checkpoint's, continued
            from ..lm.recording import FirstEpochRecorder

            snap = store.read(per_sample_path, "FirstEpochHistory")
            info = {k: v for k, v in snap.info.items() if k != "checkpoint"}
            store.link_copy(per_sample_path, snap, new + PER_SAMPLE_SUFFIX, "FirstEpochHistory", info)
            per_sample = FirstEpochRecorder.resume(new + PER_SAMPLE_SUFFIX, model, optimizer, self.per_sample_policy, epoch=epoch)
        self._note_resume(history, state.global_step, checkpoint)
        return recorder, per_sample

    def _note_resume(self, history, step, checkpoint):
        # the counters of the steps before the checkpoint, and the chain of resumes, for the finished history's meta
        self.resumed_from = list(history.meta.get("hf_trainer", {}).get("resumed_from", [])) + [
            {"global_step": step, "checkpoint": os.path.abspath(checkpoint)}]

    def _copy_for_resume(self, args, state, model, optimizer, checkpoint):
        """The checks of a resume from `checkpoint` (ValueError listing every problem, before anything is written),
        then its recording copied to a new recording directory: (that directory, the checkpoint's history, the
        per-sample copy's path, the epoch the Trainer resumes in)."""
        step = state.global_step
        if checkpoint is None:
            raise ValueError(f"resume: training starts at global step {step}, not from a checkpoint passed to trainer.train(resume_from_checkpoint=...) "
                             "after hf.record(trainer); the recorder cannot tell which history to continue")
        where = f"resume_from_checkpoint={checkpoint!r}"
        if not self.resumable:
            raise ValueError(f"resume: {where}: hf.record(..., resumable=False) records in memory and cannot continue a recording; "
                             "record with resumable=True (the default when checkpoints are saved)")
        path = os.path.join(checkpoint, HISTORY_DIR)
        if not os.path.isdir(path):
            raise ValueError(f"resume: {where} holds no {HISTORY_DIR!r} (saved without hf.record, or with save_history=False); the {step} "
                             "steps before it are not recorded, so the recording cannot continue. Record the run from step 0")
        history = GradientHistory.load(path)
        mark = history.meta.get("checkpoint")
        if history.recording_id is None or not isinstance(mark, dict) or not history.chunk_marks:
            raise ValueError(f"resume: {path} holds the schedule only, not a recording to continue (saved with resumable=False); "
                             "record the run from step 0 with resumable=True")
        problems = []
        try:
            history.check_model(model)
        except ValueError as err:
            problems.append(str(err))
        recorded_policy, policy = history.meta.get("policy"), json.loads(json.dumps(dataclasses.asdict(self.policy)))  # (as stored)
        if recorded_policy != policy:
            changed = {k: (recorded_policy.get(k), v) for k, v in policy.items() if recorded_policy.get(k) != v} if isinstance(recorded_policy, dict) else recorded_policy
            problems.append(f"the policy differs from the recorded one (recorded, now): {changed}")
        old, now = history.meta.get("hf_trainer", {}), self._trainer_meta()
        if history.n_train != len(self.dataset):
            problems.append(f"the training set has {len(self.dataset)} samples, the history was recorded on {history.n_train}")
        elif old.get("data_digest") != now["data_digest"]:
            problems.append(f"the training set's examples (as collated: digest {now['data_digest'][:16]}) are not those the history "
                            f"was recorded on ({str(old.get('data_digest'))[:16]}), though there are as many")
        # (dropout too: its masks are drawn from the recorded generator states, and whether states are kept at all follows it)
        changed = {k: (old.get(k), now[k]) for k in ("max_grad_norm", "gradient_accumulation_steps", "loss_count", "dropout") if old.get(k) != now[k]}
        if changed:
            problems.append(f"settings changed since the checkpoint (TrainingArguments, the model's dropout; recorded, now): {changed}")
        recorded_opt, opt_now = history.meta.get("optimizer", {}), optimizer_meta(optimizer)
        if optimizer_settings(recorded_opt) != optimizer_settings(opt_now):
            problems.append(f"optimizer {opt_now['class']} {optimizer_settings(opt_now)[1]} vs the recorded "
                            f"{recorded_opt.get('class')} {optimizer_settings(recorded_opt)[1]} (learning rates aside)")
        if not (step == mark.get("global_step") == history.num_steps):
            problems.append(f"the Trainer resumes at global step {step}, the history was saved at step {mark.get('global_step')} with "
                            f"{history.num_steps} recorded steps")
        digest = weights_digest(model)
        last_mark = history.chunk_marks.get(len(history.chunk_steps) - 1)
        if not (digest == mark.get("weights_digest") == history.meta.get("final_digest") == last_mark):
            problems.append(f"the restored weights' digest {digest[:16]} is not the one the history was saved with "
                            f"({str(mark.get('weights_digest'))[:16]}): the checkpoint's weights were modified or replaced, or its "
                            "history belongs to another run")
        per_sample_path, epoch = os.path.join(checkpoint, PER_SAMPLE_DIR), int(state.epoch or 0)
        if self.per_sample_policy is not None:
            problems += self._per_sample_problems(per_sample_path, model, step, epoch)
        if problems:
            raise ValueError(f"resume: {where} does not match the history saved with it ({path}): {'; '.join(problems)}. Nothing was "
                             "recorded or changed; resume from an unmodified checkpoint of this run, with the same data and settings")
        snap = store.read(path, "GradientHistory")
        new = self._new_recording_path(args)
        meta = {k: v for k, v in history.meta.items() if k not in BOUND_KEYS}  # an unfinished recording (no final_digest)
        store.link_copy(path, snap, new, "GradientHistory", dict(snap.info, meta=meta))
        return new, history, per_sample_path, epoch

    def _per_sample_problems(self, path, model, step, epoch):
        """Why the per-sample recording saved at `path` cannot be continued by this run (read only; [] if it can).
        epoch: the one the Trainer resumes in (its global step // updates per epoch, int(state.epoch) as restored),
        which is past the flush's when the checkpoint was saved at an epoch's last step (on_save runs before
        on_epoch_end)."""
        from ..lm.recording import FirstEpochRecorder

        if not os.path.isdir(path):
            return [f"it holds no {PER_SAMPLE_DIR!r}, the per-sample recording per_sample= continues (saved without per_sample= or "
                    "with resumable=False); the rows of the steps before it are not recorded"]
        problems = []
        try:
            mark = store.read(path, "FirstEpochHistory").info.get("checkpoint")
            if not isinstance(mark, dict) or mark.get("global_step") != step:
                problems.append(f"the per-sample recording {path} was saved at global step "
                                f"{mark.get('global_step') if isinstance(mark, dict) else None}, the Trainer resumes at {step}")
            FirstEpochRecorder.check_resume(path, model, self.per_sample_policy, epoch=epoch)
        except ValueError as err:
            problems.append(f"the per-sample recording {path}: {err}")
        return problems

    # -- results
    @property
    def replay_set(self):
        """The training set as the methods take it (see replay_set())."""
        if self._replay_set is None:
            self._replay_set = replay_set(self.dataset, self.collator)
        return self._replay_set

    @property
    def data_digest(self):
        """sha256 of the training set as the replay feeds it (replay_set): a resume checks the data did not change."""
        if self._data_digest is None:
            data, h = self.replay_set, hashlib.sha256()
            for t in (*data.tensors, data.lengths):
                h.update(t.contiguous().numpy().tobytes())
            self._data_digest = h.hexdigest()
        return self._data_digest

    @property
    def replay_loss(self):
        """The loss for the methods (retrain, rewind, ...): the Trainer's step loss. Its clipping is in the history
        (meta["recording"]["clip_max_norm"]), which retrain and rewind replay and deltagrad / mini refuse."""
        return TrainerLoss(self.count)

    @property
    def loss_fn(self):
        """The same loss as replay_loss (kept for callers of earlier versions)."""
        return TrainerLoss(self.count)

    def _recording_meta(self, recording):
        """meta["recording"]: the recorder's (finish()) or its features so far (snapshot(); a resumed recorder's count the
        steps before its checkpoint too), and the Trainer's clipping threshold."""
        recording = dict(recording or {})
        if self.max_grad_norm > 0:
            recording["clip_max_norm"] = self.max_grad_norm
        return recording

    def _trainer_meta(self):
        meta = {"max_grad_norm": self.max_grad_norm, "gradient_accumulation_steps": self.accumulation, "loss_count": self.count,
                "world_size": self.world_size, "dropout": [[n, p] for n, p in self.dropout], "data_digest": self.data_digest}
        if self.resumed_from:
            meta["resumed_from"] = self.resumed_from
        return meta

    def snapshot(self):
        """The schedule recorded so far, as a GradientHistory without summary (what retrain needs); cheap. Bound to
        the model's current weights (the checkpoint's, in on_save)."""
        rec = self._require()
        history = rec.snapshot(len(self.dataset))
        history.meta = dict(history.meta, hf_trainer=self._trainer_meta())
        history.meta["final_digest"] = weights_digest(rec.model)  # complete for the weights it replays to: the model's now
        # the recorder's features so far (its finish() reports them; snapshot() does not): a resumed run adds to them
        seen = dict(getattr(rec, "_seen_features", {}), allow=list(rec.allow))
        history.meta["recording"] = self._recording_meta(seen)
        return history

    def finish(self, summary=True):
        """The GradientHistory of the run. summary=False: schedule only (retrain), without finish()'s summary pass.
        DDP: on rank 0; None on the other ranks (not collective)."""
        if self._dist is not None and self.recorder is None:
            return None
        rec = self._require()
        if not summary:
            return self.snapshot()
        history = rec.finish(self.replay_set, self.loss_fn)
        history.meta["hf_trainer"] = self._trainer_meta()
        history.meta["recording"] = self._recording_meta(history.meta.get("recording"))
        if history.path is not None:  # streamed: the finished version at recording_path gets the same meta (its rows stay)
            history.save(history.path)
        return history

    @property
    def recording_path(self):
        """Where this run's recording is streamed (None: in memory); cb.finish() leaves the finished history there."""
        return None if self.recorder is None else self.recorder.path

    def per_sample_history(self):
        """The FirstEpochHistory of the per-sample recording (hf.record(..., per_sample=policy)): each sample's
        gradient of its own mean next-token loss in the first epoch ("first_epoch"), for
        method="first_epoch_ascent" with a train_set indexed like the Trainer's data set (e.g. unlearn_fast.lm's
        TextDataset of the same texts and tokenizer). Rows are computed in eval mode (no dropout)."""
        if self.per_sample is None:
            raise ValueError("per_sample_history: nothing was recorded per sample; pass per_sample=HistoryPolicy(kind='first_epoch', "
                             "per_sample=True) to hf.record and train")
        if self._per_sample_history is None:
            self._per_sample_history = self.per_sample.finish()
        return self._per_sample_history

    def _require(self):
        if self.recorder is None or not self.recorder.num_steps:
            raise ValueError("HistoryCallback: nothing was recorded (call trainer.train() after hf.record(trainer))")
        return self.recorder


class _Recorder(HistoryRecorder):
    """HistoryRecorder, except that a streamed recording never writes a chunk of no steps.

    HistoryRecorder streams a chunk at every flush() and at finish() even when no step was recorded since the last
    chunk (a checkpoint at the last step, then finish(); two saves at one step; a flush right after a chunk filled),
    and writes a kind="full" one without trajectory rows, which GradientHistory.load refuses ("a chunk of 0 steps
    lacks its 0 rows"). Here such a seal is skipped; the flush mark a resume needs is then missing from the last
    chunk, so on_save writes it into the checkpoint's copy itself (every step is in a chunk after flush()). Since
    fd98204 recording.py loads such empty chunks too; this subclass still keeps them out of the checkpoints' copies
    (tests/test_integrations.py::test_resume_where_a_chunk_ended_at_the_checkpoint checks the layout)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sealed_steps = 0

    @classmethod
    def resume(cls, *args, **kwargs):
        recorder = super().resume(*args, **kwargs)
        recorder._sealed_steps = recorder.steps  # every step resumed from is in a chunk
        return recorder

    def _seal(self, mark=None):
        if self.path is not None and self.steps == self._sealed_steps:
            return
        super()._seal(mark)
        self._sealed_steps = self.steps

    def _check_accumulation(self, train_set, loss_fn):
        if self._seen_features.get("accumulation_weighting") != "loss_count":  # (known: the Trainer's token weighting)
            super()._check_accumulation(train_set, loss_fn)


class _IndexHook:
    """The forward pre-hook; a deep copy of the model (uf.unlearn copies it) gets a pass-through hook, not the recorder."""

    def __init__(self, callback):
        self.callback = callback

    def __call__(self, module, args, kwargs):
        return None if self.callback is None else self.callback._pre_forward(module, args, kwargs)

    def __deepcopy__(self, memo):
        return _IndexHook(None)


def record(trainer, policy=None, allow_dropout=False, save_history=True, per_sample=None, resumable=None, recording_dir=None):
    """Attach a recorder to `trainer` (before trainer.train()); returns its HistoryCallback.

    per_sample: a HistoryPolicy of kind "first_epoch" / "all_epochs" (per_sample=True) to record, besides the
    step history, each sample's gradient for first_epoch_ascent (cb.per_sample_history()).
    resumable: stream the recording to disk (recording_dir, default <output_dir>/unlearn_recording, one new
    directory per train() call; a per_sample= recording beside it, PER_SAMPLE_SUFFIX) and save a copy of it with
    every checkpoint (HISTORY_DIR, PER_SAMPLE_DIR), so that trainer.train(resume_from_checkpoint=...) continues it.
    Default: when the Trainer saves checkpoints (save_strategy != "no"). False: in memory; checkpoints hold the
    schedule only and a resume is refused.

    Wraps trainer.train_dataset (examples gain INDEX_KEY) and trainer.data_collator, registers a forward
    pre-hook on trainer.model that takes the indices out, adds the callback, and wraps trainer.train to learn
    which checkpoint a resumed call starts from. The history is saved into every checkpoint folder
    (HISTORY_DIR) when save_history."""
    if trainer.train_dataset is None:
        raise ValueError("trainer: no train_dataset to record")
    if not isinstance(trainer.train_dataset, torch.utils.data.Dataset) or isinstance(trainer.train_dataset, torch.utils.data.IterableDataset):
        raise ValueError(f"trainer.train_dataset: a map-style torch Dataset is needed (indices name its samples), got {type(trainer.train_dataset).__name__}")
    if any(isinstance(cb, HistoryCallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError("trainer: a HistoryCallback is already attached")
    callback = HistoryCallback(trainer, policy, allow_dropout, save_history, per_sample, resumable, recording_dir)
    callback._trainer = weakref.ref(trainer)  # (DDP: on_train_begin needs trainer.model_wrapped, which callbacks are not given)
    if not isinstance(trainer.train_dataset, IndexedExamples):
        trainer.train_dataset = IndexedExamples(trainer.train_dataset)
    if not isinstance(trainer.data_collator, IndexCollator):
        trainer.data_collator = IndexCollator(trainer.data_collator)
    callback._hook = trainer.model.register_forward_pre_hook(_IndexHook(callback), with_kwargs=True)
    trainer.add_callback(callback)
    trainer.train = _ResumeAwareTrain(trainer.train, callback)
    return callback


class _ResumeAwareTrain:
    """trainer.train, noting for the callback which checkpoint the call resumes from: callbacks are not told, and
    on_train_begin must find the history saved with that checkpoint (resume_from_checkpoint=True: the last
    checkpoint in output_dir, as the Trainer resolves it)."""

    def __init__(self, train, callback):
        self.train, self.callback = train, callback
        self.signature = inspect.signature(train)
        functools.update_wrapper(self, train)

    def __call__(self, *args, **kwargs):
        checkpoint = self.signature.bind_partial(*args, **kwargs).arguments.get("resume_from_checkpoint")
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.train.__self__.args.output_dir)  # (None: the Trainer raises itself)
        self.callback._resume_from = None if checkpoint is False else checkpoint
        return self.train(*args, **kwargs)
