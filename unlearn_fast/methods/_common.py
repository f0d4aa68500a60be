"""Small pieces every history-based method shares, and the loss_fn check the recorder and uf.unlearn both run."""
import contextlib
import copy
import math

import torch

from ..history import fetch, set_flat_params

# finish() and uf.unlearn compare loss_fn's gradient on a recorded batch with the recorded one: a ratio of norms
# outside these bounds is not noise (dropout masks, one step of drift) but another loss (a sum, for one: ratio = batch size).
LOSS_RATIO_BOUNDS = (2 / 3, 1.5)


class NotUnlearnedError(RuntimeError):
    """A method could not unlearn (Mini: no progress, no convergence, or its a-posteriori check failed): raised
    instead of returning the original or an unchecked model. `stats` holds what was measured (stats["unlearned"]
    is False, stats["reason"] says why). uf.unlearn(..., fallback="retrain") runs another method instead."""

    def __init__(self, message, stats):
        super().__init__(message)
        self.stats = stats


class UnsupportedTrainingError(NotUnlearnedError, ValueError):
    """A method cannot model how this run was trained or recorded (its optimizer, clipping, micro-batches, batch norm, a
    history section it needs): a ValueError for a caller who asked for that method, and a NotUnlearnedError, so that
    uf.unlearn(..., fallback=...) runs the named fallback instead. Not for bad input, which no other method would fix."""

    def __init__(self, message):
        super().__init__(message, {"unlearned": False, "reason": message})


TRANSFORM_ERRORS = ("forward AD", "Batching rule not implemented", "vmap:", "ZeroTensors are immutable", "derivative for")


@contextlib.contextmanager
def refusing_untransformable(who):
    """Inside the block, an error torch.func raises on the model (an op without forward-mode AD, a batching rule or a
    second derivative; data-dependent control flow under vmap: the curvature products of mini and newton need them)
    becomes an UnsupportedTrainingError naming it, so uf.unlearn's fallback runs; any other error passes unchanged."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as err:
        text = str(err)
        if isinstance(err, NotUnlearnedError) or not any(key in text for key in TRANSFORM_ERRORS):
            raise
        raise UnsupportedTrainingError(
            f"{who}: the method's curvature products run the model under torch.func (forward-mode or second derivatives inside vmap), which "
            f"this model does not support: {text.splitlines()[0][:300]}. Use method='retrain', 'rewind' or 'finetune' (they need "
            "a kind='full' history; rewind also reads a minimal one's checkpoints)") from err


def graph_leaves(t):
    """The leaf tensors (parameters) tensor t's autograd graph reaches, each once: what a replay loss that clips
    its own gradient differentiates by (a loss function is not handed the model)."""
    seen, leaves, stack = set(), [], [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None:
            leaves.append(var)
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


def check_scalar_loss(loss):
    """The methods average per-batch losses: a per-sample (reduction="none") loss is refused, naming loss_fn."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn: must return the batch's mean loss as a scalar tensor, got {shape} (reduction='none'?)")


def batch_loss(model, loss_fn, batch):
    x, y = batch
    loss = loss_fn(model(x), y)
    check_scalar_loss(loss)
    return loss


def remaining(batch, forget_mask):
    return batch[~forget_mask[batch]]


def replayed_batches(history, forget_mask, seed=0):
    """(step, retained micro-batches) for every recorded step: the recorded batch without the forgotten samples, split
    as it was into the micro-batches of gradient accumulation (each a backward of mean loss / their number, or times
    its share of the batch: replay_step). A
    history that keeps no batch order (kind="minimal") gets batches of the recorded sizes drawn without replacement
    from a seeded permutation of the trained samples, epoch after epoch, the forgotten ones then dropped: a retrain
    with another batch order (see history_batch_order)."""
    sched = history.schedule
    if "batches" in sched:
        ranks = rank_parts(history)
        for t, (batch, sizes) in enumerate(zip(sched["batches"], step_micro_sizes(history))):
            if sizes is not None:  # the micro-batches of gradient accumulation (under DDP every rank's, rank after rank)
                parts = torch.split(batch, sizes)
            else:  # a DDP world batch whose ranks each forwarded their own part (dropout, autocast): one part per rank
                parts = batch.chunk(ranks) if ranks > 1 else [batch]
            yield t, [remaining(part, forget_mask) for part in parts]
        return
    pool = torch.nonzero(history.seen_mask()).flatten()
    gen = torch.Generator().manual_seed(seed)
    order, at = pool[torch.randperm(pool.numel(), generator=gen)], 0
    for t, size in enumerate(sched["batch_sizes"].tolist()):
        if at + size > order.numel():  # a new epoch
            order, at = pool[torch.randperm(pool.numel(), generator=gen)], 0
        batch, at = order[at : at + size], at + size
        yield t, [remaining(batch, forget_mask)]


