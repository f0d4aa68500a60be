"""Record a GradientHistory from a PyTorch Lightning `lightning.Trainer` (automatic optimization).

    import unlearn_fast as uf
    from unlearn_fast.integrations import lightning as ufl
    cb = ufl.HistoryCallback(F.cross_entropy)                     # the mean loss training_step computes
    trainer = L.Trainer(..., callbacks=[cb])
    trainer.fit(module, DataLoader(uf.IndexedDataset(train_set), batch_size=32, shuffle=True))
    history = cb.finish()              # or uf.GradientHistory.load(<checkpoint dir>/unlearn_history/step=N)
    result = uf.unlearn(module, history, forget, cb.train_set, cb.replay_loss, method="retrain")

The batch contract. Each training batch carries the positions of its samples in `train_set`: by default the
training data set is wrapped in uf.IndexedDataset, so a batch is (indices, x, y) and training_step reads
`indices, x, y = batch` (or uf.split_batch(batch)) and returns `loss_fn(self(x), y)`, the MEAN loss of the
batch; any other batch layout needs `indices_of(batch) -> 1-D int tensor`. Every tensor in the batch must have
one row per index. The replay feeds `train_set[i]` = (x_i, y_i) to `module(x)` and `loss_fn`: the callback
checks, on the first optimizer step of every fit, that this gives the gradient Lightning computed (within
LOSS_TOLERANCE), and, for (indices, x, y) batches, that every batch holds exactly the samples it names (a random
augmentation or a wrong index is refused).

Where it records. Lightning calls `optimizer.step(closure)`, and the closure runs the last micro-batch's
backward, `on_before_optimizer_step` and then the clipping (`configure_gradient_clipping`); torch's optimizer
step pre-hooks fire before the closure, so a HistoryRecorder hooked on Lightning's optimizer would see every
step start before its record(). The recorder is therefore handed a step marker: an Optimizer that shares the
real optimizer's param_groups (live learning rates, and the real class's name, which is what `retrain` rebuilds)
and whose step() does nothing; a step post-hook on the real optimizer steps the marker after every real step,
so the recorder's one-record-per-step check still holds. record() runs in `on_before_optimizer_step`, before
Lightning's clipping: the history holds unclipped gradients, and the replay clips (below).

What the replay reproduces (tests/test_lightning.py, docs/integrations.md):
- gradient_clip_val with gradient_clip_algorithm "norm" (torch.nn.utils.clip_grad_norm_ over all parameters):
  written into the history as meta["recording"]["clip_max_norm"], which retrain and rewind replay (clip_grad_norm_
  after each replayed backward) and deltagrad and mini refuse; "value" (clip_grad_value_): ReplayLoss computes the
  replayed batch's gradient, clamps it and returns a loss whose gradient is exactly the clamped one (one extra
  backward per step; retrain only);
- accumulate_grad_batches=A: Lightning divides each micro-batch's mean loss by A, so an optimizer step of A
  micro-batches of one size b is the mean loss over its A*b samples, recorded as ONE step (indices
  concatenated). Steps Lightning scales otherwise are refused: the epoch's last step with fewer than A
  micro-batches (batches per epoch not a multiple of A) and micro-batches of different sizes (a short last
  batch), because the replay, whose loss sees only the step's samples, computes a plain mean over them.
- precision="bf16-mixed" (float32 weights, forwards under bfloat16 autocast; "16-mixed" is that on CPU): recorded
  as meta["recording"]["autocast"], under which the replay forwards; with accumulation the recorder keeps the
  micro-batches (each a bfloat16 product rounded once) and the replay forwards them one by one, under DDP each rank's
  part of the world batch is its own forward, with accumulation its micro-batches one by one (bit for bit in the
  tests; as one batch 1e-3 to 4e-3 off).
Refused, each naming the setting: half-precision weights ("bf16-true", "16-true": they round differently from the
replay), dropout (random masks; allow_dropout=True records anyway), batch norm with accumulation
(batch statistics of micro-batches), manual optimization, several optimizers, a module overriding
configure_gradient_clipping or optimizer_step, strategies that accumulate themselves, multi-process strategies other
than DDP (FSDP, DeepSpeed, ddp_spawn: its processes end with fit()).

DDP (strategy="ddp", every rank runs the callback): a distributed.DistributedRecorder on Lightning's DDP model gathers
every rank's indices of a step into the world batch and rank 0 records it, with each rank's generator state where the
module has dropout (kind="full"); finish() and snapshot() return the history on rank 0 and None on the others. The
first step's check compares Lightning's averaged gradient with the mean of loss_fn's gradients over the ranks' parts.
A DistributedSampler that pads the data set (its size not divisible by the world size) repeats samples and is
refused. Checkpoints and resume work as in one process: rank 0 saves the history copies and checks and copies the
checkpoint's recording on resume, and every rank raises a refusal alike (none is left waiting in a collective).

Checkpoints and resume (docs/integrations.md), as the Hugging Face integration does them. A fit whose Trainer has a
checkpoint callback streams its recording (HistoryRecorder(path=...), a new directory per fit under
<dirpath>/RECORDING_DIR, dirpath the ModelCheckpoint's or HistoryCallback(dirpath=)); on_save_checkpoint flushes it
(its last chunk marked with the weights' digest) and copies it, chunks (batches, trajectory rows, Mini's parameter
checkpoints) and marks included, their objects hard-linked, to <dirpath>/HISTORY_DIR/step=<global_step>, bound to the
checkpoint (meta["checkpoint"] = {"global_step", "weights_digest"}); the checkpoint stores where (CHECKPOINT_KEY).
fit(ckpt_path=...) with a HistoryCallback checks that copy against the restored Trainer (weights digest, global step,
parameter names, n_train, policy, Trainer settings, optimizer; every problem in one ValueError, nothing written), copies
it to a new recording directory and continues it there with HistoryRecorder.resume: the finished history equals an
uninterrupted fit's (schedule, trajectory rows, Mini's checkpoints). A fit without a checkpoint callback records in
memory (a checkpoint saved by hand then gets the schedule only, which a resume refuses).
"""
import contextlib
import dataclasses
import json
import math
import os
import time
import uuid

