"""Record a GradientHistory from a torch.distributed DistributedDataParallel (DDP) training loop.

    model = DDP(net); rec = DistributedRecorder(model, optimizer, policy)      # on every rank
    for indices, x, y in loader:                  # DistributedSampler: each rank its part of the world batch
        optimizer.zero_grad(); loss_fn(model(x), y).backward()
        rec.record(indices)                       # every rank, after backward, before step (a collective call)
        optimizer.step()
    history = rec.finish(train_set, loss_fn)      # the GradientHistory on rank 0, None on the other ranks

After backward every rank holds the same gradient, the average of the ranks' mean-loss gradients, so one rank
(rank 0) records, on the unwrapped `.module` (parameter names without DDP's "module." prefix); record() gathers
every rank's indices of the step (all_gather) into the world batch, in rank order. The
average of the ranks' means equals the mean over the world batch, which is what a single-process replay
computes, only when every rank's batch has the same size: record() refuses unequal sizes on every rank (set
drop_last=True on the DataLoader, or pad the data set to a multiple of world size times batch size).
The history records the world size (meta["distributed"]); a single-process replay of it (uf.unlearn with
method="retrain") is exact to float rounding. A replay under DDP, with the same number of ranks, on every rank:

    result = unlearn(model, history, forget, train_set, loss_fn)      # model: the trained DDP model or its .module

each rank computes the gradient of its own part of every recorded world batch (the part it trained on) with the
retained samples only, weighted so that the all-reduced sum is the mean over the world batch's retained samples
(what the single-process replay computes); every rank applies the same update and ends with the same model.
check_world_size() refuses a history recorded under another world size.

Dropout: every rank draws its masks from its own random generator. Both recorders take each rank's generator state at
the step's first training forward and gather them in rank order into the step's row of schedule.rng_states; every
replay (DDP, FSDP2, single process) draws each rank's part of the world batch from that rank's state.

DistributedRecorder(..., path=...) streams rank 0's recording to disk (HistoryRecorder's chunked store); flush() (a
collective) marks a point a trainer checkpoint is saved at, and DistributedRecorder.resume continues the recording
from it in a new job with the same world size (every rank raises rank 0's refusal alike).

FSDP2 (torch.distributed.fsdp.fully_shard, DTensor parameters): ShardedRecorder records one shard history per rank (streamed to
path/rank-<r> with path=, resumed by ShardedRecorder.resume), run_sharded /
unlearn_sharded replay it under the same sharding, gather_shards() makes one single-process history of them; DistributedRecorder
and run refuse a sharded model, naming them. See docs/distributed.md.
"""
import copy
import dataclasses
import functools
import os
import time
import uuid

import torch
import torch.distributed as dist
# Imported now, before the caller's init_process_group: its functions take `group=group.WORLD` as a default argument,
# evaluated at import, and DDP imports it during its construction. Imported after init, ten default arguments hold
# the default process group for the life of the interpreter: destroy_process_group() cannot free it, and its gloo
# worker threads live on into interpreter finalization, where one that still has to take the GIL (to release a
# comm-hook callback or a tensor's Python object) aborts the process ("terminate called without an active
# exception", SIGABRT). Imported here, the defaults are None. See docs/distributed.md, "Teardown".
if dist.is_available():
    import torch.distributed.nn.functional  # noqa: F401,E402

from ..optimizers import set_step_settings
from ..recording import (HistoryRecorder, InertWhenCopied, StepSettings, check_dense_gradients, check_recordable, chunk_row_buffers, gradient_norm,
                         random_layers, rng_state)


