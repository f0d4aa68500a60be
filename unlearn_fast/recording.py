"""Recording: HistoryRecorder watches a training loop and returns a GradientHistory (history.py stores it).

The replay (method="retrain", and the models DeltaGrad and Mini build of it) assumes a plain loop: per optimizer
step one forward and backward of a mean loss over the recorded batch, then optimizer.step() on those gradients.
The recorder checks that this is what happened, through hooks, and refuses what it cannot replay:
  optimizer step hooks       exactly one record() per optimizer step (a second record, or a step without one,
                             is an error naming the step);
  gradient-accumulation hooks how many backward passes made the step's gradients (several: gradient
                             accumulation, whose weighting of unequal micro-batches finish() tells from the first
                             such step) and, where an edit may follow (AUDIT_EVERY), their norms as backward
                             left them. Changed by record() time by one factor for every parameter: norm
                             clipping, whose threshold is recovered and replayed (meta["recording"]["clip_max_norm"]);
                             any other edit is refused;
  a forward pre-hook         autocast during a training forward: its dtype is recorded (meta["recording"]["autocast"])
                             and retrain / rewind replay the forward and loss under it.
  a GradScaler (grad_scaler=) loss scaling: record() reads from the scaler whether unscale_ ran (scaled gradients are
                             refused) and whether it found inf/nan (the scaler skips that optimizer step, so record()
                             records nothing for it; meta["recording"]["grad_scaler"]["skipped_steps"] counts them).
  record() itself           the parameters whose .grad is None at the step (torch.optim skips them; the trajectory
                             replay does too): meta["recording"]["grad_none"]. Sparse gradients are refused by name
                             (an embedding with sparse=True when the recorder is created).
"""
import copy
import dataclasses
import json
import functools
import inspect
import math
import os
import queue
import threading
import uuid
import warnings

import numpy as np
import torch

from . import ops, store
from .backends import forced as forced_backend
from .history import (CHUNK_BYTES, CHUNK_STEPS, CheckpointGrid, ChunkedRows, check_parameters, EncodedRows, GradientHistory, HistoryPolicy, _encoded_rows, compact_indices,
                      eager_module, fetch, flat_params, param_spec, row_bytes, saved_buffers, SCHEDULE_COLUMNS, SPAN_BYTES, weights_digest)
from .methods._common import batch_gradient, grad_none_runs, loss_fingerprint, loss_ratio, module_mode, unmeasured_edits
from .optimizers import cycled_setting, momentum_of

# relative change of a parameter's gradient norm between backward and record() that counts as an edit; unedited
# gradients compare equal (the same kernel on the same values)
EDIT_TOLERANCE = 1e-6

# Edits between backward and record() are seen through each gradient's tensor and version counter (clip_grad_norm_,
# clip_grad_value_ and torch's other in-place ops bump it; GradScaler.unscale_ does not, so a run with a grad_scaler is
# measured at every step). The hooks take the gradients' norms at backward (a pass over every gradient: 5-9 % of a
# 10-100M-parameter MLP's step, measured) only where an edit may follow: step 0, every AUDIT_EVERY-th step, and every
# step once one was edited (and a kind="full" fp32 / bf16 recording at every step). An audited step's norms are compared again at
# record(), which catches edits the counter cannot see (through .data, numpy or a C extension) and non-finite gradients,
# so a divergence of a run without edits is refused at most AUDIT_EVERY - 1 steps late
AUDIT_EVERY = 16
# the parameters' norms (an edit through .data between steps: see _note_parameters) are compared before steps 0, 1, 2, 4, ...
# and every PARAMETER_AUDIT_EVERY-th: two passes over the parameters each time (~1 % of a 10M-parameter MLP's step at 16)
PARAMETER_AUDIT_EVERY = 64

# per-parameter scale factors of norm clipping agree to rounding; a threshold recovered from them is rounded to 6
# significant digits when that is within this tolerance (0.5 is recovered as 0.5000000x)
CLIP_TOLERANCE = 1e-4
PROVISIONAL_TOLERANCE = 1e-2  # the same, between thresholds one of which was recovered from gradient_norm's sums

# finish(): an accumulated step's gradient norms and the closer weighting rule's, recomputed, may differ by dropout masks
# or autocast rounding (a few per cent), not by a rule off by a factor (a sum of micro-batch sums: the batch size)
ACCUMULATION_TOLERANCE = 0.25

# training features a caller may declare (HistoryRecorder(allow=...)): that its replay loss_fn reproduces them itself
# (the Hugging Face integration's replay loss, for example, applies the Trainer's clipping and averages over all of a
# step's micro-batches: accumulation, clipping, autocast), that its data are random (augmentation), that its replay may
# draw dropout masks of its own (dropout: distributed recordings, which keep no rank's generator states), or that its
# sampler draws with replacement (repeated_samples: refused by default as the mark of labels passed for indices)
ALLOWABLE = ("accumulation", "clipping", "autocast", "augmentation", "repeated_samples", "dropout")

# finish(): loss_fn on train_set at w0 must give step 0's gradient as training's backward gave it, each parameter's norm
# within this share of the step's gradient norm. The same computation agrees to rounding (measured: 0); training that
# differs is far above (label smoothing 0.01: 6e-3, inputs scaled by 1.01: 5e-3, an L2 term of 1e-4 |w|^2 in the loss:
# 1e-4, class weights: 0.15), and its replay silently wrong (0.5-20 % off the trained weights, measured)
FIRST_STEP_TOLERANCE = 2e-5
FIRST_STEP_TOLERANCE_CUDA = 1e-3  # (TF32 convolutions and atomics in some backward kernels: not measured on a GPU yet)

# finish(): recorded indices that name few distinct samples, each this many times on average and at most 1/this of
# train_set, look like class labels passed for indices (record(y): 10 digit classes for 1437 samples); named in
# finish()'s loss-check failures, or warned about where allow= features skip the check that catches them
LABEL_LIKE_REUSE = 4

PYTHON_CHECKS_MAX = 1024  # record() checks a batch of up to this many indices with Python's builtins, a larger one with numpy


class InertWhenCopied:
    """A hook that forwards to a recorder's method. A deep copy of the model or optimizer it is registered on
    (uf.unlearn copies the model) or a pickle of it gets an inert hook instead of a copy of the recorder."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return None if self.fn is None else self.fn(*args)

    def __deepcopy__(self, memo):
        return InertWhenCopied(None)

    def __reduce__(self):
        return InertWhenCopied, (None,)


def real_optimizer(optimizer):
    """The torch optimizer inside wrappers that hold it in `.optimizer` (accelerate's AcceleratedOptimizer)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_meta(optimizer):
    """meta["optimizer"] of a recording made with `optimizer` as it is now: its class and its groups' JSON-able settings."""
    optimizer = real_optimizer(optimizer)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}", "groups": _jsonable(groups)}


def optimizer_settings(meta):
    """meta["optimizer"]'s class and group settings without the learning rates (a scheduler changes them every step)."""
    groups = [{k: v for k, v in g.items() if k not in ("lr", "initial_lr")} for g in meta.get("groups", [])]
    return meta.get("class"), groups