import torch

try:
    import lightning.pytorch as pl
except ImportError as err:  # the optional dependency: `import unlearn_fast` never imports this module
    raise ImportError("unlearn_fast.integrations.lightning needs PyTorch Lightning: pip install 'unlearn_fast[lightning]'") from err

from .. import store
from . import distributed  # before Lightning initialises torch.distributed (see distributed.py's imports)
from ..data import IndexedDataset
from ..history import GradientHistory, HistoryPolicy, fetch, weights_digest
from ..methods._common import batch_gradient, clip_max_norm, graph_leaves, loss_fingerprint
from ..recording import HistoryRecorder, InertWhenCopied, optimizer_meta, optimizer_settings

HISTORY_DIR = "unlearn_history"  # inside the checkpoint directory: HISTORY_DIR/step=<global_step>
# a fit that saves checkpoints streams its recording to <checkpoint directory>/RECORDING_DIR/run-<time>-<id> (a new
# directory per fit, resumed ones included); each checkpoint's HISTORY_DIR/step=N gets a copy of it as it stands
RECORDING_DIR = "unlearn_recording"
# meta keys that bind a saved history to its checkpoint or are added by finish()/snapshot(): dropped from the copy a
# resumed fit continues, which is an unfinished recording
BOUND_KEYS = ("n_train", "final_digest", "checkpoint", "lightning", "recording", "loss_check")
CHECKPOINT_KEY = "unlearn_fast_history"  # the checkpoint's reference to the history saved with it
# relative difference allowed between Lightning's first gradient and loss_fn's on the same samples: float32
# rounding of a different summation order is ~1e-7; dropout, an extra loss term or other data are far above it
LOSS_TOLERANCE = 1e-3
PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")
AUTOCAST = ("bf16-mixed",)  # float32 weights, forwards under bfloat16 autocast: recorded and replayed (meta["recording"]["autocast"])


class ReplayLoss:
    """Lightning's step loss as a loss_fn(output, target) for method="retrain": loss_fn with Lightning's
    gradient clipping.

    clip_val > 0 with algorithm "norm": the gradient g of loss_fn on the replayed batch is multiplied by
    min(1, clip_val / (|g| + 1e-6)) as torch.nn.utils.clip_grad_norm_ does (|g| over all parameters); "value":
    clamped to [-clip_val, clip_val] as clip_grad_value_ does. The loss returned has loss_fn's value and exactly
    that clipped gradient (sum of parameter * clipped gradient, detached where needed). The parameters are
    found as the leaves of the loss's autograd graph (a loss function is not handed the model; the methods
    replay on a private copy). Costs one extra backward per step. Computes gradients itself, so it serves
    retrain (and finish()'s checks), not methods that transform loss functions per sample."""

    def __init__(self, loss_fn, clip_val=0.0, algorithm="norm"):
        if algorithm not in ("norm", "value"):
            raise ValueError(f"ReplayLoss: algorithm must be 'norm' or 'value', got {algorithm!r}")
        self.loss_fn, self.clip_val, self.algorithm = loss_fn, float(clip_val or 0.0), algorithm

    def __call__(self, output, target):
        loss = self.loss_fn(output, target)
        if self.clip_val <= 0 or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return loss
        leaves = graph_leaves(loss)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        pairs = [(p, g) for p, g in zip(leaves, grads) if g is not None]
        if self.algorithm == "norm":
            total = torch.nn.utils.get_total_norm([g for _, g in pairs], 2.0)
            coef = torch.clamp(self.clip_val / (total + 1e-6), max=1.0)
            clipped = [g * coef.to(g.device) for _, g in pairs]
        else:
            clipped = [g.clamp(-self.clip_val, self.clip_val) for _, g in pairs]
        surrogate = sum((p * c.detach()).sum() for (p, _), c in zip(pairs, clipped))
        return loss.detach() + (surrogate - surrogate.detach())

    def __repr__(self):
        return f"ReplayLoss({getattr(self.loss_fn, '__name__', self.loss_fn)!s}, clip_val={self.clip_val}, algorithm={self.algorithm!r})"


