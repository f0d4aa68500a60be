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
Refused, each naming the setting: precision other than "32-true"/"64-true" (autocast and fp16/bf16 weights
round differently), dropout (random masks; allow_dropout=True records anyway), batch norm with accumulation
(batch statistics of micro-batches), manual optimization, several optimizers, a module overriding
configure_gradient_clipping or optimizer_step, strategies that accumulate themselves, world_size > 1.

Checkpoints. In on_save_checkpoint the schedule recorded so far is saved next to the checkpoint files
(<dirpath>/unlearn_history/step=<global_step>, dirpath the ModelCheckpoint's) with meta["checkpoint"] =
{"global_step", "weights_digest"}, and the checkpoint itself stores where (CHECKPOINT_KEY). When fit resumes
from such a checkpoint (ckpt_path=...), the callback loads that history, checks that the restored weights are
the ones it was saved with (weights digests and step) and continues it; a checkpoint without the reference, or
one whose weights or step do not match the history, is refused.
"""
import dataclasses
import os

import torch

try:
    import lightning.pytorch as pl
except ImportError as err:  # the optional dependency: `import unlearn_fast` never imports this module
    raise ImportError("unlearn_fast.integrations.lightning needs PyTorch Lightning: pip install 'unlearn_fast[lightning]'") from err

from ..data import IndexedDataset
from ..history import GradientHistory, HistoryPolicy, fetch, param_spec, weights_digest
from ..methods._common import batch_gradient, clip_max_norm, graph_leaves
from ..recording import HistoryRecorder, InertWhenCopied

HISTORY_DIR = "unlearn_history"  # inside the checkpoint directory: HISTORY_DIR/step=<global_step>
CHECKPOINT_KEY = "unlearn_fast_history"  # the checkpoint's reference to the history saved with it
# relative difference allowed between Lightning's first gradient and loss_fn's on the same samples: float32
# rounding of a different summation order is ~1e-7; dropout, an extra loss term or other data are far above it
LOSS_TOLERANCE = 1e-3
PRECISIONS = ("32-true", "32", "64-true", "64")


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


def _jsonable(groups):
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
             if k != "params" and isinstance(v, (int, float, bool, str, tuple, type(None)))} for g in groups]


class HistoryCallback(pl.Callback):
    """Records every optimizer step of a lightning.Trainer fit into a HistoryRecorder (module docstring).

    loss_fn: the mean loss training_step computes, loss_fn(module(x), y).
    policy: the HistoryPolicy (kind="full" by default).
    train_set: the data set the indices point into (default: the training DataLoader's data set, unwrapped
      from uf.IndexedDataset); it is what uf.unlearn takes.
    indices_of: batch -> 1-D integer tensor of the batch's indices (default: the first field of the batch).
    dirpath: where histories are saved with checkpoints (default: the ModelCheckpoint's directory).
    save_history: save the history with every checkpoint (needed to resume a recording).
    allow_dropout: record a module with dropout anyway (the replay then differs: random masks).
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
        self.recorder = None
        self.model = None
        self._resume = None  # (reference, checkpoint global_step) from on_load_checkpoint
        self._reset()

    def _reset(self):
        self._w0, self._batches, self._lrs, self._micro_sizes = None, [], [], []
        self._meta = None
        self._queue, self._pending, self._checked, self._handle = [], False, False, None
        self._clipped_steps, self._resumed_from, self._saved = 0, [], {}

    # -- set-up
    def _check_trainer(self, trainer, module):
        where = "lightning.Trainer"
        if str(trainer.precision) not in PRECISIONS:
            raise ValueError(f"{where}(precision={trainer.precision!r}): mixed or half precision rounds differently from the replay, "
                             "which runs in the parameters' dtype; train with precision='32-true' (or '64-true')")
        if trainer.world_size > 1:
            raise ValueError(f"{where}: world_size={trainer.world_size}; the Lightning callback records single-process runs "
                             "(for DDP loops see unlearn_fast.integrations.distributed)")
        if getattr(trainer.strategy, "handles_gradient_accumulation", False):
            raise ValueError(f"{where}: strategy {type(trainer.strategy).__name__} accumulates gradients itself; not replayed")
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
        if drop and not self.allow_dropout:
            raise ValueError(f"module: dropout is active in training ({', '.join(f'{n}: p={p}' for n, p in drop[:6])}); its random "
                             "masks cannot be replayed. Set p=0, or pass allow_dropout=True to record anyway (replays then differ)")
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
        self._reset()
        resume, self._resume = self._resume, None
        if trainer.global_step > 0:
            self._continue(trainer, pl_module, resume, settings)
        else:
            params = [p for p in pl_module.parameters() if p.requires_grad]
            self._w0 = _flat(params).clone()
            groups = self.optimizer.param_groups
            group_of = [next(i for i, g in enumerate(groups) if any(q is p for q in g["params"])) for p in params]
            cls = type(self.optimizer)
            self._meta = {"policy": dataclasses.asdict(self.policy), "param_spec": param_spec(pl_module),
                          "optimizer": {"class": f"{cls.__module__}.{cls.__qualname__}", "groups": _jsonable(groups)},
                          "group_of_param": group_of}
        self._settings_now = settings
        # accumulation is allowed when the steps are uniform (checked per step); clipping is not allowed: record()
        # runs before Lightning clips, so any change it sees was made by something else (a hook editing gradients)
        allow = ("accumulation",) if accumulate > 1 else ()
        self.recorder = HistoryRecorder(pl_module, _step_marker(self.optimizer), self.policy, allow=allow)
        self._handle = self.optimizer.register_step_post_hook(InertWhenCopied(self._after_real_step))

    def _continue(self, trainer, module, resume, settings):
        step = trainer.global_step
        ref, ckpt_step = resume if resume is not None else (None, None)
        if ref is None:
            if ckpt_step is None:
                raise ValueError(f"resume: fit starts at global step {step} without a checkpoint (a second fit() on this Trainer?); "
                                 "the callback records one fit from step 0, or a fit resumed with ckpt_path= from its checkpoints")
            raise ValueError(f"resume: fit resumes at global step {step} from a checkpoint that holds no {CHECKPOINT_KEY!r} reference "
                             "(saved without HistoryCallback, or with save_history=False); the steps before it cannot be replayed")
        path = ref.get("path")
        if not path or not os.path.isdir(path):
            raise ValueError(f"resume: the history saved with this checkpoint is missing ({path!r})")
        history = GradientHistory.load(path)
        mark = history.meta.get("checkpoint") or {}
        digest = weights_digest(module)
        problems = []
        if digest != ref.get("weights_digest") or digest != mark.get("weights_digest"):
            problems.append(f"the restored weights' digest {digest[:16]} is not the history's {str(mark.get('weights_digest'))[:16]} "
                            f"(checkpoint reference {str(ref.get('weights_digest'))[:16]})")
        if not (step == ckpt_step == ref.get("global_step") == mark.get("global_step") == history.num_steps):
            problems.append(f"global step {step} (checkpoint {ckpt_step}) vs the history's {mark.get('global_step')} with "
                            f"{history.num_steps} recorded steps")
        if problems:
            raise ValueError(f"resume: the checkpoint does not match the history at {path}: {'; '.join(problems)}. The checkpoint "
                             "was modified, or its history belongs to another run; resume from an unmodified checkpoint")
        history.check_model(module)
        if history.n_train != len(self.train_set):
            raise ValueError(f"resume: train_set has {len(self.train_set)} samples, the history was recorded on {history.n_train}")
        old = history.meta.get("lightning", {})
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"resume: Trainer settings changed since the checkpoint ({changed}); one history replays one setting")
        self._w0, self._batches = history.schedule["w0"], list(history.schedule["batches"])
        self._lrs = history.schedule["lrs"].tolist()
        self._micro_sizes = [list(s) for s in old.get("micro_batch_sizes", [])]
        self._clipped_steps = int(old.get("clipped_steps", 0))
        self._resumed_from = list(old.get("resumed_from", [])) + [{"global_step": step, "history": os.path.abspath(path)}]
        self._meta = {k: v for k, v in history.meta.items() if k not in ("lightning", "checkpoint", "final_digest", "loss_check", "n_train", "recording")}

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

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        micro, self._queue = self._queue, []
        step = len(self._batches)
        if not micro:
            raise ValueError(f"optimizer step {step}: no training batch was seen since the last step")
        sizes = [m.numel() for m in micro]
        if len(micro) != self.accumulate or len(set(sizes)) != 1:
            raise ValueError(f"optimizer step {step} (global step {trainer.global_step}): {len(micro)} micro-batch(es) of sizes {sizes} "
                             f"with accumulate_grad_batches={self.accumulate}; Lightning averages each micro-batch and divides by "
                             f"{self.accumulate}, which the replay (a mean over the step's samples) reproduces only for "
                             f"{self.accumulate} micro-batches of one size")
        indices = torch.cat(micro)
        if not self._checked and not self.dropout:  # (dropout's masks would fail it; allowed by allow_dropout=True)
            self._check_loss(pl_module, indices, step)
            self._checked = True
        if self.clip_val > 0:
            grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
            if self.clip_algorithm == "norm":
                self._clipped_steps += int(float(torch.nn.utils.get_total_norm(grads, 2.0)) > self.clip_val)
            else:
                self._clipped_steps += int(any(bool((g.abs() > self.clip_val).any()) for g in grads))
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.recorder.record(indices, batch_size=indices.numel())
        self._batches.append(indices)
        self._lrs.append(lrs)
        self._micro_sizes.append(sizes)
        self._pending = True

    def _check_loss(self, module, indices, step):
        """Lightning's gradient of this step (before clipping) against loss_fn's on train_set's samples."""
        params = [p for p in module.parameters() if p.requires_grad]
        got = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        device = params[0].device
        batch = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in fetch(self.train_set, indices))
        want = batch_gradient(module, self.loss_fn, batch, _flat(params))
        err = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(got).clamp(min=1e-30))
        if not err <= LOSS_TOLERANCE:
            raise ValueError(f"optimizer step {step}: Lightning's gradient differs from that of loss_fn(module(x), y) over the step's "
                             f"samples of train_set by {err:.3g} (relative); training_step must return loss_fn(self(x), y), the mean "
                             "loss of the batch's samples, without other terms or random transforms")

    def _after_real_step(self, optimizer, args, kwargs):
        if not self._pending:
            raise ValueError(f"optimizer step {len(self._batches)} ran without on_before_optimizer_step (a manual "
                             "optimizer.step()?); the history would miss it")
        self._pending = False
        self.recorder.optimizer.step()  # the marker: the recorder's step hooks see the step end

    # -- checkpoints
    def _history_dir(self, trainer):
        base = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(base, HISTORY_DIR, f"step={trainer.global_step}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not self.save_history or self.recorder is None or not self._batches:
            return
        if self._queue:
            raise ValueError(f"checkpoint at global step {trainer.global_step}: {len(self._queue)} micro-batch(es) of an unfinished "
                             "accumulation are not in any step yet; save checkpoints after optimizer steps")
        if len(self._batches) != trainer.global_step:
            raise ValueError(f"checkpoint: global step {trainer.global_step} but {len(self._batches)} recorded steps")
        digest = weights_digest(pl_module)
        path = os.path.abspath(self._history_dir(trainer))
        if self._saved.get(path) != digest:
            history = self.snapshot()
            history.meta["checkpoint"] = {"global_step": trainer.global_step, "weights_digest": digest}
            history.save(path)
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

    def _mark_clipping(self, meta):
        recording = dict(meta.get("recording") or {}, clipped_steps=self._clipped_steps)
        if self.clip_val > 0 and self.clip_algorithm == "norm":
            # Lightning clips after the callback records: the recorder saw unclipped gradients, so the threshold
            # comes from the Trainer's settings
            recording["clip_max_norm"] = self.clip_val
        meta["recording"] = recording

    def _lightning_meta(self):
        return dict(self._settings_now, dropout=[[n, p] for n, p in self.dropout], clipped_steps=self._clipped_steps, micro_batch_sizes=self._micro_sizes,
                    resumed_from=self._resumed_from)

    def snapshot(self):
        """The schedule recorded so far (every fit of a resumed run) as a GradientHistory without trajectory or
        summary: what retrain needs. Bound to the module's current weights."""
        self._require()
        meta = dict(self._meta, n_train=len(self.train_set), lightning=self._lightning_meta())
        meta["final_digest"] = weights_digest(self.model)
        self._mark_clipping(meta)
        schedule = {"w0": self._w0.clone(), "batches": list(self._batches), "lrs": torch.tensor(self._lrs, dtype=torch.float64)}
        return GradientHistory(meta, schedule, None, None)

    def finish(self, summary=True):
        """The GradientHistory of the run. summary=False, or a run resumed from a checkpoint: the schedule only
        (retrain), as snapshot(). Otherwise HistoryRecorder.finish (the policy's trajectory or Mini's summary),
        computed with the plain loss_fn; meta["loss_check"] then holds replay_loss's gradient norm, the loss that
        uf.unlearn(method="retrain") is given."""
        self._require()
        if self._queue or self._pending:
            raise ValueError("finish: the last optimizer step did not complete; call finish() after trainer.fit()")
        if not summary or self._resumed_from:
            history = self.snapshot()
            batch = fetch(self.train_set, self._batches[-1])
        else:
            history = self.recorder.finish(self.train_set, self.loss_fn)
            history.meta["lightning"] = self._lightning_meta()
            self._mark_clipping(history.meta)
            batch = fetch(self.train_set, history.schedule["batches"][-1]) if "batches" in history.schedule else None
        if batch is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            batch = tuple(t.to(params[0].device) if isinstance(t, torch.Tensor) else t for t in batch)
            grad = batch_gradient(self.model, self.replay_loss, batch, _flat(params))
            history.meta["loss_check"] = {"step": len(self._batches) - 1, "grad_norm": float(torch.linalg.vector_norm(grad)), "loss": "replay_loss"}
        return history

    def _require(self):
        if self.recorder is None or not self._batches:
            raise ValueError("HistoryCallback: nothing was recorded (pass it to lightning.Trainer(callbacks=[...]) and call fit)")