def _world(group, who="DistributedRecorder"):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{who}: torch.distributed is not initialised (call dist.init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def _src(group):
    """The global rank of rank 0 of `group` (broadcasts name their source by global rank)."""
    return dist.get_global_rank(group, 0) if group is not None else 0


def on_rank0(group, rank, fn):
    """fn() on rank 0 of `group`, its result there (None on the other ranks); its exception is broadcast and raised on
    every rank (rank 0 re-raises its own; the others a ValueError with the same text, or a RuntimeError naming the
    exception), so that no rank goes on into a collective the others never reach."""
    outcome, failure, result = [None], None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 (re-raised below, on every rank)
            failure, outcome = err, [(isinstance(err, ValueError), f"{type(err).__name__}: {err}", str(err))]
    dist.broadcast_object_list(outcome, src=_src(group), group=group)
    if outcome[0] is None:
        return result
    if failure is not None:
        raise failure
    is_value_error, described, message = outcome[0]
    if is_value_error:
        raise ValueError(message)
    raise RuntimeError(f"rank 0 failed: {described}")


class DistributedRecorder:
    """HistoryRecorder for DDP: every rank calls record() and finish(); rank 0 (of `group`) records."""

    def __init__(self, model, optimizer, policy=None, group=None, **recorder_options):
        allow = recorder_options.pop("allow", ())
        path = recorder_options.pop("path", None)
        self._attach(model, optimizer, group, allow)
        # only rank 0 holds a recorder: the others would record the same gradients and world batches again
        self.recorder = None

        def build():
            import inspect

            if self.allow and "allow" in inspect.signature(HistoryRecorder.__init__).parameters:
                recorder_options["allow"] = self.allow
            recorder = HistoryRecorder(model.module, optimizer, policy, **recorder_options)
            # in the recorder's meta before a streamed recording (path=...) writes its head: resume() reads the world
            # size there, in a recording that never finished
            recorder.meta["distributed"] = self._meta()
            if path is not None:
                recorder._start_stream(path)
            return recorder

        # a refusal on rank 0 alone (path already holds a history, ...) would leave the others waiting in record()'s
        # collectives: every rank raises it
        self.recorder = on_rank0(self.group, self.rank, build)

    def _attach(self, model, optimizer, group, allow):
        """The checks of the model, the forward and comm hooks (every rank; no communication)."""
        self._check_model(model, group, "DistributedRecorder")
        self.steps = 0
        self.allow = (allow,) if isinstance(allow, str) else tuple(allow)
        # dropout: every rank draws its masks from its own generator; each rank takes its state at the step's first
        # training forward, record() gathers them in rank order and rank 0's recorder keeps them with the step
        # (set_step_rng), so that a replay draws every rank's masks (allow=('dropout',): not kept, replays draw others)
        self._keep_states = "dropout" not in self.allow and bool(random_layers(model.module))
        # each rank's training forwards of the coming step (their batch sizes: an accumulated step's micro-batches) and
        # whether they ran under autocast: where each rank's part must be replayed as its own forwards (dropout, autocast)
        # the recorder keeps every rank's micro-batches with the step (set_step_micro)
        self.params = [p for p in model.module.parameters() if p.requires_grad]
        self._rng, self._micro, self._autocast, self._passes = None, [], False, [0] * len(self.params)
        taker = getattr(model, "_unlearn_fast_forwards", None)  # (one hook set per model: a later recorder on it takes it over)
        if taker is None:
            taker = model._unlearn_fast_forwards = _ForwardTaker()
            model.module.register_forward_pre_hook(InertWhenCopied(taker), with_kwargs=True)
            # autocast seen where the parameters are used (accelerate enters it inside the model's patched forward)
            for m in model.module.modules():
                if any(p.requires_grad for p in m.parameters(recurse=False)):
                    m.register_forward_pre_hook(InertWhenCopied(taker.inner))
            # backward passes that reached each parameter: several in a step are gradient accumulation
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(InertWhenCopied(functools.partial(taker.backward, i)))
        taker.recorder = self
        # a step's forwards end with its optimizer step: a forward after record() (a check's) belongs to no step
        self._step_hook = optimizer.register_step_post_hook(InertWhenCopied(self._step_done))
        # The recorder takes each gradient's norm when backward leaves it, to detect clipping (a later change) and
        # to check finish()'s loss_fn against; under DDP the all-reduce writes the averaged gradients after that.
        # A communication hook measures the norms the all-reduce produced: this class refuses a later edit itself
        # and hands those norms to the recorder as its baseline (see _rebaseline).
        # written by the hook's callbacks, which run on the backend's worker threads (one per bucket, concurrently):
        # one dict entry per bucket, never a read-modify-write of a shared number (a "+=" there lost a bucket's
        # share now and then, and that rank alone refused the step)
        self._bucket_sq, self._reduced_norms, self._reduced_clip_norms = {}, {}, {}
        # DDP takes one comm hook per model for its lifetime: a later recorder on the same model takes it over
        state = getattr(model, "_unlearn_fast_reduction", None)
        if state is None:
            state = _Reduction(group)
            try:
                model.register_comm_hook(state, _allreduce_measuring)
            except RuntimeError as err:
                raise ValueError(f"DistributedRecorder: cannot register its communication hook on the DDP model ({err}); "
                                 "a model with its own comm hook is not supported") from None
            model._unlearn_fast_reduction = state
        state.recorder = self

    @classmethod
    def resume(cls, path, model, optimizer, group=None, allow=(), features=None):
        """Continue a DDP recording streamed to `path` (DistributedRecorder(..., path=path)) by a run that stopped: every
        rank calls it (a collective) with `model` (the DDP wrapper) and `optimizer` holding the state of a trainer
        checkpoint saved right after a flush() of that recording. Rank 0 continues it with HistoryRecorder.resume on
        model.module (the steps streamed after that flush are dropped: the trainer repeats them). ValueError on every
        rank when rank 0 refuses: a recording of another world size (naming path and both), a finished history,
        another model, weights that match no flush point."""
        self = cls.__new__(cls)
        self._check_model(model, group, "DistributedRecorder.resume")

        def resumed():
            from .. import store

            recorded = int(store.read(path, "GradientHistory").info.get("meta", {}).get("distributed", {}).get("world_size", 1))
            if recorded != self.world_size:
                raise ValueError(f"path: the recording at {path!r} was made with world size {recorded}, resumed under world size "
                                 f"{self.world_size}; every rank's share of a world batch depends on it: resume with {recorded} ranks")
            recorder = HistoryRecorder.resume(path, model.module, optimizer, allow, features=features)
            # the resumed recorder's own meta holds no distributed facts: its finished history needs them
            recorder.meta["distributed"] = self._meta()
            return recorder

        # rank 0 alone reads and continues the recording; its outcome is broadcast so that every rank returns or raises
        # alike (a rank that went on would wait forever in record()'s first collective)
        recorder = on_rank0(group, self.rank, resumed)
        self._attach(model, optimizer, group, allow)
        self.recorder = recorder
        steps = [recorder.steps if recorder is not None else 0]
        dist.broadcast_object_list(steps, src=_src(group), group=group)
        self.steps = steps[0]
        return self

    def _check_model(self, model, group, who):
        refuse_sharded(model, who)
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"{who}: model must be the DistributedDataParallel wrapper (its gradients are the "
                             f"ranks' average), got {type(model).__name__}")
        self.group = group
        self.world_size, self.rank = _world(group)
        self.backend = str(dist.get_backend(group))

    def flush(self):
        """Make every recorded step durable at the recording's path and mark this point (HistoryRecorder.flush), so that
        resume() can continue from a trainer checkpoint saved now. Every rank calls it after optimizer.step() (a
        collective: rank 0 flushes, and every rank returns once it is written, or raises what rank 0 raised)."""
        on_rank0(self.group, self.rank, lambda: self.recorder.flush())

    def close(self):
        """Stop recording without finishing (HistoryRecorder.close on rank 0; not collective): a streamed recording
        keeps its flushed and sealed chunks, and resume() continues it."""
        self._step_hook.remove()
        if self.recorder is not None:
            self.recorder.close()

    def record(self, batch_indices):
        """Record the coming optimizer step; batch_indices: this rank's sample indices (1-D integers).
        Collective: every rank must call it at every step."""
        local = torch.as_tensor(batch_indices)
        if local.dtype.is_floating_point or local.dtype == torch.bool or local.dim() != 1:
            raise ValueError(f"record: batch_indices must be this rank's 1-D integer sample indices, got {local.dtype} of shape {tuple(local.shape)}")
        local = local.to("cpu", torch.int64)
        norms = self._reduced_gradient_norms()
        reduced, now = norms if norms is not None else (0.0, 0.0)
        edited = norms is not None and abs(now - reduced) > 1e-6 * reduced and "clipping" not in self.allow
        micro, self._micro = [m for m in self._micro if m > 0] or self._micro, []
        autocast, self._autocast = self._autocast, False
        passes, self._passes = max(self._passes, default=0), [0] * len(self.params)
        # one gather of (batch size, no all-reduce, edited, training forwards, autocast, backward passes) from every rank:
        # every rank sees the same and raises alike (none is left waiting in the next collective)
        info = [torch.zeros(6, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(info, torch.tensor([local.numel(), int(norms is None), int(edited), len(micro), int(autocast), passes]),
                        group=self.group)
        sizes = [int(i[0]) for i in info]
        unreduced_on = [r for r, i in enumerate(info) if int(i[1])]
        edited_on = [r for r, i in enumerate(info) if int(i[2])]
        if len(set(sizes)) != 1:
            # every rank sees the same sizes, so every rank raises: none is left waiting in a collective
            raise ValueError(
                f"record: step {self.steps} has per-rank batch sizes {sizes}; DDP averages the ranks' mean gradients, which equals "
                "the world batch's mean gradient (what the replay computes) only for equal sizes. Use drop_last=True, or a data "
                "set size that is a multiple of world size x batch size"
            )
        if unreduced_on:
            raise ValueError(f"record: step {self.steps}: no DDP gradient all-reduce ran since the last record() on ranks {unreduced_on}; "
                             "call record() after the backward of the DDP model (under no_sync(), after the last micro-batch's backward)")
        if edited_on:
            raise ValueError(f"record: step {self.steps}'s gradients changed after DDP's all-reduce on ranks {edited_on}"
                             + (f" (here: norm {reduced:.6g} -> {now:.6g})" if edited else "") + ": gradient clipping? The replay "
                             "computes unclipped gradients. Train without clipping, or pass allow=('clipping',) if your replay "
                             "loss_fn reproduces it")
        padded = [torch.empty(sizes[0], dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(padded, local, group=self.group)
        world = torch.cat(padded)
        world_micro = self._gather_micro(micro, info, sizes[0])
        states = None
        if self._keep_states:
            states, self._rng = _gather_rng(self._rng, self.params[0].device, self.world_size, self.group), None
        if self.recorder is not None:
            self._rebaseline()
            if states is not None:
                self.recorder.set_step_rng(states)
            if world_micro is not None:
                self.recorder.set_step_micro(world_micro)
            self.recorder.record(world)
        self.steps += 1
        return world

    def _step_done(self, optimizer, args, kwargs):
        self._rng, self._micro, self._autocast, self._passes = None, [], False, [0] * len(self.params)

    def _gather_micro(self, micro, info, size):
        """Every rank's micro-batch sizes of this step, rank after rank, where the step accumulated over several and each
        rank's forwards must be replayed one by one (its dropout masks drawn on from one state, or bfloat16 products that
        round once per call); None elsewhere. A collective where it is needed (the same decision on every rank)."""
        counts, passes = [int(i[3]) for i in info], [int(i[5]) for i in info]
        if max(passes) <= 1:  # (a model called twice for one backward is one batch, not accumulation)
            return None
        if not (self._keep_states or any(int(i[4]) for i in info)):
            if "accumulation" not in self.allow:  # (rank 0's recorder would refuse it alone, the others waiting in a collective)
                raise ValueError(f"record: step {self.steps}: the ranks ran {passes} backward passes (gradient accumulation); the "
                                 "replay forwards each step's world batch as one batch, which reproduces accumulation over micro-"
                                 "batches of one size, each averaged (loss / their number): pass allow=('accumulation',) if so")
            return None
        if len(set(counts)) != 1 or counts != passes:
            raise ValueError(f"record: step {self.steps}: the ranks ran {counts} training forwards for {passes} backward passes; every "
                             "rank's micro-batches are replayed one by one (dropout or autocast), which needs one forward per backward "
                             "and the same number on every rank")
        mine = torch.tensor(micro if sum(micro) == size else [-1] * len(micro), dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        bad = [r for r, g in enumerate(gathered) if bool((g < 1).any())]
        if not bad and len({int(v) for g in gathered for v in g}) > 1:
            raise ValueError(f"record: step {self.steps}: micro-batches of sizes {[g.tolist() for g in gathered]}; every rank's micro-"
                             "batches are replayed one by one (dropout or autocast), each weighted by its share of the world batch, "
                             "which is how training weighed them only for one size")
        if bad:
            raise ValueError(f"record: step {self.steps}: the training forwards of ranks {bad} (here of {micro} samples) do not split their {size} samples into "
                             "micro-batches (call the model once per micro-batch with the batch as its first argument); every rank's "
                             "micro-batches are replayed one by one (dropout or autocast)")
        return torch.cat(gathered).tolist()

    def _reduced_gradient_norms(self):
        """(norm of the gradients as DDP's all-reduce produced them, norm of the gradients now); None when no
        all-reduce ran since the last record()."""
        if not self._bucket_sq:
            return None
        reduced = sum(self._bucket_sq.values()) ** 0.5
        now = sum(float(p.grad.double().pow(2).sum()) for p in self.params if p.grad is not None) ** 0.5
        self._bucket_sq = {}
        return reduced, now

    def _rebaseline(self):
        # the recorder took each gradient's norm as backward left it (this rank's own); after DDP's all-reduce the
        # gradients it records are the averaged ones, whose norms the comm hook measured: they become its baseline
        norms = {p: self._reduced_norms[id(p)] for p in self.params if id(p) in self._reduced_norms}
        clip_norms = {p: self._reduced_clip_norms[id(p)] for p in self.params if id(p) in self._reduced_clip_norms}
        self.recorder.rebase_gradients(norms, clip_norms)
        self._reduced_norms, self._reduced_clip_norms = {}, {}

    def finish(self, train_set, loss_fn, **finish_options):
        """The GradientHistory (rank 0) or None (other ranks). Not collective: rank 0 computes alone."""
        if self.recorder is None:
            return None
        history = self.recorder.finish(train_set, loss_fn, **finish_options)
        history.meta["distributed"] = self._meta()
        return history

    def _meta(self):
        return {"world_size": self.world_size, "backend": self.backend, "recording_rank": 0}


def _gather_rng(rng, device, world_size, group):
    """Every rank's generator state of this step in rank order (a collective): its own `rng`, taken at the step's first
    training forward, or the state now where there was none (no training forward: no masks drawn, any state will do)."""
    mine = rng if rng is not None else rng_state(device)
    states = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(states, mine, group=group)
    return states


class _ForwardTaker:
    """Forward pre-hooks of a DDP model's module for the DistributedRecorder that now records the model: at each training
    forward the batch size (the module's pre-hook: its first positional argument, else its first tensor keyword
    argument, as HistoryRecorder reads it) and, at the step's first, the generator's state where the module has dropout;
    whether a parameter-owning submodule ran under autocast (`inner`)."""

    recorder = None

    def __call__(self, module, args, kwargs):
        rec = self.recorder
        if rec is None or not module.training or not torch.is_grad_enabled():
            return
        if rec._keep_states and rec._rng is None:
            rec._rng = rng_state(rec.params[0].device)
        # the batch: the first positional argument, else the first tensor keyword argument (input_ids=...); a call with
        # another first argument counts as none (-1): Lightning redirects DDP's call, (batch, batch_idx), to
        # training_step, which calls the module again on x (record() drops such calls where the others give the sizes)
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        rec._micro.append(int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else -1)

    def backward(self, i, param):
        if self.recorder is not None:
            self.recorder._passes[i] += 1

    def inner(self, module, args):
        rec = self.recorder
        if rec is not None and module.training and torch.is_grad_enabled() and torch.is_autocast_enabled(rec.params[0].device.type):
            rec._autocast = True


def recorded_world_size(history):
    """The number of processes a history was recorded with (1 for a history without distributed metadata)."""
    return int(history.meta.get("distributed", {}).get("world_size", 1))


def check_world_size(history, world_size=None):
    """ValueError unless history was recorded with `world_size` processes (default: the current torch.distributed
    world size, 1 when it is not initialised). A DDP replay reproduces the run only with the same number of ranks,
    each taking its share of every world batch."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    recorded = recorded_world_size(history)
    if recorded != world_size:
        raise ValueError(f"history: recorded with world size {recorded}, used under world size {world_size}; a distributed replay "
                         f"needs the same number of ranks (a single-process replay, method='retrain' without DDP, takes any history)")


def refuse_sharded(model, who):
    """ValueError naming FSDP when model is sharded by FSDP2 (fully_shard) or holds DTensor parameters: each rank then
    holds only shards of the parameters and gradients, which the recorder (one flat vector of the whole model on one
    rank) and the replay cannot use."""
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    fsdp = _fsdp_module_class()
    sharded = [name for name, p in module.named_parameters() if _is_dtensor(p)]
    if (fsdp is not None and any(isinstance(m, fsdp) for m in module.modules())) or sharded:
        what = f"parameter {sharded[0]} is a DTensor" if sharded else "it is an FSDPModule"
        raise ValueError(
            f"{who}: model is sharded by FSDP2 (torch.distributed.fsdp.fully_shard; {what}): each rank holds only shards of "
            "the parameters and gradients: record it with ShardedRecorder (one shard history per rank) and replay it with "
            "run_sharded / unlearn_sharded, or gather_shards() the rank histories into a single-process history"
        )


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # an older torch without FSDP2
        return None
    return FSDPModule


def _is_dtensor(tensor):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _check_same_request(history, forget, group, world_size):
    """Every rank must replay the same history for the same forget set: otherwise they would skip different steps
    and wait in different collectives (a hang). Gathers a fingerprint of both; every rank raises on a mismatch."""
    f = forget.to(torch.int64)
    lengths = torch.tensor([len(b) for b in history.schedule["batches"]], dtype=torch.int64)
    mine = torch.tensor([
        f.numel(), int((f * 2654435761 % 1000003).sum()), int(f.sum()),
        lengths.numel(), int(lengths.sum()), history.meta.get("n_train", -1),  # (none in a recording that did not finish)
        int(torch.as_tensor(history.schedule["batches"][0]).sum()) if lengths.numel() else 0,
    ], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group=group)
    differ = [r for r in range(world_size) if not torch.equal(every[r], every[0])]
    if differ:
        raise ValueError(f"distributed retrain: ranks {differ} replay another history or forget set than rank 0 (forget sizes "
                         f"{[int(e[0]) for e in every]}); every rank must pass the same history and forget")


def _rank_steps(history, keep, rank, world_size, optimizer, progress):
    """(t, this rank's slice of step t's world batch, its retained samples, the world batch's retained count) for every
    recorded step whose world batch keeps a sample (the count is the same on every rank: no communication), with the
    optimizer's learning rates set to step t's."""
    for t, batch in enumerate(history.schedule["batches"]):
        batch = torch.as_tensor(batch, dtype=torch.int64)
        if progress is not None:
            progress.update(1)
        if batch.numel() % world_size:
            raise ValueError(f"history: step {t}'s world batch has {batch.numel()} samples, not a multiple of world size {world_size}; "
                             "it was not recorded with this many ranks")
        per_rank = batch.numel() // world_size
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        retained = int(keep[batch].sum())
        if retained == 0:
            continue
        set_step_settings(optimizer, *history.step_settings(t))
        yield t, mine, mine[keep[mine]], retained


def run(model, history, forget, train_set, loss_fn, group=None, progress=None):
    """method="retrain" under DDP, called on every rank of `group` (a collective): replays the recorded schedule
    from w0 without `forget` (a sorted int64 tensor, the same on every rank). Rank r computes the mean-loss gradient
    of its part of each world batch (positions r*B/W .. (r+1)*B/W, the indices it trained on) over its retained
    samples, scales it by its share of the retained world batch, and the ranks all-reduce (sum) it: the gradient of
    the mean loss over the retained world batch. The share counts what loss_fn averages over: the samples, or where
    loss_fn has count_items(targets) (a Hugging Face Trainer's label tokens: hf.TrainerLoss) those items, summed over
    the ranks (one more all-reduce a step). Then, as training did after DDP's all-reduce, the recorded clipping
    (clip_grad_norm_ at meta["recording"]["clip_max_norm"]) and the optimizer step; forwards run under the recorded
    autocast, each rank's dropout drawn from its recorded generator state. A step whose world batch is all forgotten
    is skipped on every rank, as in the single-process replay. A history recorded with a GradScaler is refused (the
    single-process retrain replays it). model: the module (its parameters are overwritten) or the DDP wrapper (its
    .module is used, DDP's own hooks are bypassed). Returns (module, stats) like methods.retrain.run."""
    from ..history import fetch, restore_buffers, set_flat_params
    from ..methods._common import (batch_loss, check_history, clip, clip_max_norm, replay_autocast, replay_modes, replay_rng,
                                   step_micro_sizes)
    from ..methods.retrain import build_optimizer

    world_size, rank = _world(group, "distributed retrain")
    refuse_sharded(model, "distributed retrain")
    forget = torch.as_tensor(forget, dtype=torch.int64)
    _check_same_request(history, forget, group, world_size)  # before the checks below: one failing on one rank only would leave the others waiting
    check_world_size(history, world_size)
    module = _unwrap(model)
    check_history(history, module, forget, train_set, "retrain")
    if ((history.meta.get("recording") or {}).get("grad_scaler") or {}).get("scales"):
        raise ValueError("distributed retrain: the history was recorded with a GradScaler, whose per-step scales this replay does not "
                         "reproduce; replay it in one process (uf.unlearn with method='retrain')")
    set_flat_params(module, history.schedule["w0"])
    restore_buffers(module, history.schedule.get("buffers0"))
    optimizer = build_optimizer(module, history.meta)
    params = [p for p in module.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    keep = torch.ones(history.n_train, dtype=torch.bool)
    keep[forget] = False
    count, max_norm = getattr(loss_fn, "count_items", None), clip_max_norm(history)
    micro_sizes = step_micro_sizes(history)
    evals = steps = 0
    for t, mine, part, retained in _rank_steps(history, keep, rank, world_size, optimizer, progress):
        optimizer.zero_grad(set_to_none=True)
        # this rank's micro-batches where the step accumulated and each forward was its own (dropout, autocast), in order
        micro = [part]
        if micro_sizes[t] is not None:
            step_sizes, per = micro_sizes[t], len(micro_sizes[t]) // world_size
            if len(step_sizes) % world_size or sum(step_sizes[rank * per:(rank + 1) * per]) != mine.numel():
                raise ValueError(f"history: step {t}'s micro-batches {step_sizes[:8]} are not {world_size} ranks' parts of its world batch")
            micro = [m[keep[m]] for m in torch.split(mine, step_sizes[rank * per:(rank + 1) * per])]
        batches = [fetch(train_set, m) if m.numel() else None for m in micro]
        # each forward's share of the retained world batch: its samples, or where loss_fn counts them (a Hugging Face
        # Trainer's label tokens) its items over the world's (every rank joins the all-reduce, one without retained
        # samples with 0 items)
        shares = [m.numel() / retained for m in micro]
        if callable(count):
            items = [float(count(b[1])) if b is not None else 0.0 for b in batches]
            total = torch.tensor([sum(items)], dtype=torch.float64)
            dist.all_reduce(total, group=group)
            shares = [i / max(float(total), 1.0) for i in items]
        with replay_rng(history, t, module) as draw_part, replay_modes(history, module):
            draw_part(rank, world_size)  # (this rank's masks, where the history keeps each rank's generator state)
            for batch, share in zip(batches, shares):
                if batch is None:
                    continue
                with replay_autocast(history, module):
                    loss = batch_loss(module, loss_fn, batch)
                # scaled before backward, as training scaled its loss (and as the single-process replay does): under
                # autocast the bfloat16 products of backward round the scaled gradient, not the unscaled one
                (loss * share).backward()
        # one buffer: the scaled gradients, then one flag per parameter (reached by backward on this rank)
        flat = torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                         + [torch.tensor([float(p.grad is not None) for p in params], dtype=params[0].dtype)])
        dist.all_reduce(flat, group=group)
        grads, reached = flat[: sum(sizes)].split(sizes), flat[sum(sizes):]
        for p, g, r in zip(params, grads, reached.tolist()):
            # a parameter no rank's backward reached keeps grad None (the optimizer skips it, as in a single process)
            p.grad = g.view_as(p).clone() if r > 0 else None
        clip(module, max_norm)
        optimizer.step()
        evals += part.numel()
        steps += 1
    return module, {"steps": steps, "gradient_evaluations": evals, "world_size": world_size, "rank": rank,
                    "history_bytes_read": history.nbytes("schedule")}


def unlearn(model, history, forget, train_set, loss_fn, group=None, allow_unrecorded_model=False, progress=None):
    """uf.unlearn(..., method="retrain") run by every rank of a DDP job with the world size the history was recorded
    with; returns the same UnlearnResult on every rank (its .model a plain module, the caller's model untouched).
    model: the trained DDP model or its .module. The request checks are uf.unlearn's (forget, the model's binding to
    the history, earlier requests) and the request is logged in every rank's copy of history.requests (save it on
    one rank)."""
    from ..unlearn import UnlearnResult, bind_request, check_forget, non_finite_parameters

    _world(group, "distributed retrain")
    refuse_sharded(model, "distributed retrain")
    check_world_size(history, dist.get_world_size(group))
    module = _unwrap(model)
    forget = check_forget(forget, len(train_set))
    history.check_model(module)
    forget, _ = bind_request(module, history, forget, allow_unrecorded_model)
    if forget.numel() >= len(train_set):
        raise ValueError("forget: with the earlier requests this model served it names the whole training set; nothing would remain")
    start = time.perf_counter()
    new_model = copy.deepcopy(module)
    if forget.numel() == 0:
        return UnlearnResult(new_model, time.perf_counter() - start, {"method": "retrain", "forgotten": 0})
    new_model, stats = run(new_model, history, forget, train_set, loss_fn, group=group, progress=progress)
    seconds = time.perf_counter() - start
    bad = non_finite_parameters(new_model)  # the same on every rank: every rank raises
    if bad:
        raise RuntimeError(f"retrain: the unlearned parameters {bad[:5]} are NaN or infinite; no model is returned")
    from ..history import weights_digest

    history.append_request(forget.tolist(), "retrain", weights_digest(new_model))
    return UnlearnResult(new_model, seconds, {"method": "retrain", **stats, "forgotten_total": forget.numel()})


class _Reduction:
    """The comm hook's state: the group, and the DistributedRecorder that receives the measured norms."""

    def __init__(self, group):
        self.group, self.recorder = group, None


def _allreduce_measuring(state, bucket):
    """DDP's default reduction (divide by world size, then sum over ranks), keeping the squared norm of the result
    per bucket in the recorder's _bucket_sq: the norm of the averaged gradient as DDP hands it to the parameters."""
    group = state.group if state.group is not None else dist.group.WORLD
    tensor = bucket.buffer()
    tensor.div_(dist.get_world_size(group))
    future = dist.all_reduce(tensor, group=group, async_op=True).get_future()

    def measured(fut):
        # runs on a gloo worker thread, concurrently with other buckets' callbacks: compute, then store under this
        # bucket's own keys (single dict assignments)
        reduced, recorder = fut.value()[0], state.recorder
        square = float(reduced.double().pow(2).sum())
        pairs = list(zip(bucket.parameters(), bucket.gradients()))
        recorder._reduced_norms.update({id(p): gradient_norm(g.detach()).clone() for p, g in pairs})
        recorder._reduced_clip_norms.update({id(p): torch.linalg.vector_norm(g.detach()).clone() for p, g in pairs})
        recorder._bucket_sq[bucket.index()] = square
        return reduced

    return future.then(measured)


# ----------------------------------------------------------------------------- FSDP2: one shard history per rank
# Each rank records the local shards of its parameters and gradients (after FSDP2's reduce-scatter: the shards of the
# world batch's mean gradient) and the world batch of every step (all ranks' indices, gathered in rank order, the same
# on every rank: each rank's history is complete on its own). A shard history's param_spec names its parameters with
# SHARD_MARK, so that uf.unlearn and the single-process methods, which need whole parameters, refuse it naming FSDP2;
# gather_shards() turns the W rank histories into one single-process history.
SHARD_MARK = " [FSDP2 shard {rank} of {world}]"


def _trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _local(p):
    """The rank's own shard of a DTensor parameter or gradient (a plain tensor sharing its storage)."""
    return p.to_local() if _is_dtensor(p) else p


def sharding_of(model, who="sharding"):
    """Per trainable parameter of an FSDP2 model: its name, global and local shapes, the offset of the local shard in
    the global tensor, its placements, dtype, and the mesh. Only 1-D meshes with Shard(dim) placements (plain FSDP2)
    are supported: HSDP (2-D mesh) and tensor parallelism are refused by name."""
    shards, mesh = [], None
    for name, p in _trainable(model):
        if not _is_dtensor(p):
            raise ValueError(f"{who}: parameter {name} is not a DTensor; the model must be sharded by FSDP2 (fully_shard) as a whole")
        placements = list(p.placements)
        if p.device_mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard():
            raise ValueError(f"{who}: parameter {name} has placements {placements} on a {p.device_mesh.ndim}-D mesh; only FSDP2 on a 1-D mesh "
                             "(one Shard(dim) placement: no HSDP, no tensor parallelism) is supported")
        this = {"device_type": p.device_mesh.device_type, "ranks": p.device_mesh.mesh.flatten().tolist()}
        if mesh is None:
            mesh = this
        elif this != mesh:
            raise ValueError(f"{who}: parameter {name} lives on mesh {this}, earlier ones on {mesh}; one mesh for the whole model is supported")
        dim, size, coord = placements[0].dim, p.device_mesh.size(), p.device_mesh.get_local_rank()
        # torch.chunk's split, which Shard(dim) uses: ceil(n / size) rows per rank, the last ranks' shards shorter or empty
        n = p.shape[dim]
        step = -(-n // size)
        start = min(coord * step, n)
        local_shape, offset = list(p.shape), [0] * p.dim()
        local_shape[dim], offset[dim] = min(start + step, n) - start, start
        if list(p.to_local().shape) != local_shape:
            raise ValueError(f"{who}: parameter {name}'s local shard has shape {list(p.to_local().shape)}, expected {local_shape} for "
                             f"{placements[0]} of {list(p.shape)} over {size} ranks (an uneven layout this recorder does not know)")
        shards.append({"name": name, "global_shape": list(p.shape), "local_shape": local_shape, "offset": offset,
                       "placements": [repr(pl) for pl in placements], "dtype": str(p.dtype).replace("torch.", "")})
    if not shards:
        raise ValueError(f"{who}: model has no trainable parameters")
    return {"mesh": mesh, "shards": shards}


def _local_flat(model):
    return torch.cat([_local(p).detach().reshape(-1) for _, p in _trainable(model)])


def _digest(tensors):
    """uf's weights digest (history.weights_digest) of a list of tensors, as if they were a model's parameters."""
    from ..history import weights_digest

    return weights_digest(torch.nn.ParameterList([torch.nn.Parameter(t.detach(), requires_grad=True) for t in tensors]))


def _fsdp_root(model, who):
    fsdp = _fsdp_module_class()
    if fsdp is None or not isinstance(model, fsdp):
        raise ValueError(f"{who}: model must be the root module sharded by FSDP2 (torch.distributed.fsdp.fully_shard(model)), "
                         f"got {type(model).__name__}")


class ShardedRecorder:
    """Records an FSDP2 (fully_shard) training run: every rank a GradientHistory of its own shards.

        model = fully_shard(net); rec = ShardedRecorder(model, optimizer)        # every rank
        for indices, x, y in loader:                  # DistributedSampler, drop_last: equal batch sizes on every rank
            optimizer.zero_grad(); loss_fn(model(x), y).backward()
            rec.record(indices)                       # every rank (a collective), after backward, before step()
            optimizer.step()
        history = rec.finish(train_set); save_sharded(history, "history/")   # history/rank-<r> on every rank

    The history holds the rank's shards of g_t (kind="full": the reduce-scattered gradient, i.e. the shard of
    the world batch's mean gradient), the world batches (every rank's indices in rank order; every rank stores the
    same schedule) and meta["distributed"]: world size, rank, backend, the mesh, per parameter its global and local
    shapes, shard offset and placements, and an id of the run shared by its ranks. Replay: run_sharded /
    unlearn_sharded under the same sharding; gather_shards() builds the single-process history.

    path: stream each rank's shard history to path/rank-<r> while training (HistoryRecorder's chunked store: rows
    sealed in chunks of about CHUNK_BYTES, appended by a background writer; a kill keeps every appended chunk), so
    a rank holds a few chunks of rows instead of the whole trajectory; flush() (collective) marks a point that
    ShardedRecorder.resume continues from after a trainer checkpoint saved there."""

    def __init__(self, model, optimizer, policy=None, group=None, path=None):
        from ..history import CHUNK_BYTES, CHUNK_STEPS, HistoryPolicy, row_bytes
        from ..recording import InertWhenCopied, RowEncoder, _jsonable, real_optimizer

        who = "ShardedRecorder"
        self.group = group
        self.world_size, self.rank = _world(group, who)
        _fsdp_root(model, who)
        self.policy = policy or HistoryPolicy(kind="full")
        if self.policy.kind != "full":
            raise ValueError(f"{who}: policy kind {self.policy.kind!r} is not supported for FSDP2 shard histories (Mini's summary needs "
                             "the whole parameters and only a single-process kind='minimal' recording computes it); record kind='full'")
        optimizer = real_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"{who}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.sharding = sharding_of(model, who)
        named = _trainable(model)
        self.params = [p for _, p in named]
        if self.sharding["mesh"]["ranks"] != list(range(self.world_size)):
            raise ValueError(f"{who}: the model's mesh spans ranks {self.sharding['mesh']['ranks']}, the process group {self.world_size} ranks; "
                             "the mesh must be the whole group in rank order")
        check_recordable(named, optimizer, who)
        check_dense_gradients(model, who)  # (FSDP2's reduce-scatter crashed on a sparse gradient inside backward before)
        self.group_of_param = [next(i for i, g in enumerate(optimizer.param_groups) if any(q is p for q in g["params"])) for p in self.params]
        self._settings = StepSettings(optimizer)
        # one id for the run, rank 0's: the replay refuses rank histories of different runs mixed together
        run_id = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(run_id, src=_src(group), group=group)
        local_spec = [(s["name"] + SHARD_MARK.format(rank=self.rank, world=self.world_size), s["local_shape"], s["dtype"]) for s in self.sharding["shards"]]
        self.meta = {
            "policy": dataclasses.asdict(self.policy),
            "param_spec": local_spec,
            "optimizer": {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
                          "groups": _jsonable([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])},
            "group_of_param": self.group_of_param,
            "distributed": {"world_size": self.world_size, "rank": self.rank, "backend": str(dist.get_backend(group)),
                            "sharding": "fsdp2", "run": run_id[0], **self.sharding},
        }
        self.w0 = _local_flat(model).clone()
        self.steps, self.batches, self.lrs, self.momenta = 0, [], [], []  # batches, lrs, momenta: in memory only without a path (on disk with one)
        self._top = -1  # the largest recorded sample index (finish checks it against train_set)
        # the rows of a step go straight into the open chunk's buffers, through the policy's codec (RowEncoder: byte for
        # byte EncodedRows.encode of the flat local shards); a sealed chunk is kept (no path) or handed to the writer
        c, bs, p = self.policy.codec, self.policy.blocksize, self.w0.numel()
        self._encoder = RowEncoder([_local(q).numel() for q in self.params], c, bs, self.w0.dtype)
        self.chunk_steps = max(1, min(CHUNK_STEPS, CHUNK_BYTES // max(row_bytes(c, p, bs, self.w0.dtype), 1)))
        self._open, self._chunks = _new_shard_chunk(), []
        self.path, self.recording_id, self._writer = None, None, None
        # what FSDP2's post-accumulate-grad hooks saw since the last step: it calls them on the sharded parameter once
        # its reduce-scattered gradient is in place, so their norms are the baseline a later edit (clipping) is measured against
        self._passes, self._norms = [0] * len(self.params), [None] * len(self.params)
        self._recorded, self._unrecorded_step, self._steps_taken, self._autocast, self._finished = False, None, 0, False, False
        # dropout: as DistributedRecorder, every rank's generator state at the step's first training forward, gathered
        # in rank order; every shard history keeps them all (run_sharded draws its own, gather_shards' replay every rank's)
        self._keep_states = bool(random_layers(model))
        self._rng, self.rng_rows = None, []  # rng_rows: in memory only without a path (on disk with one)
        self._eval_modules = None  # the modules in eval mode when step 0 was recorded (the replay runs them so)
        if path is not None:
            self._start_stream(path)
        self._handles = [p.register_post_accumulate_grad_hook(InertWhenCopied(functools.partial(self._on_grad, i))) for i, p in enumerate(self.params)]
        self._handles += [optimizer.register_step_pre_hook(InertWhenCopied(self._before_step)),
                          optimizer.register_step_post_hook(InertWhenCopied(self._after_step)),
                          model.register_forward_pre_hook(InertWhenCopied(self._on_forward))]

    def _start_stream(self, path):
        """This rank's shard history streamed to path/rank-<rank>: a head holding w0 now (store.write, the layout of
        HistoryRecorder's streamed recordings), then the chunks (_ChunkWriter: store.append_chunk)."""
        from .. import store
        from ..history import EncodedRows
        from ..recording import _ChunkWriter

        mine = _rank_dir(path, self.rank)
        # decided on every rank alike: a rank refusing alone would leave the others waiting in record()'s collectives
        _agree(self.group, self.world_size, lambda: _refuse_existing(mine), "ShardedRecorder")
        self.recording_id = uuid.uuid4().hex
        p, c, bs = self.w0.numel(), self.policy.codec, self.policy.blocksize
        info = {"meta": self.meta, "encoded": {"trajectory.g": EncodedRows({}, c, bs, p, self.w0.dtype).meta()}, "recording": self.recording_id}
        _agree(self.group, self.world_size, lambda: store.write(mine, "GradientHistory", info, {"schedule.w0": self.w0}), "ShardedRecorder")
        self.path = mine
        self._writer = _ChunkWriter(mine, self.recording_id)

    def _on_grad(self, i, p):
        self._passes[i] += 1
        self._norms[i] = float(gradient_norm(_local(p.grad).detach()))

    def _on_forward(self, module, args):
        if module.training and torch.is_grad_enabled():
            device = _local(self.params[0]).device
            if torch.is_autocast_enabled(device.type):
                self._autocast = True
            if self._keep_states and self._rng is None:
                self._rng = rng_state(device)

    def _before_step(self, optimizer, args, kwargs):
        if not self._recorded and self._unrecorded_step is None:
            self._unrecorded_step = self._steps_taken

    def _after_step(self, optimizer, args, kwargs):
        self._steps_taken += 1
        self._recorded, self._autocast, self._rng = False, False, None
        self._passes, self._norms = [0] * len(self.params), [None] * len(self.params)

    def record(self, batch_indices):
        """Record the coming optimizer step; batch_indices: this rank's sample indices. Collective: every rank calls it
        at every step; a refusal is decided from one all-gather, so every rank raises the same error."""
        if self._finished:
            raise ValueError("record: the recorder is finished")
        local = torch.as_tensor(batch_indices)
        if local.dtype.is_floating_point or local.dtype == torch.bool or local.dim() != 1:
            raise ValueError(f"record: batch_indices must be this rank's 1-D integer sample indices, got {local.dtype} of shape {tuple(local.shape)}")
        local = local.to("cpu", torch.int64)
        grads = [p.grad for p in self.params]
        missing = max(self._passes) == 0
        # a parameter without a gradient (an unused head, a branch not taken): torch.optim skips it, which HistoryRecorder
        # notes (meta["recording"]["grad_none"]) but a shard history does not: refused, naming it (1 + its position)
        without_grad = next((i + 1 for i, g in enumerate(grads) if g is None), 0)
        edited = False
        if not missing and not without_grad:
            now = [float(gradient_norm(_local(g).detach())) for g in grads]
            edited = any(b is not None and abs(a - b) > 1e-6 * max(b, 1e-30) for a, b in zip(now, self._norms))
        writer_failed = self._writer is not None and self._writer.error is not None
        eval_modules = [name for name, m in self.model.named_modules() if not m.training]
        modes_changed = self._eval_modules is not None and eval_modules != self._eval_modules
        # per rank: batch size, no backward, edited, accumulation, autocast, a step without record(), a second record(),
        # its background writer failed, train / eval modes other than at step 0, 1 + the first parameter without a gradient
        flags = [local.numel(), int(missing), int(edited), int(max(self._passes) > 1), int(self._autocast),
                 int(self._unrecorded_step is not None), int(self._recorded), int(writer_failed), int(modes_changed), without_grad]
        info = [torch.zeros(len(flags), dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(info, torch.tensor(flags, dtype=torch.int64), group=self.group)
        on = lambda k: [r for r, i in enumerate(info) if int(i[k])]  # noqa: E731
        sizes = [int(i[0]) for i in info]
        step = self.steps
        if on(7):
            raise RuntimeError(f"record: the background writer of the shard history failed on ranks {on(7)}"
                               + (f" (here: {self._writer.error})" if writer_failed else "") + "; the history there holds the chunks "
                               "written before it")
        if on(6):
            raise ValueError(f"record: called twice for step {step - 1} (ranks {on(6)}), before optimizer.step() ran; call it once per optimizer step")
        if on(5):
            raise ValueError(f"record: an optimizer step ran without a record() before it (ranks {on(5)}); call record() at every step")
        if len(set(sizes)) != 1:
            raise ValueError(f"record: step {step} has per-rank batch sizes {sizes}; FSDP2 averages the ranks' mean gradients, which equals the "
                             "world batch's mean gradient (what the replay computes) only for equal sizes. Use drop_last=True")
        if on(1):
            raise ValueError(f"record: step {step}: no backward reached the model on ranks {on(1)} since the last step; call record() after backward")
        if on(9):
            name = self.sharding["shards"][min(int(info[r][9]) for r in on(9)) - 1]["name"]  # (the same on every rank)
            raise ValueError(f"record: step {step}: parameter {name!r} has no gradient (.grad is None) on ranks {on(9)}: no backward reached it "
                             "(an unused head, a branch not taken), or zero_grad() ran before record(); torch.optim skips such a parameter, "
                             "which FSDP2 shard histories do not record. Freeze it (requires_grad=False) or remove it before creating the "
                             "ShardedRecorder, or call record() before zero_grad(); history not extended")
        if on(3):
            raise ValueError(f"record: step {step} accumulated gradients of several backward passes (ranks {on(3)}): gradient accumulation is "
                             "not supported for FSDP2 shard histories")
        if on(4):
            raise ValueError(f"record: step {step} ran its forward under autocast (ranks {on(4)}): not supported for FSDP2 shard histories")
        if on(2):
            raise ValueError(f"record: step {step}'s gradients changed after FSDP2's reduce-scatter on ranks {on(2)}: gradient clipping? The "
                             "replay computes unclipped gradients; clipping is not supported for FSDP2 shard histories")
        if on(8):
            raise ValueError(f"record: step {step}: modules are in other train / eval modes than at step 0 (ranks {on(8)}); the replay runs "
                             "every step in one set of modes (call model.train() / .eval() as on the first step)")
        if self._eval_modules is None:
            self._eval_modules = eval_modules
        gathered = [torch.empty(sizes[0], dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        world = torch.cat(gathered)
        if world.numel() == 0 or bool((world < 0).any()) or torch.unique(world).numel() != world.numel():
            raise ValueError(f"record: step {step}'s world batch must be non-empty, distinct, non-negative sample indices")
        self._settings.check(step)  # (every rank's optimizer runs the same scheduler: all raise or none)
        chunk = self._open
        if self._keep_states:
            chunk["rng"].append(torch.cat(_gather_rng(self._rng, _local(self.params[0]).device, self.world_size, self.group)))
            if self.path is None:
                self.rng_rows.append(chunk["rng"][-1])
        row = len(chunk["lrs"])
        if chunk["g"] is None:
            chunk["g"] = self._row_buffers()
        self._encoder.encode_into([_local(g).detach() for g in grads], chunk["g"], row)  # (w_t is rebuilt from w0 and the g rows: methods/trajectory.py)
        lrs, momenta = self._settings.now()
        chunk["lrs"].append(lrs)
        chunk["momenta"].append(momenta)
        chunk["indices"].append(world)
        if self.path is None:
            self.batches.append(world)
            self.lrs.append(lrs)
            self.momenta.append(momenta)
        self._top = max(self._top, int(world.max()))
        self.steps += 1
        self._recorded = True
        if row + 1 >= self.chunk_steps:
            self._seal()
        return world

    def _row_buffers(self):
        return chunk_row_buffers(self._encoder, self._writer, self.chunk_steps, self.w0.device)

    def _seal(self, mark=None):
        """Close the open chunk: kept in memory (no path), or appended to path by the writer with its resume mark."""
        from ..history import EncodedRows, compact_indices

        chunk = self._open
        n = len(chunk["lrs"])
        if n == 0 and mark is None:
            return
        self._open = _new_shard_chunk()
        schedule = {
            "schedule.lrs": torch.tensor(chunk["lrs"], dtype=torch.float64).reshape(n, len(self.optimizer.param_groups)),
            "schedule.batch_sizes": torch.tensor([b.numel() for b in chunk["indices"]], dtype=torch.int32),
            "schedule.micro_counts": torch.ones(n, dtype=torch.int32),  # (no gradient accumulation: one micro-batch a step)
            "schedule.micro_sizes": torch.zeros(0, dtype=torch.int32),
            "schedule.batch_indices": compact_indices(torch.cat(chunk["indices"]) if n else torch.zeros(0, dtype=torch.int64)),
        }
        if self._settings.cycled:  # (GradientHistory drops them where they stayed as meta records them)
            schedule["schedule.momenta"] = torch.tensor(chunk["momenta"], dtype=torch.float64).reshape(n, len(self.optimizer.param_groups))
        if self._keep_states:
            width = rng_state(_local(self.params[0]).device).numel() * self.world_size
            schedule["schedule.rng_states"] = torch.stack(chunk["rng"]) if n else torch.zeros(0, width, dtype=torch.uint8)
        rows = {}
        if n:
            tensors = {name: t[:n] for name, t in chunk["g"].items()}
            if self.path is None and n < self.chunk_steps:  # sealed early (finish): only its rows kept
                tensors = {name: t.clone() for name, t in tensors.items()}
            rows["g"] = EncodedRows(tensors, self.policy.codec, self.policy.blocksize, self.w0.numel(), self.w0.dtype)
        if self.path is None:
            if n:
                self._chunks.append((n, rows))
            return
        parts = {"schedule": schedule}
        if rows:
            parts["rows"] = {f"trajectory.{key}.{name}": t for key, r in rows.items() for name, t in r.tensors.items()}
        # the row buffers come back to _row_buffers once written
        self._writer.put((n, parts, mark, chunk["g"]))

    def flush(self):
        """Make every recorded step durable at path/rank-<r> and mark this point with the digest of the rank's local
        shards, so that ShardedRecorder.resume can continue from a trainer checkpoint saved now (call it on every rank
        when the trainer saves one, after optimizer.step()). Collective: every rank returns once its chunk is written,
        or every rank raises. Without a path: only the checks."""

        def flushed():
            if self._finished:
                raise ValueError("flush: the recorder is finished")
            if self._recorded:
                raise ValueError(f"flush: step {self.steps - 1} was recorded but optimizer.step() did not run after it; flush after the step")
            if self._unrecorded_step is not None:
                raise ValueError(f"flush: optimizer step {self._unrecorded_step} ran without a record() before it; the history misses its update")
            if self.path is None:
                return
            self._seal(mark=_digest([_local(q) for q in self.params]))
            self._writer.join()
            if self._writer.error is not None:
                raise RuntimeError(f"flush: the background writer of {self.path!r} failed ({self._writer.error})")

        _agree(self.group, self.world_size, flushed, "flush")

    def close(self):
        """Stop recording without finishing (not collective): the hooks come off, a streamed recording's sealed chunks
        are written (the open chunk is dropped: flush() first to keep it) and resume() can continue it."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._finished = True

    def finish(self, train_set):
        """This rank's shard history (a GradientHistory; not collective). train_set: the training set the indices
        point into. Save it with save_sharded(history, path) on every rank; a streamed one is finished in place
        (path/rank-<r>, its rows stay on disk)."""
        from ..history import ChunkedRows, GradientHistory

        if self._finished or not self.steps:
            raise ValueError("finish: nothing was recorded" if not self.steps else "finish: the recorder is finished")
        if self._recorded:
            raise ValueError(f"finish: step {self.steps - 1} was recorded but optimizer.step() did not run after it")
        n_train = len(train_set)
        if self._top >= n_train:
            raise ValueError(f"finish: recorded batch index {self._top} is out of range for train_set of {n_train} samples")
        T, p = self.steps, self.w0.numel()
        final = _local_flat(self.model).clone()
        meta = dict(self.meta, n_train=n_train, recording={"allow": [], "accumulated_steps": 0, "clipped_steps": 0, "autocast_steps": 0,
                                                           "eval_modules": self._eval_modules or []},
                    final_digest=_digest([_local(q) for q in self.params]))
        self._seal()
        if self.path is None:
            schedule = {"w0": self.w0, "batches": list(self.batches), "lrs": torch.tensor(self.lrs, dtype=torch.float64).reshape(T, -1),
                        "micro_counts": torch.ones(T, dtype=torch.int64), "micro_sizes": torch.zeros(0, dtype=torch.int64)}
            if self._settings.cycled:
                schedule["momenta"] = torch.tensor(self.momenta, dtype=torch.float64).reshape(T, -1)
            if self._keep_states:
                schedule["rng_states"] = torch.stack(self.rng_rows)
            c, bs = self.policy.codec, self.policy.blocksize
            trajectory = {"g": ChunkedRows([(n, rows["g"]) for n, rows in self._chunks], c, bs, p, self.w0.dtype)}
            # the rank's final shards: gather_shards binds the single-process history to the whole trained model with them
            history = GradientHistory(meta, schedule, trajectory, {"w_final": final})
        else:
            self._writer.close()
            error, self._writer = self._writer.error, None
            if error is not None:
                raise RuntimeError(f"finish: the background writer of {self.path!r} failed ({error}); the history there holds the chunks "
                                   "written before it") from error
            history = GradientHistory.load(self.path)  # what was streamed: the rows stay on disk
            history.meta, history.summary = meta, {"w_final": final}
            history.save(self.path)  # the finished version: head rewritten, the streamed rows kept by reference
            history.recording_id = None  # (no longer a recording to resume)
        self.close()
        self._chunks, self.batches, self.lrs, self.momenta, self.rng_rows = [], [], [], [], []
        return history

    @classmethod
    def resume(cls, path, model, optimizer, group=None):
        """Continue a shard recording streamed to path (ShardedRecorder(..., path=path)) by a run that stopped (killed,
        or restarted from a trainer checkpoint): every rank calls it (a collective) with `model` and `optimizer`
        holding the state of a trainer checkpoint saved right after a flush() of that recording; each rank continues
        path/rank-<r> from that flush (the steps streamed after it are dropped: the trainer repeats them). ValueError
        on every rank, naming each rank's mismatch, unless every rank's directory is an unfinished recording of this
        world size, this rank, this sharding, one run (the same on every rank), and the model's local shards match
        one of its flush points (the same one on every rank); nothing is written then."""
        from .. import store
        from ..history import GradientHistory, HistoryPolicy
        from ..recording import _ChunkWriter, real_optimizer

        who = "ShardedRecorder.resume"
        world_size, rank = _world(group, who)
        _fsdp_root(model, who)
        mine = _rank_dir(path, rank)
        history, error, run, at = None, None, None, None
        try:
            history = GradientHistory.load(mine)
            if history.recording_id is None:
                raise ValueError(f"path: {mine!r} holds a finished history; there is no recording to resume")
            check_sharding(history, sharding_of(model, who), world_size, rank)
            run = history.meta["distributed"]["run"]
            recorded = history.meta["optimizer"]["class"]
            here = type(real_optimizer(optimizer))
            if recorded != f"{here.__module__}.{here.__qualname__}":
                raise ValueError(f"optimizer: the recording at {mine!r} was made with {recorded}, resumed with {here.__module__}.{here.__qualname__}")
            digest = _digest([_local(p) for _, p in _trainable(model)])
            marks = [j for j, mark in history.chunk_marks.items() if mark == digest]
            if not marks:
                raise ValueError(f"model: its local shards match none of the {len(history.chunk_marks)} flush points of the recording at "
                                 f"{mine!r}; resume from the trainer checkpoint saved together with a flush()")
            at = (marks[-1], sum(history.chunk_steps[: marks[-1] + 1]))
        except ValueError as err:
            error = str(err)
        every = [None] * world_size
        dist.all_gather_object(every, (error, run, at), group=group)
        problems = [f"rank {r}: {e}" for r, (e, _, _) in enumerate(every) if e is not None]
        runs = [r for r, (_, other, _) in enumerate(every) if other is not None and other != every[0][1]]
        if every[0][1] is not None and runs:
            problems.append(f"ranks {runs} hold the shard recording of another run than rank 0's (run ids differ): each rank must resume "
                            "its own directory of one recording")
        steps = sorted({a[1] for _, _, a in every if a is not None})
        if not problems and len(steps) > 1:
            problems.append(f"the ranks' local shards match flush points at different steps {steps}: restore every rank from one checkpoint")
        if problems:
            raise ValueError(f"{who}: refused (nothing was changed at {os.fspath(path)!r}): " + "; ".join(problems))
        policy = HistoryPolicy(**{k: v for k, v in history.meta["policy"].items() if k in HistoryPolicy.__dataclass_fields__})
        rec = cls(model, optimizer, policy, group)  # (a collective: every rank gets here)
        j, steps = at
        # the recording's own facts: its run id, optimizer groups and w0 (the checkpoint's state is a later one)
        rec.meta, rec.w0, rec.steps = history.meta, history.schedule["w0"].clone(), steps
        rec._top = max((int(b.max()) for b in history.schedule["batches"][:steps]), default=-1)
        store.truncate(mine, "GradientHistory", history.recording_id, j + 1)
        rec.path, rec.recording_id = mine, history.recording_id
        rec._writer = _ChunkWriter(mine, rec.recording_id)
        return rec


def _new_shard_chunk():
    # w, g: the chunk's row buffers (RowEncoder.buffers), from its first step on
    return {"lrs": [], "momenta": [], "indices": [], "rng": [], "g": None}


def _rank_dir(path, rank):
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: must be a str or os.PathLike naming a directory (one rank-<r> directory per rank in it), got {type(path).__name__}")
    return os.path.join(os.fspath(path), f"rank-{rank}")


def _refuse_existing(mine):
    from .. import store

    if os.path.lexists(os.path.join(mine, store.CURRENT)):
        raise ValueError(f"path: {mine!r} already holds a history; record to a new directory, or continue a stopped recording with "
                         "ShardedRecorder.resume(path, model, optimizer)")


def _agree(group, world_size, fn, who):
    """fn() on every rank; every rank's outcome is all-gathered and, where one failed, every rank raises (a ValueError
    with the error every rank met, or naming the failing ranks and their errors; a RuntimeError if one was not a
    ValueError), so that none goes on alone into a collective."""
    try:
        fn()
        mine = None
    except Exception as err:  # noqa: BLE001 (raised below, on every rank)
        mine = (isinstance(err, ValueError), str(err))
    every = [None] * world_size
    dist.all_gather_object(every, mine, group=group)
    failed = [(r, e) for r, e in enumerate(every) if e is not None]
    if failed:
        texts = {text for _, (_, text) in failed}
        # one error of every rank alike is raised as it is; else each failing rank's, named
        message = texts.pop() if len(failed) == world_size and len(texts) == 1 else f"{who}: " + "; ".join(f"rank {r}: {text}" for r, (_, text) in failed)
        raise (ValueError if all(v for _, (v, _) in failed) else RuntimeError)(message)


def _shard_meta(history, who="history"):
    d = history.meta.get("distributed", {})
    if d.get("sharding") != "fsdp2":
        raise ValueError(f"{who}: not an FSDP2 shard history (one recorded by ShardedRecorder); a history recorded under DDP or in one "
                         "process is replayed by ufd.run / uf.unlearn")
    return d


def save_sharded(history, path):
    """Save this rank's shard history under path/rank-<r> (r: the rank that recorded it). Returns that directory."""
    d = _shard_meta(history)
    return history.save(os.path.join(os.fspath(path), f"rank-{d['rank']}"))


def load_sharded(path, model=None, group=None):
    """This rank's shard history from path/rank-<rank> (saved by save_sharded, or streamed by ShardedRecorder(path=path):
    finished, or up to its last written chunk when the run stopped; such an unfinished one, `history.complete` False,
    is refused by the replay), checked against `model`'s sharding when given (check_sharding: ValueError naming the
    mismatch)."""
    from ..history import GradientHistory

    world_size, rank = _world(group, "load_sharded")
    history = GradientHistory.load(os.path.join(os.fspath(path), f"rank-{rank}"))
    check_sharding(history, sharding_of(model, "load_sharded") if model is not None else None, world_size, rank)
    return history


def check_sharding(history, sharding, world_size, rank):
    """ValueError naming the mismatch unless `history` is the shard history of `rank` in a run of `world_size` ranks
    with the sharding `sharding` (sharding_of(model); None: only world size and rank are checked)."""
    d = _shard_meta(history)
    if d["world_size"] != world_size:
        raise ValueError(f"history: FSDP2 shards recorded with world size {d['world_size']}, used under world size {world_size}; the shards "
                         "are replayed only by the same number of ranks (gather_shards() builds a single-process history)")
    if d["rank"] != rank:
        raise ValueError(f"history: holds the shards of rank {d['rank']}, used on rank {rank}; each rank loads its own (path/rank-<rank>)")
    if sharding is None:
        return
    if sharding["mesh"] != d["mesh"]:
        raise ValueError(f"history: recorded on mesh {d['mesh']}, the model is on mesh {sharding['mesh']}")
    names = ([s["name"] for s in d["shards"]], [s["name"] for s in sharding["shards"]])
    if names[0] != names[1]:
        raise ValueError(f"history: recorded for parameters {names[0]}, the model has {names[1]}")
    for rec, now in zip(d["shards"], sharding["shards"]):
        for key in ("global_shape", "dtype"):
            if rec[key] != now[key]:
                raise ValueError(f"history: recorded for another model (parameter {rec['name']}: {key} {rec[key]} recorded, {now[key]} here)")
        if any(rec[key] != now[key] for key in ("placements", "local_shape", "offset")):
            shard = lambda s: f"placements {s['placements']}, local shard {s['local_shape']} at offset {s['offset']}"  # noqa: E731
            raise ValueError(f"history: parameter {rec['name']} was sharded differently when recorded ({shard(rec)}) than in this model "
                             f"({shard(now)}); replay under the sharding it was recorded with")


def _check_same_run(history, group, world_size):
    """Every rank's shard history must come from the same recording (the run id rank 0 broadcast)."""
    mine = [_shard_meta(history)["run"]]
    every = [None] * world_size
    dist.all_gather_object(every, mine[0], group=group)
    differ = [r for r in range(world_size) if every[r] != every[0]]
    if differ:
        raise ValueError(f"FSDP2 retrain: ranks {differ} hold shard histories of another recording than rank 0's (run ids differ); "
                         "every rank must load its shards of the same run")


def run_sharded(model, history, forget, train_set, loss_fn, group=None, progress=None):
    """method="retrain" under FSDP2, on every rank (collective): `model` is a fully_shard'ed model with the sharding
    the history was recorded with (its parameters are overwritten: pass a fresh one), `history` this rank's shard
    history. From the recorded w0 shards, each step: rank r's part of the world batch without `forget` (n_r retained
    samples of the world batch's n), the mean loss scaled by W * n_r / n (FSDP2's reduce-scatter averages over the W
    ranks: the result is the shard of the retained world batch's mean gradient, what a single-process replay
    computes), a backward through the sharded model, and a step of the recorded torch.optim optimizer on the DTensor
    parameters. A rank with no retained sample runs a zero-weighted loss (it must join FSDP2's collectives); a step
    whose whole world batch is forgotten is skipped on every rank. Returns (model, stats)."""
    from ..history import fetch
    from ..methods._common import batch_loss, replay_modes, replay_rng
    from ..methods.retrain import build_optimizer

    world_size, rank = _world(group, "FSDP2 retrain")
    _fsdp_root(model, "FSDP2 retrain")
    forget = torch.as_tensor(forget, dtype=torch.int64)
    # collective checks first, identical on every rank: a failing local check on one rank only would leave the others waiting
    _check_same_request(history, forget, group, world_size)
    _check_same_run(history, group, world_size)
    # the local checks' outcome is gathered: a rank refusing alone would leave the others waiting in FSDP2's collectives
    try:
        if not history.complete:
            raise ValueError(f"history: its recording did not finish ({history.num_steps} steps were streamed to {history.path!r}); continue it "
                             "with ShardedRecorder.resume and finish() it")
        check_sharding(history, sharding_of(model, "FSDP2 retrain"), world_size, rank)
        if len(train_set) != history.n_train:
            raise ValueError(f"train_set: has {len(train_set)} samples, the history was recorded on a training set of {history.n_train}")
        if forget.numel() and (int(forget.min()) < 0 or int(forget.max()) >= history.n_train):
            raise ValueError(f"forget: indices must lie in [0, {history.n_train})")
        error = None
    except ValueError as err:
        error = str(err)
    errors = [None] * world_size
    dist.all_gather_object(errors, error, group=group)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise ValueError("FSDP2 retrain refused: " + "; ".join(f"rank {r}: {e}" for r, e in failed))
    params = [p for _, p in _trainable(model)]
    w0, offset = history.schedule["w0"], 0
    with torch.no_grad():
        for p in params:
            local = _local(p)
            local.copy_(w0[offset : offset + local.numel()].view_as(local))
            offset += local.numel()
    optimizer = build_optimizer(model, history.meta)
    keep = torch.ones(history.n_train, dtype=torch.bool)
    keep[forget] = False
    evals = steps = 0
    for t, mine, part, retained in _rank_steps(history, keep, rank, world_size, optimizer, progress):
        optimizer.zero_grad(set_to_none=True)
        with replay_rng(history, t, model) as draw_part, replay_modes(history, model):
            draw_part(rank, world_size)  # (this rank's dropout masks, where the history keeps each rank's generator state)
            if part.numel():
                (batch_loss(model, loss_fn, fetch(train_set, part)) * (world_size * part.numel() / retained)).backward()
            else:
                (batch_loss(model, loss_fn, fetch(train_set, mine[:1])) * 0.0).backward()
        optimizer.step()
        evals += part.numel()
        steps += 1
    return model, {"steps": steps, "gradient_evaluations": evals, "world_size": world_size, "rank": rank,
                   "history_bytes_read": history.nbytes("schedule")}


def unlearn_sharded(model, history, forget, train_set, loss_fn, replay_model, group=None, allow_unrecorded_model=False, progress=None):
    """uf.unlearn(..., method="retrain") for an FSDP2 run, on every rank: `model` the trained fully_shard'ed model (left
    untouched; checked against the history's binding: its local shards' digest), `replay_model` a fully_shard'ed
    model with the same sharding that receives the result (FSDP2 modules cannot be deep-copied). The request is
    logged in this rank's history (bound to the result's local shards)."""
    from ..unlearn import UnlearnResult, check_forget

    world_size, rank = _world(group, "FSDP2 retrain")
    forget = check_forget(forget, len(train_set))
    final = history.meta.get("final_digest")
    digest = _digest([_local(p) for _, p in _trainable(model)])
    served = [r["model_digest"] for r in history.requests]
    # which of the history's models this one is: the trained one, or one a logged request produced (forget their union)
    if digest == final:
        earlier = torch.zeros(0, dtype=torch.int64)
    elif digest in served:
        upto = served.index(digest)
        earlier = torch.tensor(sorted({i for r in history.requests[: upto + 1] for i in r["forget"]}), dtype=torch.int64)
    elif allow_unrecorded_model:
        earlier = torch.zeros(0, dtype=torch.int64)
    else:
        earlier = None
    # every rank must agree (a refusal on one rank only would leave the others waiting in run_sharded's collectives)
    unknown = [None] * world_size
    dist.all_gather_object(unknown, earlier is None, group=group)
    if any(unknown):
        raise ValueError(f"model: its shards on ranks {[r for r, u in enumerate(unknown) if u]} are neither the trained model's nor one a "
                         "logged request produced; pass the trained FSDP2 model (or allow_unrecorded_model=True)")
    forget = torch.unique(torch.cat([forget.to(torch.int64), earlier]))
    if forget.numel() >= len(train_set):  # the same on every rank (run_sharded checks that the requests agree)
        raise ValueError("forget: with the earlier requests this model served it names the whole training set; nothing would remain")
    start = time.perf_counter()
    replay_model, stats = run_sharded(replay_model, history, forget, train_set, loss_fn, group=group, progress=progress)
    seconds = time.perf_counter() - start
    bad = [name for name, p in _trainable(replay_model) if not bool(torch.isfinite(_local(p)).all())]
    every = [None] * world_size
    dist.all_gather_object(every, bad, group=group)  # every rank raises alike
    if any(every):
        raise RuntimeError(f"FSDP2 retrain: the unlearned parameters {sorted({n for b in every for n in b})[:5]} are NaN or infinite; no model is returned")
    history.append_request(forget.tolist(), "retrain", _digest([_local(p) for _, p in _trainable(replay_model)]))
    return UnlearnResult(replay_model, seconds, {"method": "retrain", **stats, "forgotten_total": forget.numel()})


def gather_shards(histories):
    """One single-process GradientHistory of the W shard histories of an FSDP2 run (any order; every rank's once, all
    of one run): w0, the trajectory rows and the final weights reassembled per parameter from the shards at their
    recorded offsets, the schedule (identical in every shard history, checked), param_spec with the whole
    parameters, bound to the whole trained model. The single-process methods take it (retrain replays it as the
    world batches; a DDP replay with W ranks too). With an int codec the rows are decoded and encoded again (one
    more rounding); fp32 is exact."""
    from ..history import ChunkedRows, EncodedRows, GradientHistory

    histories = list(histories)
    metas = [_shard_meta(h, "gather_shards") for h in histories]
    unfinished = [m["rank"] for h, m in zip(histories, metas) if not h.complete]
    if unfinished:
        raise ValueError(f"gather_shards: the shard histories of ranks {unfinished} are recordings that did not finish; resume and finish them")
    world = metas[0]["world_size"]
    runs = {m["run"] for m in metas}
    if len(runs) != 1:
        raise ValueError(f"gather_shards: the histories come from {len(runs)} different runs; gather the shards of one recording")
    ranks = sorted(m["rank"] for m in metas)
    if ranks != list(range(world)):
        raise ValueError(f"gather_shards: got the shards of ranks {ranks}, the run had world size {world}; pass every rank's once")
    order = sorted(range(len(histories)), key=lambda i: metas[i]["rank"])
    histories, metas = [histories[i] for i in order], [metas[i] for i in order]
    first = histories[0]
    for h in histories[1:]:
        same = (len(h.schedule["batches"]) == len(first.schedule["batches"]) and torch.equal(h.schedule["lrs"], first.schedule["lrs"])
                and all(torch.equal(a, b) for a, b in zip(h.schedule["batches"], first.schedule["batches"]))
                and ("rng_states" in h.schedule) == ("rng_states" in first.schedule)
                and ("rng_states" not in h.schedule or torch.equal(h.schedule["rng_states"], first.schedule["rng_states"])))
        if not same:
            raise ValueError(f"gather_shards: rank {h.meta['distributed']['rank']}'s schedule differs from rank 0's")
    shards = [m["shards"] for m in metas]

    def assemble(local_rows):
        """(rows, p) whole flat vectors from each rank's (rows, p_local) shard rows."""
        out, starts = [], [0] * world
        n_rows = local_rows[0].shape[0]
        for k, spec in enumerate(shards[0]):
            whole = torch.empty([n_rows] + spec["global_shape"], dtype=local_rows[0].dtype)
            for r in range(world):
                s = shards[r][k]
                n = int(torch.Size(s["local_shape"]).numel())
                piece = local_rows[r][:, starts[r] : starts[r] + n].reshape([n_rows] + s["local_shape"])
                starts[r] += n
                index = tuple([slice(None)] + [slice(o, o + size) for o, size in zip(s["offset"], s["local_shape"])])
                whole[index] = piece
            out.append(whole.reshape(n_rows, -1))
        return torch.cat(out, dim=1)

    w0 = assemble([h.schedule["w0"][None] for h in histories])[0]
    final = assemble([h.summary["w_final"][None] for h in histories])[0]
    sizes = [int(torch.Size(s["global_shape"]).numel()) for s in shards[0]]
    meta = {k: v for k, v in first.meta.items() if k not in ("distributed", "param_spec", "final_digest", "loss_check")}
    meta["param_spec"] = [(s["name"], s["global_shape"], s["dtype"]) for s in shards[0]]
    meta["distributed"] = {"world_size": world, "backend": metas[0]["backend"], "recording_rank": 0, "gathered_from": "fsdp2",
                           "run": metas[0]["run"]}
    meta["final_digest"] = _digest(list(final.split(sizes)))
    trajectory = None
    if first.trajectory:
        policy = first.meta["policy"]
        trajectory = {}
        for key in first.trajectory:
            rows = assemble([h.trajectory[key].all() for h in histories])
            enc = EncodedRows.encode(rows, policy["codec"], policy["blocksize"])
            trajectory[key] = ChunkedRows([(rows.shape[0], enc)], enc.codec, enc.blocksize, enc.p, enc.dtype)
    schedule = {k: v for k, v in first.schedule.items() if k != "w0"}
    schedule["w0"] = w0
    return GradientHistory(meta, schedule, trajectory, None)
