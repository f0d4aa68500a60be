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

FSDP2 (torch.distributed.fsdp.fully_shard, DTensor parameters) is refused: see docs/distributed.md.
"""
import copy
import time

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

from ..recording import HistoryRecorder


def _world(group, who="DistributedRecorder"):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{who}: torch.distributed is not initialised (call dist.init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


class DistributedRecorder:
    """HistoryRecorder for DDP: every rank calls record() and finish(); rank 0 (of `group`) records."""

    def __init__(self, model, optimizer, policy=None, group=None, **recorder_options):
        refuse_sharded(model, "DistributedRecorder")
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"DistributedRecorder: model must be the DistributedDataParallel wrapper (its gradients are the "
                             f"ranks' average), got {type(model).__name__}")
        self.group = group
        self.world_size, self.rank = _world(group)
        self.backend = str(dist.get_backend(group))
        self.steps = 0
        allow = recorder_options.pop("allow", ())
        self.allow = (allow,) if isinstance(allow, str) else tuple(allow)
        # The recorder takes each gradient's norm when backward leaves it, to detect clipping (a later change) and
        # to check finish()'s loss_fn against; under DDP the all-reduce writes the averaged gradients after that.
        # A communication hook measures the norms the all-reduce produced: this class refuses a later edit itself
        # and hands those norms to the recorder as its baseline (see _rebaseline).
        # written by the hook's callbacks, which run on the backend's worker threads (one per bucket, concurrently):
        # one dict entry per bucket, never a read-modify-write of a shared number (a "+=" there lost a bucket's
        # share now and then, and that rank alone refused the step)
        self._bucket_sq, self._reduced_norms = {}, {}
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
        # only rank 0 holds a recorder: the others would record the same gradients and world batches again
        self.recorder = None
        if self.rank == 0:
            import inspect

            if self.allow and "allow" in inspect.signature(HistoryRecorder.__init__).parameters:
                recorder_options["allow"] = self.allow
            self.recorder = HistoryRecorder(model.module, optimizer, policy, **recorder_options)
            # in the recorder's meta from the start: a streamed recording (path=...) writes its head with it
            if isinstance(getattr(self.recorder, "meta", None), dict):
                self.recorder.meta["distributed"] = self._meta()
        self.params = [p for p in model.module.parameters() if p.requires_grad]

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
        # one gather of (batch size, no all-reduce, edited) from every rank: every rank sees the same and raises alike
        # (none is left waiting in the next collective)
        info = [torch.zeros(3, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(info, torch.tensor([local.numel(), int(norms is None), int(edited)]), group=self.group)
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
        if self.recorder is not None:
            self._rebaseline()
            self.recorder.record(world)
        self.steps += 1
        return world

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
        self.recorder.rebase_gradients(norms)
        self._reduced_norms = {}

    def finish(self, train_set, loss_fn, **finish_options):
        """The GradientHistory (rank 0) or None (other ranks). Not collective: rank 0 computes alone."""
        if self.recorder is None:
            return None
        history = self.recorder.finish(train_set, loss_fn, **finish_options)
        history.meta["distributed"] = self._meta()
        return history

    def _meta(self):
        return {"world_size": self.world_size, "backend": self.backend, "recording_rank": 0}


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
            "the parameters and gradients, and per-rank shard histories are not supported. Record under DDP (or a single "
            "process), or gather the full parameters first"
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
        lengths.numel(), int(lengths.sum()), history.n_train,
        int(torch.as_tensor(history.schedule["batches"][0]).sum()) if lengths.numel() else 0,
    ], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group=group)
    differ = [r for r in range(world_size) if not torch.equal(every[r], every[0])]
    if differ:
        raise ValueError(f"distributed retrain: ranks {differ} replay another history or forget set than rank 0 (forget sizes "
                         f"{[int(e[0]) for e in every]}); every rank must pass the same history and forget")


def run(model, history, forget, train_set, loss_fn, group=None, progress=None):
    """method="retrain" under DDP, called on every rank of `group` (a collective): replays the recorded schedule
    from w0 without `forget` (a sorted int64 tensor, the same on every rank). Rank r computes the mean-loss gradient
    of its part of each world batch (positions r*B/W .. (r+1)*B/W, the indices it trained on) over its retained
    samples, scales it by (its retained) / (the world batch's retained), and the ranks all-reduce (sum) it: the
    gradient of the mean loss over the retained world batch. A step whose world batch is all forgotten is skipped
    on every rank, as in the single-process replay. model: the module (its parameters are overwritten) or the DDP
    wrapper (its .module is used, DDP's own hooks are bypassed). Returns (module, stats) like methods.retrain.run."""
    from ..history import fetch, set_flat_params
    from ..methods._common import batch_loss, check_history
    from ..methods.retrain import build_optimizer

    world_size, rank = _world(group, "distributed retrain")
    refuse_sharded(model, "distributed retrain")
    forget = torch.as_tensor(forget, dtype=torch.int64)
    _check_same_request(history, forget, group, world_size)  # before the checks below: one failing on one rank only would leave the others waiting
    check_world_size(history, world_size)
    module = _unwrap(model)
    check_history(history, module, forget, train_set, "retrain")
    set_flat_params(module, history.schedule["w0"])
    optimizer = build_optimizer(module, history.meta)
    params = [p for p in module.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    keep = torch.ones(history.n_train, dtype=torch.bool)
    keep[forget] = False
    evals = steps = 0
    for t, batch in enumerate(history.schedule["batches"]):
        batch = torch.as_tensor(batch, dtype=torch.int64)
        if progress is not None:
            progress.update(1)
        if batch.numel() % world_size:
            raise ValueError(f"history: step {t}'s world batch has {batch.numel()} samples, not a multiple of world size {world_size}; "
                             "it was not recorded by DistributedRecorder with this many ranks")
        per_rank = batch.numel() // world_size
        part = batch[rank * per_rank : (rank + 1) * per_rank]
        part = part[keep[part]]
        retained = int(keep[batch].sum())  # the same on every rank: no communication
        if retained == 0:
            continue
        for group_, lr in zip(optimizer.param_groups, history.schedule["lrs"][t].tolist()):
            group_["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if part.numel():
            batch_loss(module, loss_fn, fetch(train_set, part)).backward()
        # one buffer: the scaled gradients, then one flag per parameter (reached by backward on this rank)
        flat = torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                         + [torch.tensor([float(p.grad is not None) for p in params], dtype=params[0].dtype)])
        flat[: sum(sizes)] *= part.numel() / retained
        dist.all_reduce(flat, group=group)
        grads, reached = flat[: sum(sizes)].split(sizes), flat[sum(sizes):]
        for p, g, r in zip(params, grads, reached.tolist()):
            # a parameter no rank's backward reached keeps grad None (the optimizer skips it, as in a single process)
            p.grad = g.view_as(p).clone() if r > 0 else None
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
        norms = {id(p): torch.linalg.vector_norm(g.detach()).clone() for p, g in zip(bucket.parameters(), bucket.gradients())}
        recorder._reduced_norms.update(norms)
        recorder._bucket_sq[bucket.index()] = square
        return reduced

    return future.then(measured)