def replay_step(model, loss_fn, train_set, history, parts, step=None):
    """Forward and backward of one replayed step (its retained micro-batches, from replayed_batches) under the
    recorded autocast and, for recorded step `step`, the recorded GradScaler scale (see grad_scale) and random
    generator state (dropout masks), each module in the train / eval mode training ran it in; returns the samples it
    used (0: nothing to step on)."""
    with replay_rng(history, step, model) as draw_part, replay_modes(history, model):
        return _replay_step(model, loss_fn, train_set, history, parts, step, draw_part)


def step_micro_sizes(history):
    """Per recorded step, the sizes of its micro-batches (a list) where it accumulated over several, else None; under
    DDP with rank_parts > 1 an accumulated step's micro-batches are every rank's, rank after rank, the same number per
    rank. ValueError naming the history if they do not split the step's batch so."""
    sched, ranks = history.schedule, rank_parts(history)
    counts, out = sched.get("micro_counts"), []
    micro = iter(sched["micro_sizes"].tolist()) if counts is not None else iter(())
    for t, batch in enumerate(sched["batches"]):
        c = 1 if counts is None else int(counts[t])
        if c == 1:
            out.append(None)
            continue
        sizes = [next(micro, 0) for _ in range(c)]
        per = c // ranks
        if sum(sizes) != len(batch) or c % ranks or any(sum(sizes[r * per:(r + 1) * per]) != len(batch) // ranks for r in range(ranks)):
            raise ValueError(f"history: step {t}'s micro-batches {sizes[:8]} do not split its batch of {len(batch)} samples"
                             + (f" into {ranks} equal rank parts" if ranks > 1 else ""))
        out.append(sizes)
    return out


def parameter_bounds(meta):
    """[0, n_0, n_0 + n_1, ..., p]: where each parameter of meta["param_spec"] starts in the flat vector, and its end."""
    bounds = [0]
    for _, shape, _ in meta["param_spec"]:
        bounds.append(bounds[-1] + math.prod(shape))
    return bounds


def coordinate_groups(meta):
    """Each coordinate's parameter group (p,) int64, from meta["param_spec"] and meta["group_of_param"]."""
    sizes = [math.prod(shape) for _, shape, _ in meta["param_spec"]]
    return torch.cat([torch.full((n,), g, dtype=torch.int64) for n, g in zip(sizes, meta["group_of_param"])])


def coordinate_decay(meta, dtype=torch.float64):
    """The recorded SGD's weight decay: a float where every parameter group has the same, else a (p,) tensor holding
    each coordinate's group's (Hugging Face's trainers put biases and norms in a group without decay)."""
    decays = [float(g.get("weight_decay", 0.0)) for g in meta["optimizer"]["groups"]]
    if len(set(decays)) == 1:
        return decays[0]
    return torch.tensor(decays, dtype=dtype)[coordinate_groups(meta)]


def rank_parts(history):
    """The number of parts a replay forwards a DDP world batch in, one per rank, in rank order: the world size where
    each rank's part must be its own forward (a model with dropout: a row of schedule.rng_states holds one generator
    state per rank; autocast: a bf16 / fp16 matrix product rounds its output once per call, so a world batch forwarded
    at once rounds otherwise than its ranks did), else 1."""
    if "rng_states" not in history.schedule and (history.meta.get("recording") or {}).get("autocast") is None:
        return 1
    return int((history.meta.get("distributed") or {}).get("world_size", 1))


@contextlib.contextmanager
def replay_rng(history, step, model):
    """Within: the random generator as training's was at recorded step `step`'s first forward (a history of a model with
    dropout keeps it), so that the replay draws training's dropout masks; the caller's generator state is restored
    after. Without a recorded state: nothing changes (the replay draws masks of its own). Yields draw_part(i, n): for a
    step whose ranks drew from their own generators (rank_parts), called before the forward of part i of the step's
    n parts (its ranks' parts, or their micro-batches rank after rank), it sets the state of the rank part i belongs
    to at that rank's first part (its later micro-batches draw on from there, as training's did)."""
    states = history.schedule.get("rng_states")
    if states is None or step is None:
        yield lambda i, n=1: None
        return
    device = next(p.device for p in model.parameters())
    ranks = rank_parts(history)
    row = states[step]
    if row.numel() % ranks:
        raise ValueError(f"history: schedule.rng_states row {step} has {row.numel()} bytes, not one state per rank of {ranks}")
    rows = row.view(ranks, -1)

    def draw(i, n):
        per = max(n // ranks, 1)
        if i % per:
            return
        try:
            set_rng_state(rows[i // per], device)
        except RuntimeError as err:  # a state of another size or generator (a crafted or foreign file)
            raise ValueError(f"history: schedule.rng_states row {step} is not a {device.type} generator state ({err})") from None

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if ranks == 1:
            draw(0, 1)
            yield lambda i, n=1: None
        else:
            yield draw


def set_rng_state(state, device):
    """Make `state` (recording.rng_state's) the state of the generator a model on `device` draws dropout from."""
    state = state.clone()  # (torch 2.13's set_rng_state of a row view at a storage offset crashes the process)
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _replay_step(model, loss_fn, train_set, history, parts, step, draw_part=lambda i, n=1: None):
    scale = grad_scale(history, step)
    # each micro-batch's mean loss / their number, or (recorded so) times its share of the retained batch ("batch_mean"), or
    # of the items loss_fn averages over ("loss_count": a Hugging Face Trainer's tokens, loss_fn.count_items)
    weighting = (history.meta.get("recording") or {}).get("accumulation_weighting")
    retained = sum(part.numel() for part in parts)
    count = getattr(loss_fn, "count_items", None)
    by_rank = rank_parts(history) > 1  # DDP's ranks: the all-reduced mean over the world batch's retained items, or samples
    if len(parts) == 1:
        weights = [1.0]
    elif weighting == "loss_count" or (by_rank and callable(count)):
        if not callable(count):
            raise ValueError("loss_fn: the history weighs accumulated micro-batches by the items the loss averages over (a Hugging Face "
                             "Trainer's label tokens); pass a loss_fn with count_items(targets), such as the callback's replay_loss")
        counts = [float(count(fetch(train_set, part)[1])) if part.numel() else 0.0 for part in parts]
        weights = [c / max(sum(counts), 1.0) for c in counts]
    elif weighting == "batch_mean" or by_rank:
        weights = [part.numel() / max(retained, 1) for part in parts]
    else:
        weights = [None] * len(parts)  # loss / their number, as the accumulation idiom divides (bit for bit)
    while True:
        used = 0
        for i, (part, weight) in enumerate(zip(parts, weights)):
            draw_part(i, len(parts))  # (also before an emptied part: the rank's later micro-batches draw on from its state)
            if part.numel():
                with replay_autocast(history, model):
                    loss = batch_loss(model, loss_fn, fetch(train_set, part))
                loss = loss if len(parts) == 1 else loss / len(parts) if weight is None else loss * weight
                (loss if scale is None else loss * torch.full((), scale, dtype=torch.float32, device=loss.device)).backward()  # scaler.scale(loss)
                used += part.numel()
        if scale is None or not used or _unscale(model, scale):
            return used
        # a batch without the forgotten samples overflowed at the recorded scale: the scaler would have backed off and
        # skipped the step, a retrain takes it, at half the scale (float32: the same gradients)
        for p in model.parameters():
            p.grad = None
        scale = scale / 2 if scale > 1 else None


def _unscale(model, scale):
    """scaler.unscale_: the gradients times the float32 reciprocal of the scale, by the kernel torch.amp uses; False
    if one is inf/nan."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    inv = torch.full((), scale, dtype=torch.float64, device=grads[0].device).reciprocal().float()
    found_inf = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
    return not bool(found_inf)


def grad_scale(history, step):
    """The GradScaler scale recorded step `step`'s backward ran at (HistoryRecorder(grad_scaler=)), or None. The
    replay scales its loss by it and unscales as training did: under fp16 autocast, gradients the scale kept from
    underflowing then round as they did (float32 and bf16 would replay exactly without it)."""
    scales = ((history.meta.get("recording") or {}).get("grad_scaler") or {}).get("scales")
    if not scales or step is None:
        return None
    at = next((i for i, (first, _) in enumerate(scales) if first > step), len(scales)) - 1  # run-length: [first step, scale]
    return float(scales[at][1]) if at >= 0 else None


def history_batch_order(history):
    """What a replay of `history` uses as batches (reported in the methods' stats)."""
    return "recorded" if "batches" in history.schedule else "resampled (a kind='minimal' history keeps no batch order)"


# an edit the recorder could not measure (unmeasured_edits) is taken as clipping at the threshold later steps show when its
# gradient norm after the edit is at most the threshold, within float32 rounding of a norm over many elements
UNMEASURED_TOLERANCE = 1e-3


def unmeasured_edits(recording, steps=None):
    """meta["recording"]["unmeasured_edits"] ([[step, gradient norm after the edit], ...], see
    HistoryRecorder._unmeasured_step) as (int, float) pairs, [] if absent; None if malformed (data from a file)."""
    edits = recording.get("unmeasured_edits", [])
    ok = isinstance(edits, list) and all(
        isinstance(e, list) and len(e) == 2 and type(e[0]) is int and 0 <= e[0] < (math.inf if steps is None else steps)
        and type(e[1]) in (int, float) and 0 <= e[1] < math.inf for e in edits)
    return [(e[0], float(e[1])) for e in edits] if ok else None


def grad_none_runs(recording, steps=None):
    """meta["recording"]["grad_none"] (HistoryRecorder.record: [[first step, [names of the parameters whose .grad was None
    at that step's optimizer.step()]], ...], run-length, ascending, each run lasting until the next; absent where every
    parameter had a gradient at every step) as (int, [str]) pairs, [] if absent; None if malformed (data from a file)."""
    runs = recording.get("grad_none", [])
    ok = isinstance(runs, list) and all(
        isinstance(r, list) and len(r) == 2 and type(r[0]) is int and 0 <= r[0] < (math.inf if steps is None else steps)
        and isinstance(r[1], list) and all(isinstance(n, str) for n in r[1]) for r in runs) \
        and all(a[0] < b[0] for a, b in zip(runs, runs[1:]))
    return [(r[0], list(r[1])) for r in runs] if ok else None


def skipped_parameters(history):
    """[(first step, [indices into meta["param_spec"]])], run-length: the parameters training's optimizer skipped
    (their .grad was None at optimizer.step(): an unused head, a branch not taken), which a replay of the recorded rows
    must skip too (torch.optim applies no weight decay or momentum to them); [] for most runs. ValueError if malformed."""
    runs = grad_none_runs(history.meta.get("recording") or {}, history.num_steps)
    index = {spec[0]: i for i, spec in enumerate(history.meta["param_spec"])}
    if runs is None or any(n not in index for _, names in runs for n in names):
        raise ValueError(f"history: meta['recording']['grad_none'] is malformed: {(history.meta.get('recording') or {}).get('grad_none')!r:.200}")
    return [(step, [index[n] for n in names]) for step, names in runs]



def clip_max_norm(history):
    """The gradient-norm threshold the training run clipped at (recorded by HistoryRecorder), or None. ValueError if a step
    was edited where the recorder could not measure the edit (unmeasured_edits) and clipping at that threshold does not
    explain it: a replay would apply another update than training did."""
    recording = history.meta.get("recording") or {}
    max_norm = recording.get("clip_max_norm")
    edits = unmeasured_edits(recording)
    if edits is None:
        raise ValueError(f"history: meta['recording']['unmeasured_edits'] is malformed: {recording.get('unmeasured_edits')!r:.200}")
    for step, norm in edits:
        if max_norm is None or not norm <= max_norm * (1 + UNMEASURED_TOLERANCE):
            why = ("no step of the run showed norm clipping" if max_norm is None else
                   f"its gradient norm after the edit, {norm:.6g}, is above the clipping threshold {max_norm:.6g} later steps show")
            raise ValueError(f"history: step {step}'s gradients were edited between backward and record() on a step the recorder did not "
                             f"measure at backward (the first edit of a run that had none before), and {why}, so no replay can tell what "
                             "that step applied. Record again with the edit (for example clip_grad_norm_) on every step from the first")
    return max_norm


def clip(model, max_norm):
    """What the training run did between backward and optimizer.step() (see clip_max_norm)."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)


def replay_autocast(history, model):
    """The autocast the training run's forward passes ran under (recorded by HistoryRecorder), for a replay's
    forward and loss; a null context if none."""
    dtype = (history.meta.get("recording") or {}).get("autocast")
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"history: recorded autocast dtype {dtype!r:.40} is not bfloat16 or float16")
    device = next(p.device.type for p in model.parameters())
    return torch.autocast(device, getattr(torch, dtype))


# methods whose model of a step is the plain (unclipped, full-precision) SGD update
PLAIN_SGD_MODELS = ("deltagrad", "mini")


def refuse_unmodelled_features(history, method):
    """UnsupportedTrainingError naming the training feature (clipping, accumulation, autocast) a plain-SGD step model lacks."""
    recording = history.meta.get("recording") or {}
    max_norm, autocast = clip_max_norm(history), recording.get("autocast")
    if max_norm is not None or recording.get("clipped_steps"):
        what = f"clipped gradient norms at {max_norm:.6g}" if max_norm is not None else f"edited (clipped) the gradients of {recording['clipped_steps']} steps"
        raise UnsupportedTrainingError(f"{method}: the training run {what}, which its model of an SGD step does not include; use method='retrain' "
                                       "or 'rewind' (they replay the clipping)")
    if bool((history.schedule.get("micro_counts", torch.ones(1)) > 1).any()):
        raise UnsupportedTrainingError(f"{method}: the training run accumulated gradients over micro-batches, which its model of an SGD step does not "
                                       "include; use method='retrain' or 'rewind' (they replay the micro-batches)")
    if autocast is not None:
        raise UnsupportedTrainingError(f"{method}: the training run's forward ran under autocast ({autocast}), which its model of an SGD step does not "
                                       "include; use method='retrain' or 'rewind' (they replay it)")


def check_history(history, model, forget, train_set, method):
    """The history must match the model and the training set, and must have seen every forgotten sample."""
    from ..history import GradientHistory

    if not isinstance(history, GradientHistory):
        raise ValueError(f"{method}: history must be a GradientHistory (from HistoryRecorder.finish or GradientHistory.load), got {type(history).__name__}")
    if not history.complete:
        raise ValueError(f"history: its recording did not finish ({history.num_steps} steps were streamed to {history.path!r}); continue it "
                         "with HistoryRecorder.resume from a trainer checkpoint, or record again")
    history.check_model(model)
    if method in PLAIN_SGD_MODELS:
        refuse_unmodelled_features(history, method)
    if len(train_set) != history.n_train:  # its batches are indices into the recorded training set
        raise ValueError(
            f"train_set: has {len(train_set)} samples, the history was recorded on a training set of {history.n_train}; "
            "pass the same data set (a torch.utils.data.Subset of its first samples if data was appended since)"
        )
    seen = history.seen_mask()
    unseen = forget[~seen[forget]]
    if unseen.numel():
        raise ValueError(f"forget: indices {unseen[:10].tolist()} never appear in the recorded history (never trained on)")
    if forget.numel() and forget.numel() >= int(seen.sum()):  # (a run that trained on part of train_set: all of that part)
        raise ValueError(f"forget: names every one of the {forget.numel()} samples training used; nothing would remain to learn from")


@contextlib.contextmanager
def module_mode(model, training, eval_modules=()):
    """Every module in training (or eval) mode inside the block, except the modules named in eval_modules in eval mode;
    each module's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    named = dict(model.named_modules())
    for name in eval_modules:
        if name not in named:
            raise ValueError(f"history: recorded module {name!r} (in eval mode during training) is not the model's; recorded for another model")
        named[name].training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def replay_modes(history, model):
    """Within: the model's modules in the train / eval modes training ran them in (meta["recording"]["eval_modules"]:
    a caller's model.eval() before uf.unlearn must not replay training in eval mode: 2-5 % off with batch norm or dropout,
    measured); a history recorded before 2026-12-05 replays in the model's modes as given."""
    eval_modules = (history.meta.get("recording") or {}).get("eval_modules")
    return contextlib.nullcontext() if eval_modules is None else module_mode(model, True, eval_modules)


def batch_gradient(model, loss_fn, batch, w, rng=None, eval_modules=()):
    """The flat gradient of loss_fn on `batch` at flat parameters w, in training mode (the mode the recorded
    gradients were computed in; the modules named in eval_modules in eval mode, as training ran them), with dropout
    drawn from generator state `rng` if given. Leaves the model untouched: parameters, .grad, buffers (batch norm's
    running statistics) and the global RNG (dropout).

    At other weights than the model's it runs on a copy holding w, not through torch.func.functional_call: a
    checkpointed segment (torch.utils.checkpoint) recomputes its forward during backward, after functional_call has
    put the model's own weights back (measured: step 0's gradient of a checkpointed model 7.6e-4 off)."""
    own = [p for p in model.parameters() if p.requires_grad]
    here = torch.equal(w.detach(), torch.cat([p.detach().reshape(-1) for p in own]))
    target = model if here else copy.deepcopy(model)  # (hooks on a copy are inert: recording.InertWhenCopied)
    if not here:
        set_flat_params(target, w)
    params = own if here else [p for p in target.parameters() if p.requires_grad]
    buffers = [(b, b.clone()) for b in target.buffers()] if here else []  # (batch norm's statistics, put back)
    x, y = batch
    devices = [w.device] if w.device.type == "cuda" else []
    try:
        with module_mode(target, True, eval_modules), torch.random.fork_rng(devices=devices), torch.enable_grad():
            if rng is not None:
                set_rng_state(rng, w.device)
            loss = loss_fn(target(x), y)
            check_scalar_loss(loss)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
    return torch.cat([(torch.zeros_like(p) if g is None else g.detach()).reshape(-1) for p, g in zip(params, grads)])


# uf.unlearn's check of its loss_fn and train_set against finish()'s on the same batch and weights: the same computation,
# on this machine or another (other kernels' summation orders move a norm by ~1e-6 of it); a train_set in another order,
# transformed otherwise, or another loss moves some parameter's norm by far more (measured: a permuted train_set, inputs
# scaled by 1.05, label smoothing 0.05 were accepted by the norm ratio and retrain landed 0.64-2.0 gaps from the truth)
LOSS_CHECK_TOLERANCE = 1e-4


def seeded_state(device, seed=0):
    """A fixed generator state for `device`: gradients compared across calls draw the same dropout masks."""
    return torch.Generator(device).manual_seed(seed).get_state()


def loss_fingerprint(model, loss_fn, batch, w):
    """Each trainable parameter's gradient norm under loss_fn on `batch` at w (dropout from a fixed seed): what finish()
    stores in meta["loss_check"] and uf.unlearn compares its own loss_fn and train_set with."""
    g = batch_gradient(model, loss_fn, batch, w, rng=seeded_state(w.device))
    return [float(torch.linalg.vector_norm(t)) for t in torch.split(g, [p.numel() for p in model.parameters() if p.requires_grad])]


def check_loss_fingerprint(check, model, loss_fn, batch, w):
    """ValueError naming loss_fn / train_set unless they give the gradient finish() measured (check: meta["loss_check"])."""
    if "param_norms" not in check:  # (histories written before 2026-12-05: the norm ratio only)
        return loss_ratio(model, loss_fn, batch, w, check["grad_norm"])
    now, then = loss_fingerprint(model, loss_fn, batch, w), check["param_norms"]
    total = math.sqrt(sum(n * n for n in then))
    loss_ratio(model, loss_fn, batch, w, total, norm=math.sqrt(sum(n * n for n in now)))  # (a sum for a mean: its own message)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    j = max(range(len(now)), key=lambda i: abs(now[i] - then[i]))
    if not abs(now[j] - then[j]) <= LOSS_CHECK_TOLERANCE * total:
        raise ValueError(
            f"loss_fn / train_set: on the batch of recorded step {check['step']} at the trained weights, parameter {names[j]}'s gradient "
            f"norm is {now[j]:.7g}, {then[j]:.7g} when the history was finished ({abs(now[j] - then[j]) / max(total, 1e-300):.2g} of the "
            "gradient's norm). Pass the training set as recorded (the same samples in the same order, the same transforms) and "
            "the loss_fn finish() was given; another one would replay another training")


def loss_ratio(model, loss_fn, batch, w, reference_norm, norm=None):
    """|gradient of loss_fn on batch at w| / reference_norm (`norm`: that gradient norm, if known), ValueError naming
    loss_fn when it is far from 1."""
    if norm is None:
        norm = float(torch.linalg.vector_norm(batch_gradient(model, loss_fn, batch, w)))
    if norm == reference_norm == 0:  # a stationary point: nothing to compare, and both losses agree there
        return 1.0
    ratio = norm / max(reference_norm, 1e-300)
    low, high = LOSS_RATIO_BOUNDS
    if not low <= ratio <= high:  # also catches NaN
        what = "a non-finite gradient" if ratio != ratio or ratio == float("inf") else f"{ratio:.4g} times the gradient"
        raise ValueError(
            f"loss_fn: gives {what} the training loss gave on a recorded batch of {len(batch[1])} samples; it must be the "
            "MEAN loss the model was trained with (a sum is batch-size times larger)"
        )
    return ratio