class HistoryRecorder:
    """Records a GradientHistory while a model trains:

        rec = HistoryRecorder(model, optimizer, policy)
        for indices, x, y in loader:               # e.g. DataLoader(uf.IndexedDataset(train_set), shuffle=True)
            optimizer.zero_grad(); loss_fn(model(x), y).backward()
            rec.record(indices, batch_size=len(x))  # once per optimizer step, after backward, before step()
            optimizer.step()
        history = rec.finish(train_set, loss_fn)

    allow: training features among ALLOWABLE the caller declares: "accumulation", "clipping", "autocast" (its replay
    loss_fn reproduces them itself), "augmentation" (train_set draws random transforms: the replay draws its own),
    "repeated_samples" (a sampler with replacement), "dropout" (the replay may draw masks of its own: distributed
    recordings); by default each is refused when seen (its replay would be
    silently wrong, or it is the mark of a mistake).

    Kinds "first_epoch" / "all_epochs" are recorded by unlearn_fast.lm.FirstEpochRecorder, which takes the
    batch inputs as well (this class refuses them, naming it).
    """

    def __init__(self, model, optimizer, policy=None, allow=(), path=None, grad_scaler=None):
        self.policy = policy or HistoryPolicy()
        if self.policy.kind not in ("full", "minimal"):
            raise ValueError(f"HistoryRecorder: policy kind {self.policy.kind!r} records per-sample rows of a language model, which take the "
                             "batch inputs: use unlearn_fast.lm.FirstEpochRecorder(model, optimizer, policy)")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"HistoryRecorder: model must be an nn.Module, got {type(model).__name__}")
        # a torch.compile'd model: parameters named as the eager module's; the training forward is seen where it is
        # called (a hook inside the compiled region would be traced)
        called, model = model, eager_module(model)
        wrapper, optimizer = optimizer, real_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"HistoryRecorder: optimizer must be a torch.optim.Optimizer (or hold one in .optimizer), got {type(optimizer).__name__}")
        allow = (allow,) if isinstance(allow, str) else tuple(allow)
        unknown = [a for a in allow if a not in ALLOWABLE]
        if unknown:
            raise ValueError(f"HistoryRecorder: allow must name features among {ALLOWABLE}, got {unknown}")
        self.allow = allow
        self.model, self.optimizer = model, optimizer
        self._compiled = called is not model
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.param_names = [name for name, _ in named]
        if not self.params:
            raise ValueError("HistoryRecorder: model has no trainable parameters")
        sharded = [name for name, p in named if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"]
        if sharded:
            raise ValueError(f"HistoryRecorder: model parameter {sharded[0]} is a DTensor (FSDP2 fully_shard or tensor parallel); histories "
                             "recorded here are of unsharded models: record FSDP2 with unlearn_fast.integrations.distributed.ShardedRecorder (one shard "
                             "history per rank), DDP with its DistributedRecorder (docs/distributed.md)")
        check_recordable(named, optimizer, "HistoryRecorder")
        check_dense_gradients(model, "HistoryRecorder")  # (before any hook is registered: a refusal leaves model and optimizer as they were)
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise ValueError(f"HistoryRecorder: {type(optimizer).__name__}.step needs a closure: it evaluates the loss and its gradient "
                             "several times inside one step (a line search), which a history of one gradient per step cannot replay")
        # frozen parameters the optimizer holds: unfrozen later, optimizer.step() would train them unrecorded
        held = {id(q) for g in optimizer.param_groups for q in g["params"]}
        self._held_frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad and id(p) in held]
        if self.policy.kind == "full" and self.policy.codec in ("int8", "int4") and not isinstance(optimizer, torch.optim.SGD):
            # w_t is rebuilt by replaying the optimizer on the stored g_t (methods/trajectory.py): an adaptive optimizer
            # divides each coordinate by its own gradient scale, which magnifies a blockwise code's error on small ones
            warnings.warn(f"HistoryRecorder: codec {self.policy.codec!r} with {type(optimizer).__name__}: the weights rebuilt from such "
                          "rows drift (AdamW, 12 steps: 7.9 % of the distance trained, 0.07 % with bf16); use codec='bf16' or 'fp32' "
                          "for adaptive optimizers", stacklevel=2)
        self.grad_scaler = _check_scaler(grad_scaler)
        # the scaler keeps its state per optimizer object it was handed: the wrapper (accelerate) or the real one
        self._scaler_keys = (id(wrapper), id(optimizer))
        # gradients times a scaler's scale may be near float32's largest value, where a float32 norm overflows: float64
        self._norm_dtype = torch.float64 if self.grad_scaler is not None else None
        # the hooks also take each norm as clip_grad_norm_ takes it (vector_norm: float32 sums that differ from
        # gradient_norm's by 1e-5 at 1M elements, enough to move a threshold recovered from them) while a clipping
        # threshold may still be recovered: at step 0 and after any step whose gradients were edited, until it is known
        self._clip_norms = True
        self._edits_seen = False  # a step's gradients were edited after backward: every later step is measured (_measuring)
        self._measure = True  # the hooks take the coming step's gradient norms at backward
        self._clip_exact = True  # False: the known threshold was recovered from faster norms, to be replaced at the next clipped step
        self.group_of_param = [next(i for i, g in enumerate(optimizer.param_groups) if any(q is p for q in g["params"])) for p in self.params]
        self._settings = StepSettings(optimizer)
        self.w0 = flat_params(model).clone()
        lstm = [name for name, m in model.named_modules() if isinstance(m, torch.nn.LSTM)]
        if self.policy.kind == "minimal" and lstm:  # (refused now, not by finish() after the whole training run)
            raise ValueError(f"HistoryRecorder: policy kind 'minimal' records for Mini, whose curvature products run the model under "
                             f"torch.func (forward-mode derivatives inside vmap), which nn.LSTM ({lstm[0]!r}) does not support (torch "
                             "2.13: no forward-mode derivative of the oneDNN kernel, no batching rule for aten::lstm); record kind='full' "
                             "for method='retrain', 'rewind' or 'finetune'")
        if self.policy.kind == "minimal":  # a budget too small for the least history (w0, one checkpoint, one vector):
            from .methods.mini import fit_budget  # refused now, not by finish() after the whole training run

            least = dataclasses.replace(self.policy, rank=None)  # (an explicit rank is checked against the real run in finish())
            # (w0 and the fewest knots of the schedule's columns: what else the schedule takes, the trained-sample mask, depends on n)
            fit_budget(least, self.w0.numel(), self.w0.element_size(), [None], 1,
                       reserved=self.w0.numel() * self.w0.element_size() + len(SCHEDULE_COLUMNS) * (SPAN_BYTES + 2 * (4 + 8)))
        self.buffers0 = saved_buffers(model)  # (batch norm's running statistics at step 0: a replay starts from them)
        self._named_modules = list(model.named_modules())  # (their train / eval modes at each step: _check_modes)
        self.steps = 0  # recorded steps
        self.batches = []  # kind="full" in memory: every step's indices (a streamed recording keeps them on disk)
        self.lrs, self.momenta = [], []  # kind="full" in memory: every step's learning rates and momenta (snapshot() replays them)
        self._trained = torch.zeros(0, dtype=torch.bool)  # which samples were trained on (all a "minimal" history keeps of the batches)
        self._trained_np = self._trained.numpy()
        self._samples_recorded = 0  # indices record() got, repeats included (finish: _labels_hint)
        self._positions, self._order = np.zeros(0, np.int32), np.zeros(0, np.int32)  # record()'s scratch for finding repeated indices
        self._open = _new_chunk()  # the chunk being filled
        self._chunks = []  # sealed chunks held in memory (no path): (steps, schedule tensors, {"g": EncodedRows})
        self.checkpoints, self.grid = [], CheckpointGrid()  # kind="minimal": (step, EncodedRows of w_step), a few evenly spaced snapshots for the summary
        self.meta = {
            "policy": dataclasses.asdict(self.policy),
            "param_spec": param_spec(model),
            "optimizer": optimizer_meta(optimizer),
            "group_of_param": self.group_of_param,
        }
        p = self.w0.numel()
        step_bytes = row_bytes(self.policy.codec, p, self.policy.blocksize, self.w0.dtype) if self.policy.kind == "full" else 0
        self.chunk_steps = max(1, min(CHUNK_STEPS, CHUNK_BYTES // max(step_bytes, 1)))
        sizes = [p.numel() for p in self.params]
        self._encoder = RowEncoder(sizes, self.policy.codec, self.policy.blocksize, self.w0.dtype) if self.policy.kind == "full" else None
        self._ckpt_encoder = RowEncoder(sizes, self.policy.summary_codec, self.policy.blocksize, self.w0.dtype)
        self.path, self._writer = None, None
        if path is not None:
            self._start_stream(path)
        # what the hooks saw since the last optimizer step
        self._passes = [0] * len(self.params)  # backward passes that reached each parameter
        self._raw_norms = [None] * len(self.params)  # each parameter's gradient norm as the last backward left it
        self._raw_clip_norms = [None] * len(self.params)  # the same taken as clip_grad_norm_ takes it (when _clip_norms)
        self._raw_versions = [None] * len(self.params)  # (the gradient tensor, its version counter) as backward left it
        self._sparse = None  # the first parameter whose backward left a sparse gradient (record() refuses the step)
        self._autocast = None  # the autocast dtype of a training forward, if any
        self._micro = []  # the batch size of each training forward (micro-batches under gradient accumulation)
        self._step_micro = None  # micro-batches an integration declared for the coming step (set_step_micro)
        # a model with dropout: a "full" recording keeps the random generator's state at each step's first training
        # forward, so that the replay draws the masks training drew (without it, retrain forgetting nothing landed 7 % off)
        self._random_layers = random_layers(model)
        self._keep_rng = self.policy.kind == "full" and bool(self._random_layers) and "dropout" not in self.allow
        self._rng = None  # this step's state, taken at its first training forward
        self._rank_states = 1  # states per step: a DDP world batch's ranks each drew from their own (set_step_rng)
        self._recorded = False  # record() ran for the coming step
        self._steps_taken = 0
        self._unrecorded_step = None  # the first optimizer step that ran without a record()
        self._left = self._left_norms = None
        self._read = None  # the settings record() read for the coming step
        self._stock_optimizer = type(optimizer).__module__.startswith("torch.optim.")
        self._note_parameters(0)
        self._seen_features = {"accumulated_steps": 0, "clipped_steps": 0, "autocast_steps": 0}
        if self.grad_scaler is not None:
            # the scale of each recorded step, run-length [[first step, scale], ...]: the replay scales as training did
            self._seen_features["grad_scaler"] = {"skipped_steps": 0, "scales": []}
        self._skipping = False  # record() saw the scaler's inf/nan: the coming optimizer.step() must not update
        self._first_indices = self._last_indices = None
        self._first_raw_norm = None  # step 0's gradient norm as backward left it (before clipping): finish() checks loss_fn at w0 against it
        self._first_step = None  # (parameters reached, their raw norms, micro-batches, autocast, generator state) of step 0: the same, closely
        self._accumulation_probe = None  # the first step accumulated over unequal micro-batches: finish() tells how they were weighted
        self._finished = False
        self._handles = [
            optimizer.register_step_pre_hook(InertWhenCopied(self._before_step)),
            optimizer.register_step_post_hook(InertWhenCopied(self._after_step)),
            called.register_forward_pre_hook(InertWhenCopied(self._on_forward), with_kwargs=True),
        ]
        # autocast seen where the parameters are used: a wrapper (accelerate's mixed precision) may enter it inside the
        # model's forward, after the model's own pre-hook ran (on the model itself, if it holds parameters, that
        # pre-hook already looks: _on_forward)
        self._handles += [m.register_forward_pre_hook(InertWhenCopied(self._on_inner_forward))
                          for m in model.modules() if m is not called and any(p.requires_grad for p in m.parameters(recurse=False))]
        self._handles += [p.register_post_accumulate_grad_hook(InertWhenCopied(functools.partial(self._on_grad, i))) for i, p in enumerate(self.params)]

    # -- hooks
    def _on_grad(self, i, p):
        self._passes[i] += 1
        if p.grad.layout is not torch.strided:  # a sparse gradient (F.embedding(..., sparse=True)): refused by record(), not inside backward
            self._sparse = i if self._sparse is None else self._sparse
            return
        # (a step accumulated over micro-batches is measured until one was probed: finish() tells their weighting from it)
        if self._measure or (self._passes[i] > 1 and self._accumulation_probe is None):
            self._raw_norms[i] = gradient_norm(p.grad.detach(), self._norm_dtype)
            if self._clip_norms:
                self._raw_clip_norms[i] = torch.linalg.vector_norm(p.grad.detach(), dtype=self._norm_dtype)
        self._raw_versions[i] = (p.grad, p.grad._version)

    def _on_forward(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            if self._random_layers and not self._micro and (self._keep_rng or self.steps == 0):
                self._rng = rng_state(self.params[0].device)
            # the batch: the first positional argument, else the first tensor keyword argument (input_ids=...)
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            self._micro.append(int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None)
            self._on_inner_forward(module, args)

    def _on_inner_forward(self, module, args):
        if module.training and torch.is_grad_enabled():
            device = self.params[0].device.type
            if torch.is_autocast_enabled(device):
                self._autocast = str(torch.get_autocast_dtype(device)).replace("torch.", "")

    def _before_step(self, optimizer, args, kwargs):
        # an optimizer that takes the scaler's found_inf itself (fused Adam: _step_supports_amp_scaling) is stepped on
        # a skipped step and updates nothing; any other one would apply the inf/nan gradients the history left out
        if self._skipping and getattr(optimizer, "_step_supports_amp_scaling", False):
            return
        if not self._recorded and self._unrecorded_step is None:
            self._unrecorded_step = self._steps_taken
        # (a torch.optim class: a subclass of one may change its learning rates inside step() itself, which its replay repeats)
        if self._recorded and self._stock_optimizer and self._settings.now() != self._read:
            (lrs, momenta), (then, then_m) = self._settings.now(), self._read
            raise ValueError(f"optimizer.step(): the learning rates {lrs} (momenta {momenta}) are not those record() read for step "
                             f"{self.steps - 1}: {then} ({then_m}); a scheduler stepped between record() and optimizer.step(), so the "
                             "history would replay other learning rates. Call record() right before optimizer.step() (scheduler.step() after it)")

    def _after_step(self, optimizer, args, kwargs):
        if not self._skipping:
            self._steps_taken += 1
        self._recorded, self._skipping = False, False
        self._reset_step()
        self._note_parameters(self.steps)

    def _note_parameters(self, step):
        """The parameters as the optimizer left them (as constructed, before step 0): record() of `step` and finish()
        check that nothing changed them since. Version counters catch in-place edits under no_grad (clamp_, renorm,
        nn.init, load_state_dict) and data pointers a replaced .data; an edit through .data in place bumps neither, so
        before steps 0, 1, 2, 4, ... and every PARAMETER_AUDIT_EVERY-th step the parameters' norms are compared too."""
        self._left = [(p._version, p.data_ptr()) for p in self.params]
        audit = step % PARAMETER_AUDIT_EVERY == 0 or step & (step - 1) == 0
        self._left_norms = [float(torch.linalg.vector_norm(p.detach())) for p in self.params] if audit else None

    def _check_parameters_left(self, call, step):
        if self._left is None:  # (a resumed recording: its first step)
            return
        changed = [i for i, (p, (version, ptr)) in enumerate(zip(self.params, self._left)) if p._version != version or p.data_ptr() != ptr]
        if not changed and self._left_norms is not None:
            if not all(math.isfinite(n) for n in self._left_norms):  # (a divergence between audited steps: see AUDIT_EVERY)
                raise ValueError(f"{call}: step {step}: the weights hold inf/nan (the run diverged at or before step {step - 1}); history not extended")
            # (a tolerance, not equality: a threaded BLAS may sum in another order from one call to the next)
            changed = [i for i, (p, n) in enumerate(zip(self.params, self._left_norms))
                       if not abs(float(torch.linalg.vector_norm(p.detach())) - n) <= 1e-6 * n]
        if changed:
            when = "between HistoryRecorder() and the first step (w0 is taken when the recorder is created: create it after " \
                   "initialising or loading the weights)" if step == 0 else f"after optimizer step {step - 1}"
            raise ValueError(f"{call}: parameter {self.param_names[changed[0]]!r} changed {when}; the replay reproduces the optimizer's "
                             "steps only. A weight constraint applied after step() (clamp_, renorm, a projection) is not replayed: "
                             "express it in the model (torch.nn.utils.parametrize) or train without it; history not extended")

    def _measuring(self):
        """Whether the hooks take the coming step's gradient norms at backward (see AUDIT_EVERY)."""
        # (an int8 / int4 recording's encoder refuses a non-finite gradient itself: only fp32 / bf16 rows need the norms for it)
        return (self.steps % AUDIT_EVERY == 0 or self._edits_seen or self.grad_scaler is not None
                or (self.policy.kind == "full" and self.policy.codec in ("fp32", "bf16")))

    def _reset_step(self):
        self._measure = self._measuring()
        self._sparse = None
        self._autocast, self._micro, self._rng, self._step_micro = None, [], None, None
        self._passes = [0] * len(self.params)
        self._raw_norms = [None] * len(self.params)
        self._raw_clip_norms = [None] * len(self.params)
        self._raw_versions = [None] * len(self.params)

    def set_step_rng(self, states):
        """Declare the random generator states the coming step's forwards drew their dropout masks from, one per rank of
        a DDP world batch, in rank order (DistributedRecorder calls it before record()): the step's row of
        schedule.rng_states holds them all, and the replay splits the batch into that many equal parts, drawing each
        part's masks from its state. Integrations call it; a plain loop never needs to."""
        if self._rank_states not in (1, len(states)) and self.steps:
            raise ValueError(f"set_step_rng: {len(states)} states for step {self.steps}, {self._rank_states} for the steps before")
        self._rng, self._rank_states = torch.cat([torch.as_tensor(t, dtype=torch.uint8).reshape(-1) for t in states]), len(states)

    def set_step_micro(self, sizes):
        """Declare the micro-batches of the coming step's batch, in its order (DistributedRecorder calls it before record()
        where every rank's forwards must be replayed one by one: each rank's micro-batches, rank after rank); they are
        recorded as an accumulated step's (schedule["micro_sizes"]) whatever allow says. Integrations call it; a plain
        loop never needs to."""
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"set_step_micro: sizes must be at least two positive micro-batch sizes, got {sizes[:8]}")
        self._step_micro = sizes

    def rebase_gradients(self, norms, clip_norms=None):
        """Declare that this step's gradients were replaced after backward in a way the replay reproduces (DDP
        averaging them over ranks): `norms` maps parameters to their gradient norms as replaced (gradient_norm), the
        baseline record() checks later edits (clipping) against; `clip_norms` the same taken as clip_grad_norm_ takes
        them (vector_norm), from which a clipping threshold is recovered exactly (without them it is provisional).
        Integrations call it; a plain loop never needs to."""
        ids = {id(p): n for p, n in norms.items()} if isinstance(norms, dict) else None
        if ids is None:
            raise ValueError(f"rebase_gradients: norms must be a dict of parameter -> gradient norm, got {type(norms).__name__}")
        clip_ids = {id(p): n for p, n in clip_norms.items()} if isinstance(clip_norms, dict) else {}
        for i, p in enumerate(self.params):
            if self._passes[i] and id(p) in ids:
                self._raw_norms[i] = torch.as_tensor(ids[id(p)])
                self._raw_clip_norms[i] = torch.as_tensor(clip_ids[id(p)]) if id(p) in clip_ids else None

    # -- checks
    def _check_open(self, call):
        if self._finished:
            raise ValueError(f"{call}: the recorder is finished; the history it returned is closed (start a new HistoryRecorder)")
        if self._unrecorded_step is not None:
            raise ValueError(
                f"{call}: optimizer step {self._unrecorded_step} ran without a record() before it; the history would miss "
                "its update (call record() once for every optimizer step, after backward and before optimizer.step())"
            )

    def _check_indices(self, batch_indices, batch_size):
        if isinstance(batch_indices, torch.Tensor):
            idx = batch_indices.detach()
        else:
            try:
                idx = torch.as_tensor(batch_indices)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"record: batch_indices must be a 1-D sequence of integer sample indices ({err})") from None
        if idx.numel() == 0:  # (checked first: an empty list is a float tensor)
            raise ValueError("record: batch_indices is empty")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool or idx.dim() != 1:
            raise ValueError(f"record: batch_indices must be a 1-D integer tensor of sample indices into train_set, got {idx.dtype} of shape {tuple(idx.shape)}")
        if idx.dtype != torch.int64 or idx.device.type != "cpu":
            idx = idx.to("cpu", torch.int64)
        values = idx.numpy().copy()  # (the history's own copy: a caller may reuse its index buffer)
        idx = torch.from_numpy(values)
        # (a small batch's checks in Python: on a 64-sample batch they cost a third of numpy's, whose every call
        # costs microseconds; a large one's repeats through a scratch position table, O(batch), where sorting,
        # as torch.unique does, costs 2-4x a small model's whole step)
        if len(values) <= PYTHON_CHECKS_MAX:
            listed = values.tolist()
            lo, hi = min(listed), max(listed)
            repeated = len(set(listed)) != len(listed)
        else:
            lo, hi = int(values.min()), int(values.max())
            repeated = None
        if lo < 0:
            raise ValueError(f"record: batch_indices holds negative values {idx[idx < 0][:10].tolist()}; they are positions in train_set")
        if batch_size is not None:
            if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
                raise ValueError(f"record: batch_size must be a positive int, got {batch_size!r}")
            if idx.numel() != batch_size:
                raise ValueError(f"record: batch_indices has {idx.numel()} indices for a batch of {batch_size} samples")
        if "repeated_samples" not in self.allow:
            if repeated is None:
                if hi >= len(self._positions):
                    self._positions = np.zeros(max(hi + 1, 2 * len(self._positions)), np.int32)
                if len(values) > len(self._order):
                    self._order = np.arange(len(values), dtype=np.int32)
                order = self._order[: len(values)]
                self._positions[values] = order
                repeated = bool((self._positions[values] != order).any())
            if repeated:
                unique, counts = torch.unique(idx, return_counts=True)
                raise ValueError(
                    f"record: batch_indices repeats {unique[counts > 1][:10].tolist()} within one step; each sample appears once in a "
                    "batch (were labels passed instead of sample indices?). A sampler that draws with replacement (WeightedRandomSampler's "
                    "default) repeats samples: pass allow=('repeated_samples',) (a replay trains on each copy, forgetting removes all)"
                )
        return idx, hi

    def _scaler_state(self, step):
        """With a grad_scaler: the scale backward ran at (the raw norms are of gradients times it), and whether the
        scaler found inf/nan when it unscaled them (it will skip this optimizer step). Gradients still scaled
        (record() before scaler.unscale_) are refused: the history would hold them times the scale."""
        states = self.grad_scaler._per_optimizer_states
        state = next((states[k] for k in self._scaler_keys if k in states), None)  # (.get: the defaultdict would add one)
        stage = None if state is None else state.get("stage")
        if stage is not _OPT_STATE.UNSCALED:
            if stage is _OPT_STATE.STEPPED:
                raise ValueError(f"record: step {step}: scaler.step(optimizer) already ran; call record() after scaler.unscale_(optimizer) and "
                                 "before scaler.step(optimizer)")
            raise ValueError(f"record: step {step}'s gradients are still multiplied by the GradScaler's scale ({self.grad_scaler.get_scale():g}); "
                             "call scaler.unscale_(optimizer) before record() (then any clipping, record(), scaler.step(optimizer))")
        found_inf = sum(float(v) for v in state.get("found_inf_per_device", {}).values())
        return self.grad_scaler.get_scale(), found_inf > 0

    def _check_gradients(self, step, n_samples, scale=1.0):
        """The step's gradients as the replay must reproduce them; returns (each parameter's gradient norm as backward left it, the
        micro-batch sizes of an accumulated step or None). `scale`: a GradScaler's, which backward's gradients
        were multiplied by and unscale_ divided out."""
        passes, micro = max(self._passes), None
        if passes == 0:
            raise ValueError(f"record: no backward pass reached the model since the last optimizer step (step {step}); call loss.backward() before record()")
        if passes > 1:
            # (micro-batches an integration declared, a DDP world batch's, are checked there and recorded by record())
            if "accumulation" not in self.allow and self._step_micro is None:
                # replayed as it ran: one backward per micro-batch of mean loss / passes (loss / accumulation_steps, the usual idiom),
                # or of mean loss times its share of the batch where finish() finds that rule (_check_accumulation)
                micro = self._micro
                if len(micro) != passes or None in micro or sum(micro) != n_samples:
                    raise ValueError(
                        f"record: step {step} accumulated gradients of {passes} backward passes (gradient accumulation) after training forwards "
                        f"on batches of {micro} samples, which do not split its {n_samples} indices into {passes} micro-batches; call the "
                        "model once per micro-batch with the batch as its first argument, or pass allow=('accumulation',) if your replay "
                        "loss_fn reproduces the accumulated gradient"
                    )
                micro = list(micro)
            self._seen_features["accumulated_steps"] += 1
        if self._autocast is not None:
            if "autocast" not in self.allow:
                # replayed: retrain and rewind run the forward and loss under the same autocast (methods/_common.replay_autocast)
                known = self._seen_features.get("autocast")
                if known is not None and known != self._autocast:
                    raise ValueError(f"record: step {step} ran its forward under autocast ({self._autocast}), earlier steps under {known}; "
                                     "the replay reproduces one autocast dtype for the whole run")
                if known is None and step > self._seen_features["autocast_steps"]:
                    raise ValueError(f"record: step {step} ran its forward under autocast ({self._autocast}), earlier steps without; "
                                     "the replay reproduces autocast on every step or on none")
                self._seen_features["autocast"] = self._autocast
            self._seen_features["autocast_steps"] += 1
        elif self._seen_features.get("autocast") is not None:
            raise ValueError(f"record: step {step} ran its forward without autocast, earlier steps under {self._seen_features['autocast']}; "
                             "the replay reproduces autocast on every step or on none")
        reached = self._reached()
        if len(reached) < len(self.params) or self._held_frozen:
            self._check_frozen(step, reached)
        grads = [self.params[i].grad for i in reached]
        if any(g is None for g in grads):
            raise ValueError(f"record: step {step}'s gradients were set to None after backward; call record() before zero_grad()")
        untouched = [self._untouched(i, g) for i, g in zip(reached, grads)]
        if any(self._raw_norms[i] is None for i in reached):
            self._unmeasured_step(step, reached, grads, untouched)
            return None, micro
        raw = torch.stack([self._raw_norms[i] for i in reached])
        if scale != 1.0:  # (a power of two, the scaler's default, divides out exactly)
            raw = raw / scale
        total = torch.linalg.vector_norm(raw)
        finite = math.isfinite(float(total))  # (a Python test: torch.isfinite costs 7 us per call)
        now = raw
        if step % AUDIT_EVERY == 0 or self.grad_scaler is not None or not all(untouched):  # (unscale_'s fused kernel bumps no version counter)
            now = torch.stack([gradient_norm(g.detach(), self._norm_dtype) for g in grads])
            total = torch.linalg.vector_norm(now)
            finite = math.isfinite(float(total))
        clip = [self._raw_clip_norms[i] for i in reached]
        clip_raw = torch.stack(clip) / scale if self._clip_norms and None not in clip else None
        if not finite:
            self._refuse_non_finite(step, reached, now)
        if not all(untouched):
            self._edits_seen = True
        if now is not raw and bool(((now - raw).abs() > EDIT_TOLERANCE * raw).any()):
            if "clipping" in self.allow:
                self._seen_features["clipped_steps"] += 1
            else:
                self._note_clipping(step, raw, now, clip_raw)
        self._clip_norms = not all(untouched) and (self._seen_features.get("clip_max_norm") is None or not self._clip_exact)
        return raw, micro

    def _reached(self):
        """The parameters a backward pass reached since the last optimizer step."""
        return [i for i, n in enumerate(self._passes) if n]

    def _refuse_non_finite(self, step, reached, now):
        j = int(torch.nonzero(~torch.isfinite(now))[0]) if not bool(torch.isfinite(now).all()) else int(now.argmax())  # (finite norms whose sum of squares overflows: the largest)
        hint = ("The GradScaler found none when it unscaled them: were they edited after scaler.unscale_?" if self.grad_scaler is not None else
                "With mixed-precision loss scaling, pass the scaler (HistoryRecorder(..., grad_scaler=scaler)): the steps it skips are "
                "then left out. Otherwise the loss diverged (lower the learning rate)")
        late = (f" (gradients of unedited steps are checked on every {AUDIT_EVERY}th step: the divergence may have begun up to "
                f"{AUDIT_EVERY - 1} steps earlier)" if step and not self._edits_seen and self.grad_scaler is None else "")
        raise ValueError(f"record: step {step} has non-finite (inf/nan) gradients (parameter {self.param_names[reached[j]]}: norm {float(now[j]):g}){late}; "
                         f"history not extended. {hint}")

    def _unmeasured_step(self, step, reached, grads, untouched):
        """A step whose gradient norms the hooks did not take at backward (_measuring: no edit was expected). Untouched,
        its gradients are what backward left, and nothing is read. Edited (an edit that begins after some steps without,
        e.g. clipping switched on after a warm-up): what the edit did cannot be told without the norms before it; its norm
        after it is kept (meta["recording"]["unmeasured_edits"]), every later step is measured, and a replay accepts the
        step only if it is what clipping at the threshold later steps show gives (methods/_common.clip_max_norm)."""
        if all(untouched):
            return
        now = torch.stack([gradient_norm(g.detach(), self._norm_dtype) for g in grads])
        total = float(torch.linalg.vector_norm(now))
        if not math.isfinite(total):
            self._refuse_non_finite(step, reached, now)
        self._edits_seen = self._clip_norms = True
        self._seen_features["clipped_steps"] += 1
        if "clipping" not in self.allow:
            self._seen_features.setdefault("unmeasured_edits", []).append([step, total])

    def _eval_modules(self):
        return self._seen_features.get("eval_modules") or ()

    def _check_modes(self, step):
        """The modules in eval mode during training (none, usually; all for a model fine-tuned under model.eval()) are
        kept (meta["recording"]["eval_modules"]), and the replay runs each module in its mode: a caller's model.eval()
        before uf.unlearn does not change what is replayed. A mode that changes between steps (freezing batch norm's
        statistics mid-run) is refused: the replay keeps one set of modes."""
        eval_modules = [name for name, m in self._named_modules if not m.training]
        known = self._seen_features.get("eval_modules")
        if known is None:
            self._seen_features["eval_modules"] = eval_modules
        elif eval_modules != known:
            changed = sorted(set(eval_modules) ^ set(known))[0]
            who = f"module {changed!r}" if changed else "the model"
            raise ValueError(f"record: step {step}: {who} is in {'eval' if changed in eval_modules else 'train'} mode, "
                             f"{'train' if changed in eval_modules else 'eval'} mode on the steps before; the replay runs every step in one set "
                             "of modes (call model.train() / .eval() as on the first step before each training step); history not extended")

    def _check_frozen(self, step, reached):
        """The parameters trained are those trainable when recording began, at every step: the replay trains each recorded
        parameter on every step and no other (unfreezing mid-run, e.g. a backbone after warm-up, is not modelled)."""
        unreached = set(range(len(self.params))) - set(reached)
        frozen = [self.param_names[i] for i in sorted(unreached) if not self.params[i].requires_grad]
        if frozen:
            raise ValueError(f"record: step {step}: parameter {frozen[0]!r} was trainable when recording began and is frozen now "
                             "(requires_grad=False); the replay trains every recorded parameter on every step. Freeze it before "
                             "creating the HistoryRecorder, or keep it trainable; history not extended")
        thawed = [name for name, p in self._held_frozen if p.grad is not None]
        if thawed:
            raise ValueError(f"record: step {step}: parameter {thawed[0]!r} was frozen when recording began and now holds a gradient "
                             "that optimizer.step() applies; the history does not cover it. Unfreeze it before creating the "
                             "HistoryRecorder (a recording covers the parameters trainable then); history not extended")

    def _untouched(self, i, grad):
        seen = self._raw_versions[i]
        return seen is not None and seen[0] is grad and seen[1] == grad._version

    def _note_clipping(self, step, raw, now, clip_raw=None):
        """Gradients scaled between backward and record(): norm clipping (torch.nn.utils.clip_grad_norm_) scales every
        parameter's gradient by one factor min(1, max_norm / (norm + 1e-6)). Its threshold is recovered from the factor
        and replayed (meta["recording"]["clip_max_norm"]); any other edit, or a threshold that changes, is refused."""
        ratios = now / raw.clamp(min=1e-300)
        factor = float(torch.linalg.vector_norm(now) / torch.linalg.vector_norm(raw).clamp(min=1e-300))
        uniform = bool(((ratios - factor).abs() <= CLIP_TOLERANCE * factor).all())
        if not uniform or factor > 1:
            raise ValueError(
                f"record: step {step}'s gradients changed between backward and record() by different factors per parameter "
                f"({float(ratios.min()):.4g} to {float(ratios.max()):.4g}: value clipping or another edit); the replay reproduces only "
                "norm clipping (clip_grad_norm_). Train without it, or pass allow=('clipping',) if your replay loss_fn reproduces it"
            )
        k = round(-math.log2(factor)) if factor > 0 else 0
        if k >= 4 and bool(((ratios * 2.0 ** k - 1).abs() <= EDIT_TOLERANCE).all()):
            # every gradient divided by one power of two: a GradScaler's unscale_ (a clip factor is never that exact)
            raise ValueError(f"record: step {step}'s gradients were divided by 2^{k} between backward and record(), as a GradScaler's "
                             "unscale_ does; pass the scaler: HistoryRecorder(..., grad_scaler=scaler)")
        exact = clip_raw is not None  # the raw norms as clip_grad_norm_ summed them (else the threshold is provisional)
        max_norm = _round_threshold(factor * (float(torch.linalg.vector_norm(clip_raw if exact else raw)) + 1e-6))
        known = self._seen_features.get("clip_max_norm")
        # (a provisional threshold is off by float32 vector_norm's error: 2e-4 measured at 1M elements)
        tolerance = CLIP_TOLERANCE if self._clip_exact and exact else PROVISIONAL_TOLERANCE
        if known is not None and abs(max_norm - known) > tolerance * known:
            raise ValueError(f"record: step {step} clipped the gradient norm to {max_norm:.6g}, earlier steps to {known:.6g}; the replay "
                             "reproduces clipping at one threshold (clip_grad_norm_ with a constant max_norm)")
        # a threshold first recovered from the faster norms (clipping began after a step without edits) is replaced by
        # the next clipped step's, taken as clip_grad_norm_ takes them
        self._seen_features["clip_max_norm"] = known if known is not None and (self._clip_exact or not exact) else max_norm
        self._clip_exact = self._clip_exact and known is not None or exact
        self._seen_features["clipped_steps"] += 1

    # -- the recording
    def record(self, batch_indices, batch_size=None):
        """Record the coming optimizer step: its samples' indices into train_set (1-D, integer, distinct),
        checked against batch_size (the number of samples in the batch) when given. Call it once per
        optimizer step, after backward (and after any gradient edit) and before optimizer.step(); with a
        grad_scaler, after scaler.unscale_(optimizer) and before scaler.step(optimizer). Returns True, or False
        for a step the grad_scaler skips (inf/nan gradients: nothing recorded, optimizer.step() must not run)."""
        self._check_open("record")
        step = self.steps
        if self._recorded:
            raise ValueError(f"record: called twice for step {step - 1}, before optimizer.step() ran; call it once per optimizer step")
        self._raise_writer_error()
        idx, top = self._check_indices(batch_indices, batch_size)
        self._settings.check(step)
        self._check_parameters_left("record", step)
        scale = 1.0
        if self.grad_scaler is not None:
            scale, skipped = self._scaler_state(step)
            if skipped:  # scaler.step() will not call optimizer.step(): no step to record, and the next record() starts afresh
                if max(self._passes) == 0:
                    raise ValueError(f"record: no backward pass reached the model since the last optimizer step (step {step}); call loss.backward() before record()")
                self._seen_features["grad_scaler"]["skipped_steps"] += 1
                self._skipping = True
                self._reset_step()
                return False
        if self._sparse is not None:
            raise ValueError(f"record: step {step}: parameter {self.param_names[self._sparse]!r} has a sparse gradient (an embedding with "
                             "sparse=True); histories are recorded from dense gradients: use sparse=False (and a dense optimizer such as "
                             "SGD or Adam); history not extended")
        raw_norms, micro = self._check_gradients(step, idx.numel(), scale)  # before appending anything, so a refused step leaves the history as it was
        declared, self._step_micro = self._step_micro, None
        if declared is not None:  # (set_step_micro: a DDP world batch's micro-batches, every rank's)
            if sum(declared) != idx.numel():
                raise ValueError(f"record: step {step}: the declared micro-batches {declared[:8]} hold {sum(declared)} samples, the batch {idx.numel()}")
            micro = declared
        self._check_modes(step)
        self._skipping = False  # (a step the scaler skipped before this one is behind us)
        if self.grad_scaler is not None:
            scales = self._seen_features["grad_scaler"]["scales"]
            if not scales or scales[-1][1] != scale:
                scales.append([step, scale])
        chunk = self._open
        if self.policy.kind == "full":
            # g_t only: w_t is the recorded optimizer's step from w_{t-1} on g_{t-1}, which methods/trajectory.py replays.
            # Encoded now, through the policy's codec: an int8 history holds a quarter of fp32's memory while recording,
            # straight into this chunk's row buffers (RowEncoder: no flat copy, no concatenation at seal)
            row = len(chunk["sizes"])
            if chunk["g"] is None:
                chunk["g"] = self._row_buffers()
            try:
                self._encoder.encode_into([p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params], chunk["g"], row)
            except ValueError as e:  # (the row is not counted: the history is as it was)
                raise ValueError(f"record: step {step} has non-finite (inf/nan) gradients ({e}); history not extended") from e
            if self.path is None:
                self.batches.append(idx)
        else:
            self._keep_checkpoint(step)
        self._note_grad_none(step)
        if step == 0:
            self._first_raw_norm = float(torch.linalg.vector_norm(raw_norms))
            reached = self._reached()
            # (one state per rank: finish() cannot redo the ranks' forwards as one backward, so it skips that check)
            self._first_step = (reached, raw_norms.clone(), micro, self._autocast, self._rng if self._rank_states == 1 else None)
        if micro is not None and len(set(micro)) > 1 and self._accumulation_probe is None and declared is None and raw_norms is not None:
            # (its weights: one copy, once; equal micro-batches weigh the same under either rule)
            reached = self._reached()
            self._accumulation_probe = (step, flat_params(self.model).clone(), idx, list(micro), reached, raw_norms.clone())
        self._note_seen(idx, top)
        lrs, momenta = self._settings.now()
        self._read = (lrs, momenta)  # (optimizer.step() must run at these: _before_step)
        if self.policy.kind == "full" and self.path is None:  # what snapshot() replays; a streamed recording reads them back
            self.lrs.append(lrs)
            self.momenta.append(momenta)
        chunk["lrs"].append(lrs)
        chunk["momenta"].append(momenta)
        if self._keep_rng:  # (no training forward seen, e.g. trained in eval mode: no masks drawn, any state will do)
            chunk["rng"].append(self._rng if self._rng is not None else rng_state(self.params[0].device))
        chunk["sizes"].append(idx.numel())
        chunk["micro"].append(micro or [idx.numel()])
        if self.path is not None:  # on disk, a streamed recording keeps every batch (resume and retrain need them)
            chunk["indices"].append(idx)
        if step == 0:
            self._first_indices = idx
        self._last_indices = idx
        self.steps += 1
        self._recorded = True
        if len(chunk["sizes"]) >= self.chunk_steps:
            self._seal()
        return True

    def _note_grad_none(self, step):
        """The parameters whose .grad is None at this step's optimizer.step() (never reached by backward: an unused head, a
        branch not taken), which torch.optim skips (no weight decay, no momentum); their rows hold zeros, and a replay of
        the rows (methods/trajectory.py) skips them on the same steps. Kept run-length in meta["recording"]["grad_none"]
        ([[first step, [names]], ...]; absent while every parameter has a gradient)."""
        # (a parameter backward reached holds a gradient: _check_gradients refused one set to None since)
        names = [] if all(self._passes) else [self.param_names[i] for i, n in enumerate(self._passes) if not n and self.params[i].grad is None]
        runs = self._seen_features.get("grad_none")
        if names != (runs[-1][1] if runs else []):
            self._seen_features.setdefault("grad_none", []).append([step, names])

    @property
    def num_steps(self):
        return self.steps

    def _row_buffers(self):
        return chunk_row_buffers(self._encoder, self._writer, self.chunk_steps, self.w0.device)

    def _note_seen(self, idx, top):
        if top >= self._trained.numel():
            self._trained = torch.cat([self._trained, torch.zeros(max(top + 1, 2 * self._trained.numel()) - self._trained.numel(), dtype=torch.bool)])
            self._trained_np = self._trained.numpy()  # (a view: the mask is set through it)
        self._trained_np[idx.numpy()] = True
        self._samples_recorded += idx.numel()

    def _labels_hint(self, n_train):
        """A sentence naming batch_indices when they look like class labels passed for sample indices (record(y)): few
        distinct values, each recorded LABEL_LIKE_REUSE times or more on average, a small part of train_set; else "".
        Not a refusal: a run that trains on a few samples again and again looks the same."""
        distinct = int(self._trained.sum())
        if not distinct or distinct * LABEL_LIKE_REUSE > min(self._samples_recorded, n_train):
            return ""
        top = int(torch.nonzero(self._trained).max())
        return (f"batch_indices may be class labels, not sample indices: the {self._samples_recorded} indices record() got over {self.steps} "
                f"steps name only {distinct} distinct samples of train_set's {n_train}, all below {top + 1}; pass each batch's positions "
                "in train_set (e.g. from a DataLoader over uf.IndexedDataset(train_set))")

    # -- chunks: sealed when full (or at flush), kept in memory or handed to the background writer
    def _seal(self, mark=None):
        chunk = self._open
        n = len(chunk["sizes"])
        if self.path is not None and n == 0 and mark is None:  # finish() right after a flush: nothing to append
            return
        self._open = _new_chunk()
        schedule = {
            "schedule.lrs": torch.tensor(chunk["lrs"], dtype=torch.float64).reshape(n, len(self.optimizer.param_groups)),
            "schedule.batch_sizes": torch.tensor(chunk["sizes"], dtype=torch.int32),
            # micro-batches per step (1 without accumulation), and the sizes of those of accumulated steps
            "schedule.micro_counts": torch.tensor([len(m) for m in chunk["micro"]], dtype=torch.int32),
            "schedule.micro_sizes": torch.tensor([s for m in chunk["micro"] if len(m) > 1 for s in m], dtype=torch.int32),
        }
        if self._keep_rng:
            schedule["schedule.rng_states"] = (torch.stack(chunk["rng"]) if n else
                                               torch.zeros(0, rng_state(self.params[0].device).numel() * self._rank_states, dtype=torch.uint8))
        if self._settings.cycled:  # (GradientHistory drops them where they stayed as meta records them)
            schedule["schedule.momenta"] = torch.tensor(chunk["momenta"], dtype=torch.float64).reshape(n, len(self.optimizer.param_groups))
        if self.path is not None:
            schedule["schedule.batch_indices"] = compact_indices(torch.cat(chunk["indices"]) if n else torch.zeros(0, dtype=torch.int64))
        rows = {}
        if chunk["g"] is not None and n:
            tensors = {name: t[:n] for name, t in chunk["g"].items()}
            if self.path is None and n < len(next(iter(chunk["g"].values()))):  # sealed early (flush, finish): only its rows kept
                tensors = {name: t.clone() for name, t in tensors.items()}
            rows["g"] = EncodedRows(tensors, self.policy.codec, self.policy.blocksize, self.w0.numel(), self.w0.dtype)
        if self.path is None:
            if n:
                self._chunks.append((n, schedule, rows))
            return
        parts = {"schedule": schedule}
        if rows:
            parts["rows"] = {f"trajectory.{key}.{name}": t for key, r in rows.items() for name, t in r.tensors.items()}
        if mark is not None:  # a flush: what the steps so far did (clipping, autocast, accumulation), for resume() to go on from
            parts["recording"] = {"recording.features": _features_tensor(self._seen_features)}
        if chunk["ckpt"]:  # kind="minimal": the checkpoints taken in this chunk (resume() needs them; finish() drops the part)
            ckpt = EncodedRows.cat([row for _, row in chunk["ckpt"]])
            parts["ckpt"] = {"ckpt.steps": torch.tensor([s for s, _ in chunk["ckpt"]], dtype=torch.int64),
                             **{f"ckpt.w.{name}": t for name, t in ckpt.tensors.items()}}
        # the row buffers come back to _row_buffers once written
        self._writer.put((n, parts, mark, chunk["g"]))

    def _start_stream(self, path):
        """Stream chunks to directory `path`: a first version holding w0 now, a chunk appended by a background
        thread whenever one is sealed (store.append_chunk: a crash keeps every appended chunk)."""
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(path, str):
            raise ValueError(f"path: must be a str or os.PathLike naming a new history directory, got {type(path).__name__}")
        if os.path.lexists(os.path.join(path, store.CURRENT)):
            raise ValueError(f"path: {path!r} already holds a history; record to a new directory, or continue a killed recording "
                             "with HistoryRecorder.resume(path, model, optimizer)")
        self.recording_id = uuid.uuid4().hex
        store.write(path, "GradientHistory", self._info(), {"schedule.w0": self.w0, **{f"buffers0.{n}": b for n, b in self.buffers0.items()}})
        self.path = path
        self._writer = _ChunkWriter(path, self.recording_id)

    def _info(self):
        p, c, bs = self.w0.numel(), self.policy.codec, self.policy.blocksize
        encoded = {}
        if self.policy.kind == "full":
            encoded = {"trajectory.g": EncodedRows({}, c, bs, p, self.w0.dtype).meta()}
        return {"meta": self.meta, "encoded": encoded, "recording": self.recording_id}

    def _raise_writer_error(self):
        if self._writer is not None and self._writer.error is not None:
            raise RuntimeError(f"record: the background writer of {self.path!r} failed ({self._writer.error}); the history there "
                               "holds the chunks written before it") from self._writer.error

    def flush(self):
        """Make every recorded step durable at `path` and mark this point with the model's weights digest, so that
        HistoryRecorder.resume can continue from a trainer checkpoint saved now (call it when the trainer saves
        one, after optimizer.step()). Blocks until written. Without a path: nothing to do."""
        self._check_open("flush")
        if self._recorded:
            raise ValueError(f"flush: step {self.steps - 1} was recorded but optimizer.step() did not run after it; flush after the step")
        if self.path is None:
            return
        self._seal(mark=weights_digest(self.model))
        self._writer.join()
        self._raise_writer_error()

    def _keep_checkpoint(self, step):
        """A checkpoint of w_step when the grid takes one (history.CheckpointGrid), encoded now (the summary stores
        it through summary_codec anyway: int8 holds a quarter of the memory); a streamed recording also writes it
        with the chunk (resume() gets it back)."""
        if self.grid.wants(step):
            weights = [p.detach() for p in self.params]
            buffers = self._ckpt_encoder.buffers(1, self.w0.device)
            try:  # (an int8 / int4 encoder refuses inf/nan itself; fp32 / bf16 rows are checked)
                self._ckpt_encoder.encode_into(weights, buffers, 0)
                finite = "values" not in buffers or bool(torch.isfinite(buffers["values"]).all())
            except ValueError:
                finite = False
            if not finite:  # (a divergence between audited steps: see AUDIT_EVERY)
                raise ValueError(f"record: step {step}: the weights hold inf/nan (the run diverged at or before step {step}); history not extended")
            row = EncodedRows(buffers, self.policy.summary_codec, self.policy.blocksize, self.w0.numel(), self.w0.dtype)
            self.grid.offer(step)
            self.checkpoints.append((step, row))
            if self.path is not None:
                self._open["ckpt"].append((step, row))
        else:
            self.grid.offer(step)
        if len(self.checkpoints) != len(self.grid.kept):  # the grid dropped some (it only ever drops or takes this step)
            kept = set(self.grid.kept)
            self.checkpoints = [(s, w) for s, w in self.checkpoints if s in kept]

    def finish(self, train_set, loss_fn, batch_size=1024):
        """Close the recording and return the GradientHistory. Checks loss_fn against the first recorded step's
        gradient (ValueError naming loss_fn if it is another loss, e.g. a sum) and binds the history to the
        model's final weights (meta["final_digest"]). Only kind="minimal" computes Mini's summary here (in eval
        mode: no dropout, batch norm's running statistics). A streamed recording (path=) is completed there:
        its chunks stay where they are and the returned history reads its rows from them."""
        self._check_open("finish")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn: finish() needs the training loss, loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if isinstance(train_set, torch.Tensor) or not (hasattr(train_set, "__len__") and hasattr(train_set, "__getitem__")):
            raise ValueError(f"train_set: must be the map-style data set of (x, y) samples the indices point into, got {type(train_set).__name__}")
        if not self.steps:
            raise ValueError("finish: nothing was recorded (call record() every training step)")
        T = self.steps
        if self._recorded:
            raise ValueError(f"finish: step {T - 1} was recorded but optimizer.step() did not run after it")
        self._raise_writer_error()
        check_parameters(self.meta["param_spec"], self.model, "finish")
        self._check_parameters_left("finish", T)
        n_train = len(train_set)
        if self._trained.numel() > n_train and bool(self._trained[n_train:].any()):
            top = n_train + int(torch.nonzero(self._trained[n_train:]).max())
            raise ValueError(f"finish: recorded batch index {top} is out of range for train_set of {n_train} samples")
        labels = self._labels_hint(n_train)  # ("" unless the recorded indices look like class labels)
        checked = False  # step 0's gradient compared parameter by parameter (which indices that are labels fail)
        if self._first_raw_norm is not None:  # (a resumed recording has no step 0 in memory: uf.unlearn's check at w* remains)
            try:
                checked = self._check_step_zero(train_set, loss_fn)
            except ValueError as err:
                if labels:  # (the likelier cause first: the loss check only sees other samples' gradients)
                    raise ValueError(f"finish: {labels}. What failed: {err}") from err
                raise
        if labels and not checked:  # (allow= features skip that check: a history of the wrong samples would pass)
            warnings.warn(f"finish: {labels}", stacklevel=2)
        if self._accumulation_probe is not None:
            self._check_accumulation(train_set, loss_fn)
        w_final = flat_params(self.model)
        meta = dict(self.meta, n_train=n_train, recording={"allow": list(self.allow), **copy.deepcopy(self._seen_features)})
        # uf.unlearn checks its loss_fn on the same batch at the final weights (the model it is given)
        norms = loss_fingerprint(self.model, loss_fn, fetch(train_set, self._last_indices), w_final)
        meta["loss_check"] = {"step": T - 1, "indices": self._last_indices.tolist(), "grad_norm": math.sqrt(sum(n * n for n in norms)),
                              "param_norms": norms}
        seen = torch.zeros(n_train, dtype=torch.bool)
        seen[: min(n_train, self._trained.numel())] = self._trained[:n_train]
        self._seal()
        if self.path is None:
            lrs = torch.cat([sched["schedule.lrs"] for _, sched, _ in self._chunks])
            sizes = torch.cat([sched["schedule.batch_sizes"] for _, sched, _ in self._chunks]).to(torch.int64)
            schedule = {"w0": self.w0, "lrs": lrs, "batch_sizes": sizes, **({"buffers0": self.buffers0} if self.buffers0 else {})}
            if self._settings.cycled:
                schedule["momenta"] = torch.cat([sched["schedule.momenta"] for _, sched, _ in self._chunks])
            if self._keep_rng:
                schedule["rng_states"] = torch.cat([sched["schedule.rng_states"] for _, sched, _ in self._chunks])
            for key in ("micro_counts", "micro_sizes"):
                schedule[key] = torch.cat([sched[f"schedule.{key}"] for _, sched, _ in self._chunks]).to(torch.int64)
            trajectory = None
            if self.policy.kind == "full":
                schedule["batches"] = self.batches
                p, c, bs = self.w0.numel(), self.policy.codec, self.policy.blocksize
                trajectory = {"g": ChunkedRows([(n, rows["g"]) for n, _, rows in self._chunks], c, bs, p, self.w0.dtype)}
            history = GradientHistory(meta, schedule, trajectory, None)
        else:
            self._writer.close()
            self._raise_writer_error()
            self._writer = None
            history = GradientHistory.load(self.path)  # what was streamed: the rows stay on disk
            history.meta = meta
        if self.policy.kind != "full":
            # Mini reads which samples were trained on, not the order of the batches
            history.schedule = {key: history.schedule[key] for key in ("w0", "buffers0", *SCHEDULE_COLUMNS) if key in history.schedule}
            history.schedule["seen"] = seen
            from .methods.mini import SCHEDULE_TOLERANCE, SCHEDULE_WARN, final_summary, schedule_share, sgd_settings

            history.compact_seen()
            dense = sum(history.column_bytes(n) for n in SCHEDULE_COLUMNS if n in history.schedule)
            share = schedule_share(self.policy, self.w0.numel(), self.w0.element_size(), history.nbytes("schedule") - dense)
            errors = history.bound_schedule(share, SCHEDULE_TOLERANCE)
            if errors and max(errors.values()) > SCHEDULE_WARN:
                warnings.warn(f"finish: the history's budget (HistoryPolicy.budget_vectors) holds the per-step schedule only approximately "
                              f"(largest error per column: {errors}, of the column's peak; sizes in samples): Mini and the minimal "
                              "replays use it so. Raise budget_vectors for an exact schedule", stacklevel=2)

            try:
                sgd = sgd_settings(meta, "mini", history.schedule["lrs"], history.schedule.get("momenta"))
            except ValueError:  # not SGD: mini refuses such histories, so the schedule response is not computed
                sgd = None
            with module_mode(self.model, False):  # torch.func refuses dropout's random masks and batch norm's in-place updates
                history.summary = final_summary(
                    self.model, train_set, loss_fn, self.policy, T, self.checkpoints, history.schedule["lrs"][:, 0], sgd, batch_size=batch_size,
                    batch_sizes=history.schedule.get("batch_sizes"), reserved=history.nbytes("schedule"))
        meta["final_digest"] = weights_digest(self.model)
        if self.path is not None:
            history.save(self.path)  # the finished version: head rewritten, the streamed rows kept by reference
        self.close()
        self._chunks, self.batches = [], []  # the history holds them now
        return history

    def _check_step_zero(self, train_set, loss_fn):
        """Step 0 again with loss_fn and train_set, as training ran it (its modes, its dropout masks where the generator
        state was taken): its loss scale (loss_ratio, naming a GradScaler's) and, where it can, every parameter's gradient
        (_check_first_step, whose return value this is)."""
        batch = fetch(train_set, self._first_indices)
        g0 = batch_gradient(self.model, loss_fn, batch, self.w0, rng=self._first_step[4], eval_modules=self._eval_modules())
        norm = float(torch.linalg.vector_norm(g0))
        try:
            loss_ratio(self.model, loss_fn, batch, self.w0, self._first_raw_norm, norm=norm)
        except ValueError as err:
            ratio = norm / max(self._first_raw_norm, 1e-300)
            k = round(-math.log2(ratio)) if 0 < ratio < 1 else 0
            if k >= 4 and abs(ratio * 2.0 ** k - 1) <= 1e-3:  # recorded gradients 2^k times loss_fn's: a GradScaler's scale
                raise ValueError(f"finish: the recorded gradients are 2^{k} times loss_fn's, the mark of a GradScaler's scale: they were "
                                 "recorded scaled. Pass the scaler (HistoryRecorder(..., grad_scaler=scaler)) and call record() after "
                                 "scaler.unscale_(optimizer); record again") from err
            raise
        return self._check_first_step(g0)

    def _check_first_step(self, g):
        """loss_fn on train_set must reproduce step 0's gradient (g, recomputed with them), parameter by parameter
        (FIRST_STEP_TOLERANCE): the replay recomputes every gradient with them. Skipped where step 0 is not one plain
        backward the check can redo exactly (micro-batches, autocast, loss scaling, features the caller's loss_fn
        reproduces, dropout without its state): the looser checks (loss_ratio, _check_accumulation) remain there. Returns
        whether it compared."""
        reached, raw, micro, autocast, rng = self._first_step
        if set(self.allow) - {"repeated_samples"} or (micro is not None and len(micro) > 1) or autocast or self.grad_scaler is not None or (self._random_layers and rng is None):
            return False
        parts = torch.split(g, [p.numel() for p in self.params])
        now = torch.stack([gradient_norm(parts[i], self._norm_dtype) for i in reached]).to(raw.dtype)
        gap = (now - raw).abs()
        j = int(gap.argmax())
        tolerance = FIRST_STEP_TOLERANCE_CUDA if self.w0.device.type == "cuda" else FIRST_STEP_TOLERANCE
        if not float(gap[j]) <= tolerance * float(torch.linalg.vector_norm(raw)):  # (also NaN)
            name = self.param_names[reached[j]]
            if self._compiled and self._random_layers:
                raise ValueError(f"finish: step 0's gradient under loss_fn differs from training's (parameter {name}: {float(now[j]):.7g} vs "
                                 f"{float(raw[j]):.7g}); the model was torch.compile'd and has dropout ({self._random_layers[0]}): "
                                 "a compiled graph (inductor) draws its masks from a generator of its own, which the eager replay "
                                 "cannot redraw. Record the eager model, compile with backend='aot_eager', or set the dropout to 0")
            raise ValueError(
                f"finish: loss_fn on train_set does not reproduce step 0's gradient: parameter {name}'s gradient norm is "
                f"{float(now[j]):.7g} under loss_fn, {float(raw[j]):.7g} as training's backward gave it ({float(gap[j]) / float(torch.linalg.vector_norm(raw)):.2g} "
                "of the step's gradient norm). Every replay recomputes gradients with loss_fn on train_set, so it would replay another "
                "training. Pass the loss training minimised (label smoothing, class weights and extra terms such as an L2 penalty "
                "included) and a train_set that returns the samples as the training loader fed them (the same transforms). "
                "Random augmentation cannot be replayed: pass allow=('augmentation',) to record anyway (the replay then draws "
                "augmentations of its own)")
        return True

    def _check_accumulation(self, train_set, loss_fn):
        """How the first step accumulated over unequal micro-batches weighed them: each micro-batch's mean loss divided by
        their number (the replay's default), or times its share of the batch (the batch's mean loss, as a trainer that
        normalises by the items in the batch does). Told from the per-parameter gradient norms backward left, against
        both rules' gradients at that step's weights (recomputed with loss_fn); the closer rule is replayed
        (meta["recording"]["accumulation_weighting"]), and a gradient near neither is refused, naming the step."""
        step, w, idx, micro, reached, raw = self._accumulation_probe
        parts = [batch_gradient(self.model, loss_fn, fetch(train_set, part), w, eval_modules=self._eval_modules()) for part in torch.split(idx, micro)]
        sizes = [q.numel() for q in self.params]
        errors = {}
        for rule, weights in (("micro_mean", [1 / len(micro)] * len(micro)), ("batch_mean", [m / sum(micro) for m in micro])):
            g = sum(c * part for c, part in zip(weights, parts))
            norms = torch.stack([torch.linalg.vector_norm(v) for v in torch.split(g, sizes)])[reached].to(raw.dtype)
            errors[rule] = float(torch.linalg.vector_norm(norms - raw) / torch.linalg.vector_norm(raw).clamp(min=1e-300))
        rule = min(errors, key=errors.get)
        if errors[rule] > ACCUMULATION_TOLERANCE:
            raise ValueError(
                f"finish: step {step} accumulated gradients over micro-batches of {micro} samples that match neither the mean of their "
                f"mean losses (loss / {len(micro)}: relative error {errors['micro_mean']:.3g}) nor the batch's mean loss (each micro-batch's "
                f"mean times its share of the batch: {errors['batch_mean']:.3g}) under loss_fn; the replay reproduces these two. Pass "
                "allow=('accumulation',) to HistoryRecorder if your replay loss_fn reproduces the accumulated gradient")
        if rule != "micro_mean":
            self._seen_features["accumulation_weighting"] = rule

    def close(self):
        """Stop recording without finishing: the hooks come off the model and optimizer, a streamed recording's
        sealed chunks are written (the open one is dropped: flush() first to keep it). The history at `path`
        stays an unfinished recording (resume() continues it). Safe to call twice, and after finish()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._finished = True

    def snapshot(self, n_train):
        """The schedule recorded so far as a GradientHistory without trajectory or summary: what `retrain`
        replays (the integrations save one with each trainer checkpoint). Cheap for an in-memory recording;
        a streamed one is flushed and read back."""
        self._check_open("snapshot")
        # bound to the weights now: a retrain from the snapshot unlearns the model as it is at this step
        bound = {"n_train": n_train, "final_digest": weights_digest(self.model)}
        if self.path is not None:
            self.flush()
            history = GradientHistory.load(self.path)
            history.trajectory, history.meta, history.recording_id = None, dict(history.meta, **bound), None
            history.path = None  # a view of the recording: requests served from it are logged in memory
            return history
        if self.policy.kind != "full":
            raise ValueError("snapshot: a kind='minimal' recording in memory keeps no batches to replay; record with kind='full' or a path")
        groups = len(self.optimizer.param_groups)
        schedule = {"w0": self.w0, "batches": list(self.batches), "lrs": torch.tensor(self.lrs, dtype=torch.float64).reshape(-1, groups),
                    **({"buffers0": self.buffers0} if self.buffers0 else {})}
        if self._settings.cycled:
            schedule["momenta"] = torch.tensor(self.momenta, dtype=torch.float64).reshape(-1, groups)
        for key in ("micro_counts", "micro_sizes"):  # gradient accumulation, sealed chunks then the open one
            parts = [sched[f"schedule.{key}"] for _, sched, _ in self._chunks]
            parts.append(torch.tensor([len(m) for m in self._open["micro"]] if key == "micro_counts" else
                                      [s for m in self._open["micro"] if len(m) > 1 for s in m], dtype=torch.int64))
            schedule[key] = torch.cat(parts).to(torch.int64)
        if self._keep_rng:
            schedule["rng_states"] = torch.cat([sched["schedule.rng_states"] for _, sched, _ in self._chunks] + [torch.stack(self._open["rng"])]
                                               if self._open["rng"] else [sched["schedule.rng_states"] for _, sched, _ in self._chunks])
        return GradientHistory(dict(self.meta, **bound), schedule, None, None)

    @classmethod
    def resume(cls, path, model, optimizer, allow=(), grad_scaler=None, features=None):
        """Continue a recording streamed to `path` by a run that stopped (killed, or restarted from a trainer
        checkpoint): `model` and `optimizer` must hold the state of a trainer checkpoint saved right after a
        flush() of that recording. Steps streamed after that flush are dropped (the trainer repeats them).
        ValueError naming what does not match: a finished history, another model, weights that match no flush.
        What the steps before the flush did (clipping, autocast, accumulation: meta["recording"]) comes from the flush's
        chunk, or from `features` (a trainer integration's checkpoint meta["recording"], as of that flush) where given."""
        called, model = model, eager_module(model)
        history = GradientHistory.load(path)
        if history.recording_id is None:
            raise ValueError(f"path: {path!r} holds a finished history; there is no recording to resume")
        lock = store.hold_recording(path)  # (before anything is truncated: another recorder may still be streaming here)
        try:
            return cls._resume(path, called, model, optimizer, allow, grad_scaler, features, history, lock)
        except BaseException:
            os.close(lock)
            raise

    @classmethod
    def _resume(cls, path, called, model, optimizer, allow, grad_scaler, features, history, lock):
        if grad_scaler is not None:
            # the scales of the steps before the flush were held by the killed recorder until finish(); without them the
            # replay of an fp16 run would not round as training did
            raise ValueError("grad_scaler: a recording with loss scaling cannot be resumed (the GradScaler scale of every step is kept in "
                             "memory until finish()); record the run again, or resume without the scaler if it trained without one")
        history.check_model(model)
        recorded, now = history.meta.get("optimizer", {}), optimizer_meta(optimizer)
        if optimizer_settings(recorded) != optimizer_settings(now):
            raise ValueError(f"optimizer: {now['class']} {optimizer_settings(now)[1]} is not the recorded {recorded.get('class')} "
                             f"{optimizer_settings(recorded)[1]} (learning rates aside); resume with the trainer checkpoint's optimizer")
        policy = HistoryPolicy(**{k: v for k, v in history.meta["policy"].items() if k in HistoryPolicy.__dataclass_fields__})
        digest = weights_digest(model)
        marks = [j for j, mark in history.chunk_marks.items() if mark == digest]
        if not marks:
            raise ValueError(f"model: its weights match none of the {len(history.chunk_marks)} flush points of the recording at {path!r}; "
                             "resume from the trainer checkpoint saved together with a flush() (the model's weights at that step)")
        j = marks[-1]
        steps = sum(history.chunk_steps[: j + 1])
        snap = store.read(path, "GradientHistory")  # the chunks' parts up to the flush: checkpoints, the recorder's features
        rec = cls(called, optimizer, policy, allow, grad_scaler=grad_scaler)
        # the optimizer as recorded at step 0, like an uninterrupted run's meta (a scheduler has changed the groups' lr
        # since; the replay reads every step's lr from the schedule)
        rec.meta["optimizer"], rec.meta["group_of_param"] = recorded, history.meta.get("group_of_param", rec.meta["group_of_param"])
        rec.w0, rec.steps, rec.path, rec.recording_id = history.schedule["w0"], steps, path, history.recording_id
        rec.buffers0 = history.schedule.get("buffers0", {})
        if "rng_states" in history.schedule and rec._keep_rng:  # (a DDP recording's rows: one state per rank)
            rec._rank_states = max(1, history.schedule["rng_states"].shape[1] // rng_state(rec.params[0].device).numel())
        for idx in history.schedule["batches"][:steps]:
            rec._note_seen(idx, int(idx.max()))
        rec._last_indices = history.schedule["batches"][steps - 1] if steps else None
        rec._first_indices, rec._first_raw_norm = history.schedule["batches"][0] if steps else None, None
        if policy.kind != "full":  # the checkpoints the grid still keeps at `steps`, from the chunks that took them
            for step in range(steps):  # the grid's state at `steps`, replayed
                rec.grid.offer(step)
            kept = set(rec.grid.kept)
            m = EncodedRows({}, policy.summary_codec, policy.blocksize, rec.w0.numel(), rec.w0.dtype).meta()
            for chunk in snap.chunks[: j + 1]:
                if "ckpt" in chunk["parts"]:
                    tensors = store.read_part(path, chunk["parts"]["ckpt"], repr(path))
                    rows = _encoded_rows("ckpt.w", m, {n[len("ckpt.w."):]: t for n, t in tensors.items() if n.startswith("ckpt.w.")}, repr(path))
                    rec.checkpoints += [(int(s), EncodedRows({n: t[i : i + 1] for n, t in rows.tensors.items()}, rows.codec, rows.blocksize, rows.p, rows.dtype))
                                        for i, s in enumerate(tensors["ckpt.steps"].tolist()) if int(s) in kept]
            if sorted(s for s, _ in rec.checkpoints) != rec.grid.kept:
                raise ValueError(f"path: the recording at {path!r} lacks checkpoints its grid keeps (steps {sorted(kept)[:8]}...)")
        part = snap.chunks[j]["parts"].get("recording")
        if features is not None:
            rec._seen_features.update(_check_features({k: v for k, v in features.items() if k in FEATURES}, steps, "features"))
        elif part is not None:  # (recordings streamed before it was kept have none: their clipping is then seen only if it recurs)
            rec._seen_features.update(_features_of(store.read_part(path, part, repr(path)), steps, path))
        rec._edits_seen = bool(rec._seen_features["clipped_steps"])
        store.truncate(path, "GradientHistory", history.recording_id, j + 1)
        rec._writer = _ChunkWriter(path, rec.recording_id, lock=lock)
        return rec


FEATURE_COUNTS = ("accumulated_steps", "clipped_steps", "autocast_steps")
FEATURES = (*FEATURE_COUNTS, "clip_max_norm", "autocast", "accumulation_weighting", "eval_modules", "unmeasured_edits", "grad_none")
# how the replay weighs the micro-batches of an accumulated step (methods/_common.replay_step); absent: each mean loss / their number
ACCUMULATION_WEIGHTINGS = ("batch_mean", "loss_count")


# layers that draw random numbers in a training forward (their p: the probability of a dropped element)
RANDOM_LAYERS = (torch.nn.modules.dropout._DropoutNd,)


def random_layers(model):
    """The names of model's modules that draw random masks in training (dropout with p > 0)."""
    return [name for name, m in model.named_modules() if isinstance(m, RANDOM_LAYERS) and m.p > 0]


def rng_state(device):
    """The state of the random generator a model on `device` draws its dropout masks from (CPU: the default generator's
    5056 bytes; CUDA: the device's Philox seed and offset), as a uint8 tensor."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type != "cpu":
        raise ValueError(f"HistoryRecorder: dropout on a {device.type} model: its random generator's state is not recorded here")
    return torch.get_rng_state()


class StepSettings:
    """The optimizer settings the replay sets step by step, as a recorder reads them before each step: the learning
    rates, and the momentum (Adam's beta1) that OneCycleLR / CyclicLR cycle by default. Every other setting is kept as
    it was when recording began: check() refuses a step where one changed."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.cycled = cycled_setting(optimizer)
        self.keys = sorted(k for k in optimizer.defaults if k not in ("lr", "momentum"))
        self.fixed = self._fixed()

    def _fixed(self):
        # (betas: beta1 is recorded per step, beta2 must stay)
        return [[_plain_value(g.get(k))[1:] if k == "betas" else _plain_value(g.get(k)) for k in self.keys] for g in self.optimizer.param_groups]

    def now(self):
        """(each group's learning rate, each group's momentum or None if the optimizer has none)."""
        groups = self.optimizer.param_groups
        return [float(g["lr"]) for g in groups], ([momentum_of(g, self.cycled) for g in groups] if self.cycled else None)

    def check(self, step):
        now, then = self._fixed(), self.fixed
        if now == then:
            return
        if len(now) != len(then):
            raise ValueError(f"record: step {step}: the optimizer has {len(now)} parameter groups, {len(then)} when recording began")
        i, key, x, y = next((i, key, x, y) for i, (a, b) in enumerate(zip(now, then)) for key, x, y in zip(self.keys, a, b) if x != y)
        raise ValueError(f"record: step {step}: optimizer parameter group {i}'s {key} is {x!r}, {y!r} when recording began; the replay "
                         "changes only the learning rates and the momentum (Adam's beta1) step by step: keep the other settings fixed")


def _features_tensor(features):
    """The recorder's features so far (meta["recording"] of a finish() now) as JSON bytes in a uint8 tensor: a chunk
    part of the flush that resume() continues from. A GradScaler's per-step scales are not kept (resume refuses one)."""
    kept = {k: v for k, v in features.items() if k != "grad_scaler"}
    return torch.frombuffer(bytearray(json.dumps(kept, sort_keys=True).encode()), dtype=torch.uint8)


def _features_of(tensors, steps, path):
    """The features a flush stored (_features_tensor), checked as what they are: data from a file. ValueError naming `path`."""
    try:
        features = json.loads(bytes(store.check_tensor(tensors, "recording.features", repr(path), (torch.uint8,), 1).tolist()))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        features = None
    return _check_features(features, steps, f"path: the recording at {path!r}")


def _check_features(features, steps, who):
    """`features` ({FEATURE_COUNTS: int, "clip_max_norm": number, "autocast": dtype name}) if well formed for `steps` steps;
    else ValueError naming `who`."""
    clip = features.get("clip_max_norm") if isinstance(features, dict) else None
    if not (isinstance(features, dict) and set(FEATURE_COUNTS) <= set(features) <= set(FEATURES)
            and all(type(features[k]) is int and 0 <= features[k] <= steps for k in FEATURE_COUNTS)
            and (clip is None or (type(clip) in (int, float) and 0 < clip < math.inf))
            and (features.get("autocast") is None or features["autocast"] in ("float16", "bfloat16", "float32", "float64"))
            and features.get("accumulation_weighting", "batch_mean") in ACCUMULATION_WEIGHTINGS
            and (features.get("eval_modules") is None or (isinstance(features["eval_modules"], list)
                                                          and all(isinstance(n, str) for n in features["eval_modules"])))
            and unmeasured_edits(features, steps) is not None and grad_none_runs(features, steps) is not None):
        raise ValueError(f"{who} holds malformed recorder features at its flush point: {features!r:.200}")
    return dict(features, **({"clip_max_norm": float(clip)} if clip is not None else {}))


def check_recordable(named, optimizer, who):
    """ValueError naming the parameter unless every trainable parameter (named: (name, parameter) pairs) is float32 or
    float64 and held by optimizer."""
    half = [(name, p.dtype) for name, p in named if p.dtype not in (torch.float32, torch.float64)]
    if half:
        # finish() and the methods factorise and solve in the parameters' dtype (geqrf has no bfloat16 kernel)
        # and a half-precision replay would round differently from training; keep float32 master weights
        raise ValueError(f"{who}: model parameter {half[0][0]} is {half[0][1]}; histories are recorded for float32 or float64 models")
    opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) not in opt_ids for _, p in named):
        raise ValueError(f"{who}: optimizer does not hold every trainable parameter of model")


def check_dense_gradients(model, who):
    """ValueError naming the parameter of an embedding with sparse=True: its gradient is a sparse tensor, which the
    recorder's norms and rows and the replays' optimizer steps do not take."""
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse and module.weight.requires_grad:
            param = f"{name}.weight" if name else "weight"
            raise ValueError(f"{who}: parameter {param!r} gets sparse gradients ({type(module).__name__}(sparse=True)); histories are "
                             "recorded from dense gradients: construct it with sparse=False (and train with a dense optimizer such as "
                             "SGD or Adam, not SparseAdam)")


def gradient_norm(grad, dtype=None):
    """The 2-norm of `grad` as a 0-d tensor. On CPU a float32/float64 gradient's is the square root of a BLAS dot product:
    torch.linalg.vector_norm runs there on one thread with float32 sums (8 ms per 100 MB on 1 or 2 threads, against
    2 ms for the dot on 2 threads; 1e-5 relative error at 1M elements, against the dot's 2e-7 on MKL's native path, 3e-6 under MKL_CBWR=COMPATIBLE), and the hooks take
    one norm of every gradient each step (a tenth of a 100M-parameter MLP's step before). A sum of squares past
    float32's range is taken again in float64, where vector_norm would give inf as well."""
    if dtype is None and grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64) and grad.is_contiguous():
        flat = grad.view(-1)
        norm = torch.dot(flat, flat).sqrt()
        # (tested in Python: a CPU tensor's float() is a read, torch.isfinite would cost more than the dot on small gradients)
        if math.isfinite(float(norm)) or not bool(torch.isfinite(flat).all()):
            return norm
        return torch.linalg.vector_norm(flat, dtype=torch.float64).to(grad.dtype)
    return torch.linalg.vector_norm(grad, dtype=dtype)


def _new_chunk():
    # g: kind="full", the chunk's gradient row buffers (RowEncoder.buffers), from its first step on
    return {"lrs": [], "momenta": [], "rng": [], "sizes": [], "micro": [], "indices": [], "g": None, "ckpt": []}


# a block-aligned range of one parameter at least this long is quantized from the tensor itself; shorter ranges (biases,
# the blocks that straddle parameters) are gathered into one buffer first: a kernel call per run, not per tensor
MIN_DIRECT = 1 << 16


class RowEncoder:
    """The model's parameters (or gradients) as one row through a codec, written into row `row` of (rows, width)
    buffers: byte for byte what EncodedRows.encode(torch.cat(flat)[None], codec, blocksize) gives, without that flat
    copy or the concatenation of a chunk's rows. The int codecs quantize every block on its own, so a block-aligned
    range of one parameter is quantized where it lies; the flat copy and the per-chunk cat were two thirds of record()'s
    time at 10M parameters (benchmarks/results/recording.md)."""

    def __init__(self, sizes, codec, blocksize, dtype):
        self.sizes, self.codec, self.blocksize, self.dtype = list(sizes), codec, blocksize, dtype
        self.p = p = sum(self.sizes)
        self.offsets = offsets = [0]
        for n in self.sizes:
            offsets.append(offsets[-1] + n)
        self.ranges = []  # (flat start, flat end, [(tensor index, start, end), ...]) covering [0, p) in order
        if codec in ("int8", "int4"):
            bs, direct = blocksize, []
            for i, n in enumerate(self.sizes):
                o = offsets[i]
                a = -(-o // bs) * bs
                b = o + n if o + n == p else (o + n) // bs * bs  # the last tensor takes the partial last block
                if b - a >= MIN_DIRECT:
                    direct.append((a, b, [(i, a - o, b - o)]))
            at = 0
            for a, b, pieces in direct + [(p, p, [])]:
                if a > at:
                    self.ranges.append((at, a, self._pieces(at, a)))
                if pieces:
                    self.ranges.append((a, b, pieces))
                at = b
        self.gather = max((e - s for s, e, pieces in self.ranges if len(pieces) > 1), default=0)
        self._gather_buffer = None

    def _pieces(self, start, end):
        out = []
        for i, n in enumerate(self.sizes):
            o = self.offsets[i]
            a, b = max(start, o), min(end, o + n)
            if a < b:
                out.append((i, a - o, b - o))
        return out

    def buffers(self, rows, device=None):
        """Empty (rows, width) buffers for this codec: {"values"} or {"codes", "scales"}, as EncodedRows holds them."""
        if self.codec == "fp32":
            return {"values": torch.empty(rows, self.p, dtype=torch.float64 if self.dtype == torch.float64 else torch.float32, device=device)}
        if self.codec == "bf16":
            return {"values": torch.empty(rows, self.p, dtype=torch.bfloat16, device=device)}
        bits = 8 if self.codec == "int8" else 4
        width = self.p if bits == 8 else (self.p + 1) // 2
        return {"codes": _page_aligned(rows, width, torch.int8 if bits == 8 else torch.uint8, device),
                "scales": torch.empty(rows, -(-self.p // self.blocksize), dtype=torch.float32, device=device)}

    def encode_into(self, tensors, buffers, row):
        flat = [t.reshape(-1) for t in tensors]
        if "values" in buffers:  # fp32 / bf16: the row is the flat vector (cat converts to the buffer's dtype)
            torch.cat(flat, out=buffers["values"][row])
            return
        bs, bits = self.blocksize, 8 if self.codec == "int8" else 4
        codes, scales = buffers["codes"][row], buffers["scales"][row]
        into = _quantize_into() if flat[0].device.type == "cpu" and forced_backend() in (None, "cpp") else None
        for s, e, pieces in self.ranges:
            if len(pieces) == 1:
                i, a, b = pieces[0]
                x = flat[i][a:b]
            else:
                if self._gather_buffer is None or self._gather_buffer.dtype != flat[0].dtype or self._gather_buffer.device != flat[0].device:
                    self._gather_buffer = torch.empty(self.gather, dtype=flat[0].dtype, device=flat[0].device)
                x = torch.cat([flat[i][a:b] for i, a, b in pieces], out=self._gather_buffer[: e - s])
            code_out, scale_out = codes[s if bits == 8 else s // 2 : e if bits == 8 else (e + 1) // 2], scales[s // bs : -(-e // bs)]
            if into is None or x.dtype != torch.float32 or not x.is_contiguous():
                c, sc = ops.quantize_blockwise(x.float(), bs, bits)  # (.float(): a float64 model's row is quantized as float32)
                code_out.copy_(c)
                scale_out.copy_(sc)
                continue
            into(x.detach(), code_out, scale_out, bs, bits)  # straight into the chunk's buffers: no output, no copy
        # (what ops.quantize_blockwise refuses: a NaN or Inf in x gives a NaN scale), checked once per row
        if into is not None and not bool(torch.isfinite(scales).all()):
            first = int((~torch.isfinite(scales)).nonzero()[0]) * bs
            raise ValueError(f"record: a recorded vector contains NaN or Inf (in elements {first}..{first + bs - 1} of the flat parameters)")


def _page_aligned(rows, width, dtype, device):
    """An empty (rows, width) tensor of 1-byte `dtype` starting on a page boundary on CPU: the background writer's
    direct I/O writes it from where it lies instead of copying it (store._DirectFile)."""
    if device is not None and torch.device(device).type != "cpu":
        return torch.empty(rows, width, dtype=dtype, device=device)
    raw = torch.empty(rows * width + store.DIRECT_ALIGN, dtype=dtype)
    start = -raw.data_ptr() % store.DIRECT_ALIGN
    return raw[start:start + rows * width].view(rows, width)


def chunk_row_buffers(encoder, writer, steps, device):
    """Row buffers of `steps` rows for a new chunk's gradients: ones the writer is done with (a streamed recording), else new."""
    if writer is not None:
        try:
            return writer.spare.get_nowait()
        except queue.Empty:
            pass
    return encoder.buffers(steps, device)


@functools.lru_cache(maxsize=None)
def _quantize_into():
    """The C++ kernel that quantizes float32 into given codes and scales (RowEncoder's CPU path), or None without the
    extension (then the op's default kernel runs and its outputs are copied)."""
    try:
        from . import _C
    except ImportError:
        return None
    return getattr(_C, "quantize_blockwise_into_cpu", None)


class _ChunkWriter:
    """Appends sealed chunks (steps, parts, mark, row buffers or None) to a streamed recording of `kind` (GradientHistory,
    FirstEpochHistory) from a background thread (writing and hashing release the GIL). At most MAX_WAITING chunks
    wait; record() blocks beyond that, so memory stays bounded when the disk is slower than training. A failure is
    kept and raised by the recorder's next call."""

    MAX_WAITING = 2

    def __init__(self, path, recording_id, kind="GradientHistory", lock=None):
        self.path, self.recording_id, self.kind, self.error = path, recording_id, kind, None
        self.lock = store.hold_recording(path) if lock is None else lock  # (released by close())
        self.queue = queue.Queue(maxsize=self.MAX_WAITING)
        self.spare = queue.SimpleQueue()  # row buffers of written chunks, for the recorder to fill again
        self.thread = threading.Thread(target=self._run, name="unlearn_fast-history-writer", daemon=True)
        self.thread.start()

    def put(self, chunk):
        self.queue.put(chunk)

    def _run(self):
        while True:
            chunk = self.queue.get()
            try:
                if chunk is None:
                    return
                steps, parts, mark, buffers = chunk
                if self.error is None:
                    store.append_chunk(self.path, self.kind, self.recording_id, steps, parts, mark)
                if buffers is not None:
                    self.spare.put(buffers)
            except BaseException as err:  # noqa: BLE001 (handed to the training thread)
                self.error = err
            finally:
                self.queue.task_done()

    def join(self):
        self.queue.join()

    def close(self):
        self.queue.put(None)
        self.thread.join()
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


try:  # private: which stage of a step a GradScaler is in (READY, UNSCALED, STEPPED); checked when a scaler is given
    from torch.amp.grad_scaler import OptState as _OPT_STATE
except ImportError:  # pragma: no cover (torch < 2.3)
    _OPT_STATE = None


def _check_scaler(scaler):
    """The GradScaler record() reads (None without one, or a disabled one: it scales nothing)."""
    if scaler is None:
        return None
    if not (hasattr(scaler, "is_enabled") and hasattr(scaler, "unscale_") and hasattr(scaler, "get_scale")):
        raise ValueError(f"grad_scaler: must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    # record() reads whether unscale_ ran and whether it found inf/nan from the scaler's per-optimizer state, a private
    # part of torch: refused by name where this torch lacks it, rather than guessed
    states = getattr(scaler, "_per_optimizer_states", None)
    if _OPT_STATE is None or not isinstance(states, dict) or not {"READY", "UNSCALED", "STEPPED"} <= set(_OPT_STATE.__members__):
        raise ValueError(f"grad_scaler: this torch ({torch.__version__}) keeps no GradScaler per-optimizer state (_per_optimizer_states, "
                         "OptState) that the recorder reads; record without loss scaling, or with torch >= 2.3")
    return scaler


def _round_threshold(value):
    rounded = float(f"{value:.6g}")
    return rounded if abs(rounded - value) <= CLIP_TOLERANCE * value else value


def _plain_value(v):
    """A group setting as a comparable Python value (a tensor's float, a tuple's list)."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return [_plain_value(x) for x in v] if isinstance(v, (tuple, list)) else v


def _jsonable(groups):
    out = []
    for g in groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if isinstance(v, (int, float, bool, str, tuple, type(None)))})
    return out