def replay_loss(history, loss_fn):
    """The ReplayLoss for a history recorded by HistoryCallback (its Lightning settings are in
    history.meta["lightning"]); loss_fn is the mean loss training_step computed."""
    settings = history.meta.get("lightning")
    if settings is None:
        raise ValueError("history: not recorded by the Lightning HistoryCallback (no meta['lightning'])")
    if settings["gradient_clip_algorithm"] == "norm" and clip_max_norm(history) is not None:
        return ReplayLoss(loss_fn)  # retrain and rewind clip the norm themselves (meta["recording"]["clip_max_norm"])
    return ReplayLoss(loss_fn, settings["gradient_clip_val"], settings["gradient_clip_algorithm"])


class _StepMarker(torch.optim.Optimizer):
    """What the HistoryRecorder hooks instead of Lightning's optimizer (see the module docstring): the real
    optimizer's param_groups (the same dicts), a step() that does nothing."""

    def __init__(self, optimizer):
        super().__init__([{"params": list(g["params"])} for g in optimizer.param_groups], dict(optimizer.defaults))
        self.param_groups = optimizer.param_groups

    def step(self, closure=None):
        return None


def _step_marker(optimizer):
    cls = type(optimizer)
    # the recorder names the optimizer class in the history (retrain rebuilds it, Mini reads SGD's settings):
    # the marker's class carries the real class's module and name
    marker_cls = type(cls.__name__, (_StepMarker,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return marker_cls(optimizer)


def _default_indices(batch):
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else None
    if isinstance(first, torch.Tensor) and first.dim() == 1 and first.dtype in (torch.int64, torch.int32):
        return first
    raise ValueError(f"training batch: a {type(batch).__name__} without indices first; wrap the training data set in "
                     "uf.IndexedDataset (batches (indices, x, y)) or pass indices_of=<function of the batch>")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class HistoryCallback(pl.Callback):
    """Records every optimizer step of a lightning.Trainer fit into a HistoryRecorder (module docstring).

    loss_fn: the mean loss training_step computes, loss_fn(module(x), y).
    policy: the HistoryPolicy (kind="full" by default).
    train_set: the data set the indices point into (default: the training DataLoader's data set, unwrapped
      from uf.IndexedDataset); it is what uf.unlearn takes.
    indices_of: batch -> 1-D integer tensor of the batch's indices (default: the first field of the batch).
    dirpath: where histories are saved with checkpoints and where a fit that saves checkpoints streams its
      recording (default: the ModelCheckpoint's directory).
    save_history: stream the recording when the Trainer has a checkpoint callback and save a copy of it with
      every checkpoint (needed to resume a recording). False: record in memory, save nothing.
    allow_dropout: record a module with dropout in a kind="minimal" history anyway (its replay draws other masks; a
      kind="full" history keeps each step's random generator state and replays training's masks).
    check_batches: compare every (indices, x, y) batch with train_set's samples (one fetch per micro-batch).
    """

    def __init__(self, loss_fn, policy=None, train_set=None, indices_of=None, dirpath=None, save_history=True,
                 allow_dropout=False, check_batches=True):
        if not callable(loss_fn):
            raise ValueError(f"HistoryCallback: loss_fn must be the mean loss training_step computes, got {type(loss_fn).__name__}")
        self.loss_fn, self.policy = loss_fn, policy or HistoryPolicy()
        self._train_set, self.indices_of, self.dirpath = train_set, indices_of, dirpath
        self.train_set = train_set  # resolved at the start of fit
        self.save_history, self.allow_dropout, self.check_batches = save_history, allow_dropout, check_batches
        self.recorder = None  # the HistoryRecorder (under DDP rank 0's; None on the other ranks)
        self._dist = None  # DDP: the DistributedRecorder (every rank)
        self.model = None
        self._resume = None  # (reference, checkpoint global_step) from on_load_checkpoint
        self._handle = None  # the step post-hook on Lightning's optimizer
        self._reset()

    def _reset(self):
        self._queue, self._pending, self._checked, self._finished = [], False, False, False
        self._clipped_steps, self._resumed_from, self._saved = 0, [], {}

    # -- set-up
    def _check_trainer(self, trainer, module):
        where = "lightning.Trainer"
        if str(trainer.precision) not in PRECISIONS:
            raise ValueError(f"{where}(precision={trainer.precision!r}): half-precision weights or a gradient scaler round differently "
                             "from the replay; train with precision='32-true', '64-true' or 'bf16-mixed'")
        if getattr(trainer.strategy, "handles_gradient_accumulation", False):
            raise ValueError(f"{where}: strategy {type(trainer.strategy).__name__} accumulates gradients itself; not replayed")
        if trainer.world_size > 1:
            self._check_ddp(trainer)
        if not module.automatic_optimization:
            raise ValueError("LightningModule.automatic_optimization=False (manual optimization): the callback records "
                             "Lightning's automatic optimization only (for a loop of your own use uf.HistoryRecorder)")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{where}: {len(trainer.optimizers)} optimizers; the history replays one")
        for hook in ("configure_gradient_clipping", "optimizer_step"):
            if getattr(type(module), hook) is not getattr(pl.LightningModule, hook):
                raise ValueError(f"{type(module).__name__}.{hook} is overridden: the replay reproduces Lightning's own "
                                 "clipping and optimizer step only")
        drop = [(n, m.p) for n, m in module.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
        self.dropout = drop
        if drop and not self.allow_dropout and self.policy.kind != "full":  # (a "full" recording replays training's masks)
            raise ValueError(f"module: dropout is active in training ({', '.join(f'{n}: p={p}' for n, p in drop[:6])}); a kind="
                             f"{self.policy.kind!r} recording keeps no random generator states to replay its masks. Record kind='full', "
                             "set p=0, or pass allow_dropout=True to record anyway (replays then differ)")
        accumulate = int(trainer.accumulate_grad_batches)
        norms = [n for n, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
        if norms and accumulate > 1:
            raise ValueError(f"module: batch norm ({norms[:3]}) with accumulate_grad_batches={accumulate}: each micro-batch is "
                             "normalised by its own statistics, the replay forwards the step's samples as one batch")
        if accumulate > 1:
            n = trainer.num_training_batches
            if n != float("inf") and int(n) % accumulate:
                raise ValueError(f"accumulate_grad_batches={accumulate} with {int(n)} training batches per epoch: the epoch's last "
                                 f"optimizer step has {int(n) % accumulate} micro-batch(es), whose loss Lightning still divides by "
                                 f"{accumulate}; the replay (a mean over the step's samples) cannot scale that step. Use a number "
                                 f"of batches per epoch divisible by {accumulate}")
            loader = trainer.train_dataloader
            if n != float("inf") and isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size and not loader.drop_last:
                size, bs = len(loader.dataset), loader.batch_size
                if size % bs and int(n) == -(-size // bs):
                    raise ValueError(f"accumulate_grad_batches={accumulate}: the epoch's last batch holds {size % bs} of {bs} "
                                     "samples; Lightning averages each micro-batch, so its samples weigh more than the others "
                                     "of the step, which the replay (a mean over the step's samples) does not reproduce. Use "
                                     "DataLoader(drop_last=True) or a data set size divisible by the batch size")
        return accumulate

    @staticmethod
    def _check_ddp(trainer):
        """A multi-process fit is recorded under DDP only, launched so that the processes that record are those that
        go on (the recording lives in them), with every rank's share of a world batch distinct and of one size."""
        from lightning.pytorch.strategies import DDPStrategy

        where, strategy = f"lightning.Trainer(world_size={trainer.world_size})", trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            raise ValueError(f"{where}: strategy {type(strategy).__name__}; the Lightning callback records single-process and DDP "
                             "(strategy='ddp') runs; a sharded or other strategy is not replayed")
        if getattr(strategy, "_start_method", "popen") != "popen":
            raise ValueError(f"{where}: strategy {type(strategy).__name__}(start_method={strategy._start_method!r}) records in processes "
                             "that end with fit(), and the history with them; use strategy='ddp' (torchrun or Lightning's own launcher)")
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        total, size = getattr(sampler, "total_size", None), len(getattr(sampler, "dataset", ()) or ())
        if isinstance(sampler, torch.utils.data.DistributedSampler) and total is not None and total > size:
            raise ValueError(f"{where}: DistributedSampler pads {size} samples to {total} by repeating {total - size} of them, so "
                             f"those train twice an epoch; use a data set size divisible by {trainer.world_size}, or a loader with "
                             "DistributedSampler(drop_last=True) and Trainer(use_distributed_sampler=False)")

    def _resolve_train_set(self, trainer):
        if self._train_set is not None:
            return self._train_set
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, IndexedDataset):
            return dataset.dataset
        raise ValueError("HistoryCallback: cannot tell the training set the indices point into; wrap it in uf.IndexedDataset "
                         "or pass train_set=")

    def _settings(self, trainer):
        return {"accumulate_grad_batches": int(trainer.accumulate_grad_batches),
                "gradient_clip_val": float(trainer.gradient_clip_val or 0.0),
                "gradient_clip_algorithm": str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm").lower(),
                "precision": str(trainer.precision)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._resume = (checkpoint.get(CHECKPOINT_KEY), checkpoint.get("global_step"))

    def on_train_start(self, trainer, pl_module):
        accumulate = self._check_trainer(trainer, pl_module)
        self.model, self.train_set = pl_module, self._resolve_train_set(trainer)
        optimizer = trainer.optimizers[0]
        self.optimizer = getattr(optimizer, "optimizer", optimizer) if not isinstance(optimizer, torch.optim.Optimizer) else optimizer
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer: {type(optimizer).__name__} is not a torch.optim.Optimizer; the replay rebuilds a torch optimizer")
        settings = self._settings(trainer)
        self.accumulate, self.clip_val, self.clip_algorithm = accumulate, settings["gradient_clip_val"], settings["gradient_clip_algorithm"]
        self._settings_now = settings
        if self.recorder is not None:
            self.recorder.close()  # an earlier fit's recording stops (its hooks come off; a streamed one stays on disk)
        self.recorder, self._dist = None, None
        self._remove_hook()
        self._reset()
        resume, self._resume = self._resume, None
        # accumulation is allowed when the steps are uniform (checked per step); clipping is not allowed: record()
        # runs before Lightning clips, so any change it sees was made by something else (a hook editing gradients)
        # (under autocast a micro-batch is its own bfloat16 product, rounded once: the recorder keeps the micro-batches and the
        # replay forwards them one by one; in float32 the step's samples replay as one batch, within 2e-7. Under DDP the
        # DistributedRecorder keeps every rank's micro-batches where they must be replayed so: autocast, dropout)
        allow = ("accumulation",) if accumulate > 1 and (str(trainer.precision) not in AUTOCAST or trainer.world_size > 1) else ()
        marker = self._marker = _step_marker(self.optimizer)
        if trainer.world_size > 1:
            self.recorder = self._distributed(trainer, pl_module, resume, marker, allow)
        elif trainer.global_step > 0:
            new, history = self._copy_for_resume(trainer, pl_module, resume)
            self.recorder = HistoryRecorder.resume(new, pl_module, marker, allow=allow, features=history.meta.get("recording"))
            self._note_resume(history, trainer.global_step)
        else:
            self.recorder = HistoryRecorder(pl_module, marker, self.policy, allow=allow, path=self._recording_path(trainer))
        self._handle = self.optimizer.register_step_post_hook(InertWhenCopied(self._after_real_step))

    def _recording_path(self, trainer):
        """Where a new fit streams its recording: a new directory when the Trainer will write checkpoints (then the
        recording is resumable), else None (in memory)."""
        return self._new_recording_path(trainer) if self.save_history and trainer.checkpoint_callbacks else None

    def _distributed(self, trainer, module, resume, marker, allow):
        """DDP: a distributed.DistributedRecorder on Lightning's DDP model (every rank); record() gathers every rank's
        indices of a step into the world batch and rank 0 records it (streamed when the Trainer saves checkpoints).
        A resumed fit: rank 0 checks and copies the checkpoint's recording as a single-process resume does, every rank
        raises its refusal alike, and DistributedRecorder.resume continues the copy. Returns rank 0's HistoryRecorder
        (None on the other ranks). record() runs before Lightning clips, so no edit after DDP's all-reduce is allowed."""
        wrapped = trainer.strategy.model
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"lightning.Trainer(world_size={trainer.world_size}): the strategy's model is "
                             f"{type(wrapped).__name__}, not DistributedDataParallel; the callback records DDP runs only")
        if self.dropout and self.allow_dropout:  # (else every rank's generator states are kept: DistributedRecorder)
            allow = tuple(allow) + ("dropout",)
        if trainer.global_step == 0:
            path = distributed.on_rank0(None, trainer.global_rank, lambda: self._recording_path(trainer))
            self._dist = distributed.DistributedRecorder(wrapped, marker, self.policy, allow=allow, path=path)
            return self._dist.recorder
        copied = distributed.on_rank0(None, trainer.global_rank, lambda: self._copy_for_resume(trainer, module, resume))
        features = copied[1].meta.get("recording") if copied else None
        self._dist = distributed.DistributedRecorder.resume(copied[0] if copied else None, wrapped, marker, allow=allow, features=features)
        if copied:
            self._note_resume(copied[1], trainer.global_step)
        return self._dist.recorder

    def _copy_for_resume(self, trainer, module, resume):
        """A fit resumed from a checkpoint: the recording saved with it, checked against the restored Trainer (every
        check before anything is written; the checkpoint is only read) and copied to a new recording directory, which
        the caller continues (HistoryRecorder.resume). Returns (that directory, the checkpoint's history)."""
        step = trainer.global_step
        ref, ckpt_step = resume if resume is not None else (None, None)
        if ref is None:
            if ckpt_step is None:
                raise ValueError(f"resume: fit starts at global step {step} without a checkpoint (a second fit() on this Trainer?); "
                                 "the callback records one fit from step 0, or a fit resumed with ckpt_path= from its checkpoints")
            raise ValueError(f"resume: fit resumes at global step {step} from a checkpoint that holds no {CHECKPOINT_KEY!r} reference "
                             "(saved without HistoryCallback, with save_history=False, or after finish()); the steps before it "
                             "cannot be replayed")
        path = ref.get("path")
        if not path or not os.path.isdir(path):
            raise ValueError(f"resume: the history saved with this checkpoint is missing ({path!r})")
        history = GradientHistory.load(path)
        mark = history.meta.get("checkpoint") or {}
        if history.recording_id is None or not history.chunk_marks:
            raise ValueError(f"resume: the history saved with this checkpoint ({path}) holds the schedule only (recorded in memory: "
                             "the fit had no checkpoint callback when it started, e.g. trainer.save_checkpoint() without "
                             "ModelCheckpoint); its recording cannot be continued. Record the run from step 0 with a ModelCheckpoint")
        problems = []
        digest = weights_digest(module)
        last_mark = history.chunk_marks.get(len(history.chunk_steps) - 1)
        if not (digest == ref.get("weights_digest") == mark.get("weights_digest") == history.meta.get("final_digest") == last_mark):
            problems.append(f"the restored weights' digest {digest[:16]} is not the history's {str(mark.get('weights_digest'))[:16]} "
                            f"(checkpoint reference {str(ref.get('weights_digest'))[:16]}, last flush mark {str(last_mark)[:16]})")
        if not (step == ckpt_step == ref.get("global_step") == mark.get("global_step") == history.num_steps):
            problems.append(f"global step {step} (checkpoint {ckpt_step}) vs the history's {mark.get('global_step')} with "
                            f"{history.num_steps} recorded steps")
        try:
            history.check_model(module)
        except ValueError as err:
            problems.append(str(err))
        if history.n_train != len(self.train_set):
            problems.append(f"train_set has {len(self.train_set)} samples, the history was recorded on {history.n_train}")
        recorded_policy, policy = history.meta.get("policy"), json.loads(json.dumps(dataclasses.asdict(self.policy)))  # (as stored)
        if recorded_policy != policy:
            changed = ({k: (recorded_policy.get(k), v) for k, v in policy.items() if recorded_policy.get(k) != v}
                       if isinstance(recorded_policy, dict) else recorded_policy)
            problems.append(f"the policy differs from the recorded one (recorded, now): {changed}")
        old = history.meta.get("lightning", {})
        changed = {k: (old.get(k), v) for k, v in self._settings_now.items() if old.get(k) != v}
        if changed:
            problems.append(f"Trainer settings changed since the checkpoint (recorded, now): {changed}; one history replays one setting")
        recorded_opt, opt_now = history.meta.get("optimizer", {}), optimizer_meta(self.optimizer)
        if optimizer_settings(recorded_opt) != optimizer_settings(opt_now):
            problems.append(f"optimizer {opt_now['class']} {optimizer_settings(opt_now)[1]} vs the recorded "
                            f"{recorded_opt.get('class')} {optimizer_settings(recorded_opt)[1]} (learning rates aside)")
        if problems:
            raise ValueError(f"resume: the checkpoint does not match the history at {path}: {'; '.join(problems)}. Nothing was recorded "
                             "or changed; resume from an unmodified checkpoint of this run, with the same data, policy and settings")
        # a copy, never the checkpoint's history itself: resume() truncates what it continues after its mark, and
        # another fit may resume from the same checkpoint (or a later one of the run)
        snap = store.read(path, "GradientHistory")
        new = self._new_recording_path(trainer)
        meta = {k: v for k, v in history.meta.items() if k not in BOUND_KEYS}
        store.link_copy(path, snap, new, "GradientHistory", dict(snap.info, meta=meta))
        return new, history

    def _note_resume(self, history, step):
        # the counters of the steps before the checkpoint, and the chain of resumes, for the finished history's meta
        old = history.meta.get("lightning", {})
        self._clipped_steps = int(old.get("clipped_steps", 0))
        self._resumed_from = list(old.get("resumed_from", [])) + [{"global_step": step, "history": os.path.abspath(history.path)}]

    def _remove_hook(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_train_end(self, trainer, pl_module):
        self._remove_hook()

    def on_exception(self, trainer, pl_module, exception):
        self._remove_hook()

    # -- every micro-batch and optimizer step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        indices = (self.indices_of or _default_indices)(batch)
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"training batch: indices must be a 1-D integer tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
        indices = indices.detach().to("cpu", torch.int64)
        sizes = {tuple(t.shape[:1]) for t in _tensors(batch) if t.dim() > 0}
        if sizes - {(indices.numel(),)}:
            raise ValueError(f"training batch: {indices.numel()} indices for tensors of {sorted(s[0] for s in sizes)} rows; every "
                             "tensor of a batch needs one row per index")
        if self.check_batches and self.indices_of is None and isinstance(batch, (tuple, list)) and len(batch) == 3:
            self._check_samples(indices, batch[1:])
        self._queue.append(indices)

    def _check_samples(self, indices, fields):
        if int(indices.max()) >= len(self.train_set) or int(indices.min()) < 0:
            raise ValueError(f"training batch: indices outside train_set's {len(self.train_set)} samples")
        expected = fetch(self.train_set, indices)
        for name, got, want in zip(("inputs", "targets"), fields, expected):
            if not isinstance(got, torch.Tensor) or not torch.equal(got.detach().cpu(), torch.as_tensor(want)):
                raise ValueError(f"training batch: its {name} are not train_set's samples at its indices (a random transform in "
                                 "the data set, or indices into another data set); the replay could not feed what Lightning trained on")

    @property
    def num_steps(self):
        """Optimizer steps recorded so far (every rank)."""
        return self._dist.steps if self._dist is not None else self.recorder.num_steps if self.recorder is not None else 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        micro, self._queue = self._queue, []
        step = self.num_steps
        if not micro:
            raise ValueError(f"optimizer step {step}: no training batch was seen since the last step")
        sizes = [m.numel() for m in micro]
        if len(micro) != self.accumulate or len(set(sizes)) != 1:
            raise ValueError(f"optimizer step {step} (global step {trainer.global_step}): {len(micro)} micro-batch(es) of sizes {sizes} "
                             f"with accumulate_grad_batches={self.accumulate}; Lightning averages each micro-batch and divides by "
                             f"{self.accumulate}, which the replay (a mean over the step's samples) reproduces only for "
                             f"{self.accumulate} micro-batches of one size")
        indices = torch.cat(micro)
        # record() first: the check's own forwards would otherwise count as this step's micro-batches (the recorder keeps
        # them under autocast), and under DDP the world batch it checks comes from record()'s gather
        if self._dist is not None:  # (a collective: every rank its own indices; the world batch in rank order)
            indices = self._dist.record(indices)
            # (every rank's micro-batches, rank after rank: each rank's split like this one's, DistributedRecorder checked)
            parts = [m for rank_part in indices.chunk(self._dist.world_size) for m in rank_part.split(sizes)]
        else:
            self.recorder.record(indices, batch_size=indices.numel())
            parts = micro
        if not self._checked and not self.dropout:  # (dropout's masks would fail it; allowed by allow_dropout=True)
            self._check_loss(pl_module, parts, step, str(trainer.precision) in AUTOCAST)
            self._checked = True
        if self.clip_val > 0:
            grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
            if self.clip_algorithm == "norm":
                self._clipped_steps += int(float(torch.nn.utils.get_total_norm(grads, 2.0)) > self.clip_val)
            else:
                self._clipped_steps += int(any(bool((g.abs() > self.clip_val).any()) for g in grads))
        self._pending = True

    def _check_loss(self, module, parts, step, autocast):
        """Lightning's gradient of this step (before clipping) against the mean of loss_fn's gradients on train_set's
        samples of its parts (the micro-batches, or under DDP the ranks' parts of the world batch, which DDP's all-reduce
        averages), each under bfloat16 autocast where Lightning's forward ran under it."""
        params = [p for p in module.parameters() if p.requires_grad]
        got = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        device, w = params[0].device, _flat(params)
        want = 0
        for part in parts:
            batch = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in fetch(self.train_set, part))
            with torch.autocast(device.type, torch.bfloat16) if autocast else contextlib.nullcontext():
                want = want + batch_gradient(module, self.loss_fn, batch, w) / len(parts)
        err = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(got).clamp(min=1e-30))
        if not err <= LOSS_TOLERANCE:
            raise ValueError(f"optimizer step {step}: Lightning's gradient differs from that of loss_fn(module(x), y) over the step's "
                             f"samples of train_set by {err:.3g} (relative); training_step must return loss_fn(self(x), y), the mean "
                             "loss of the batch's samples, without other terms or random transforms")

    def _after_real_step(self, optimizer, args, kwargs):
        if not self._pending:
            raise ValueError(f"optimizer step {self.num_steps} ran without on_before_optimizer_step (a manual "
                             "optimizer.step()?); the history would miss it")
        self._pending = False
        self._marker.step()  # the recorders' step hooks (under DDP every rank's) see the step end

    # -- checkpoints
    def _base_dir(self, trainer):
        return self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")

    def _history_dir(self, trainer):
        return os.path.join(self._base_dir(trainer), HISTORY_DIR, f"step={trainer.global_step}")

    def _new_recording_path(self, trainer):
        return os.path.join(self._base_dir(trainer), RECORDING_DIR, f"run-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        rec = self.recorder
        if not self.save_history or rec is None or self._finished or not rec.num_steps:
            return
        if rec.path is None and rec.policy.kind != "full":
            return  # a kind="minimal" recording in memory keeps no batch order: nothing a checkpoint's history could replay
        if self._queue:
            raise ValueError(f"checkpoint at global step {trainer.global_step}: {len(self._queue)} micro-batch(es) of an unfinished "
                             "accumulation are not in any step yet; save checkpoints after optimizer steps")
        if rec.num_steps != trainer.global_step:
            raise ValueError(f"checkpoint: global step {trainer.global_step} but {rec.num_steps} recorded steps")
        digest = weights_digest(pl_module)
        path = os.path.abspath(self._history_dir(trainer))
        if self._saved.get(path) != digest:  # (two checkpoints of one step, e.g. ModelCheckpoint's and save_last, share one)
            history = self.snapshot()  # a streamed recording is flushed first: its last chunk is marked with the weights' digest
            history.meta["checkpoint"] = {"global_step": trainer.global_step, "weights_digest": digest}
            if rec.path is None:
                history.save(path)  # the schedule only (recorded in memory): enough for retrain to this checkpoint, not to resume
            else:
                # the recording as it stands, chunks (rows, Mini's checkpoints) and flush marks included, under the
                # snapshot's meta: retrain replays it to this checkpoint, and a resumed fit copies it and continues the copy;
                # its head and chunk objects are hard links to the recording's (immutable), so a copy writes only its manifest
                snap = store.read(rec.path, "GradientHistory")
                if sum(c["steps"] for c in snap.chunks) != trainer.global_step or not snap.chunks or snap.chunks[-1]["mark"] != digest:
                    raise ValueError(f"checkpoint at global step {trainer.global_step}: the recording at {rec.path} does not end with "
                                     "a flush of the checkpoint's weights")
                store.link_copy(rec.path, snap, path, "GradientHistory", dict(snap.info, meta=history.meta))
            self._saved[path] = digest
        checkpoint[CHECKPOINT_KEY] = {"path": path, "global_step": trainer.global_step, "weights_digest": digest}

    # -- results
    @property
    def replay_loss(self):
        """The loss for method="retrain": loss_fn, with the Trainer's value clipping (ReplayLoss). Norm clipping is
        written into the history (meta["recording"]["clip_max_norm"]), which retrain and rewind replay themselves
        and deltagrad and mini refuse."""
        self._require()
        if self.clip_algorithm == "norm":
            return ReplayLoss(self.loss_fn)
        return ReplayLoss(self.loss_fn, self.clip_val, self.clip_algorithm)

    @property
    def recording_path(self):
        """Where this fit's recording is streamed (None: in memory); finish() leaves the finished history there."""
        return None if self.recorder is None else self.recorder.path

    def _recording_meta(self, recording):
        """meta["recording"]: the recorder's (finish()) or its counters so far (snapshot()), plus those of the steps
        before a resumed fit's checkpoint, and Lightning's clipping, which the callback counts itself: Lightning clips
        after the callback records, so the recorder saw unclipped gradients and the threshold comes from the Trainer."""
        recording = dict(recording or {})
        recording["clipped_steps"] = self._clipped_steps
        if self.clip_val > 0 and self.clip_algorithm == "norm":
            recording["clip_max_norm"] = self.clip_val
        if self.clip_val > 0:  # methods/trajectory.py clips the recorded gradients as the Trainer did when it rebuilds w_t
            recording["rows_unclipped"] = {"algorithm": self.clip_algorithm, "clip_val": self.clip_val}
        return recording

    def _lightning_meta(self):
        return dict(self._settings_now, dropout=[[n, p] for n, p in self.dropout], clipped_steps=self._clipped_steps,
                    resumed_from=self._resumed_from)

    def snapshot(self):
        """The schedule recorded so far (every fit of a resumed run) as a GradientHistory without trajectory or
        summary: what retrain needs. Bound to the module's current weights. A streamed recording is flushed (its
        last chunk marked with the weights' digest); a kind="minimal" one in memory has no batch order to give.
        DDP: on rank 0; None on the other ranks (not collective)."""
        rec = self._require()
        if rec is None:
            return None
        history = rec.snapshot(len(self.train_set))
        history.meta = dict(history.meta, lightning=self._lightning_meta())
        seen = dict(getattr(rec, "_seen_features", {}), allow=list(rec.allow))  # (finish() reports them; snapshot() does not)
        history.meta["recording"] = self._recording_meta(seen)
        return history

    def finish(self, summary=True):
        """The GradientHistory of the run (every fit of a resumed one): HistoryRecorder.finish, i.e. the policy's
        trajectory (kind="full") or Mini's summary (kind="minimal"), computed with the plain loss_fn; a streamed
        recording is finished in its directory (recording_path). summary=False: the schedule only (retrain), as
        snapshot(), and the recording stays open. meta["loss_check"] holds replay_loss's gradient norm, the loss
        that uf.unlearn(method="retrain") is given. DDP: every rank may call it; rank 0 returns the history (its
        meta["distributed"] names the world size), the other ranks None (not collective)."""
        rec = self._require()
        if rec is None:
            return None
        if self._queue or self._pending:
            raise ValueError("finish: the last optimizer step did not complete; call finish() after trainer.fit()")
        if not summary:
            history = self.snapshot()
            probe = history.schedule["batches"][-1]
        else:
            history = (self._dist or rec).finish(self.train_set, self.loss_fn)
            self._finished = True
            history.meta["lightning"] = self._lightning_meta()
            history.meta["recording"] = self._recording_meta(history.meta.get("recording"))
            probe = torch.as_tensor(history.meta["loss_check"]["indices"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        batch = tuple(t.to(params[0].device) if isinstance(t, torch.Tensor) else t for t in fetch(self.train_set, probe))
        norms = loss_fingerprint(self.model, self.replay_loss, batch, _flat(params))
        history.meta["loss_check"] = {"step": rec.num_steps - 1, "indices": probe.tolist(), "grad_norm": math.sqrt(sum(n * n for n in norms)),
                                      "param_norms": norms, "loss": "replay_loss"}
        if summary and history.path is not None:  # the finished version at recording_path gets the same meta (its rows stay)
            history.save(history.path)
        return history

    def _require(self):
        """The recorder (None on DDP ranks other than 0, which hold no history); ValueError if nothing was recorded."""
        if not self.num_steps:
            raise ValueError("HistoryCallback: nothing was recorded (pass it to lightning.Trainer(callbacks=[...]) and call fit)")
        return self.recorder
