"""Record a GradientHistory from a torch.distributed DistributedDataParallel (DDP) training loop.

    model = DDP(net); rec = DistributedRecorder(model, optimizer, policy)      # on every rank
    for indices, x, y in loader:                  # DistributedSampler: each rank its part of the world batch
        optimizer.zero_grad(); loss_fn(model(x), y).backward()
        rec.record(indices)                       # every rank, after backward, before step (a collective call)
        optimizer.step()
    history = rec.finish(train_set, loss_fn)      # the GradientHistory on rank 0, None on the other ranks

After backward every rank holds the same gradient, the average of the ranks' mean-loss gradients, so one rank
(rank 0) records, on the unwrapped `.module` (parameter names without DDP's "module." prefix); record() gathers
every rank's indices of the step (all_gather, padded to the longest) into the world batch, in rank order. The
average of the ranks' means equals the mean over the world batch, which is what a single-process replay
computes, only when every rank's batch has the same size: record() refuses unequal sizes on every rank (set
drop_last=True on the DataLoader, or pad the data set to a multiple of world size times batch size).
The history records the world size (meta["distributed"]); a single-process replay of it (method="retrain") is
exact; check_world_size() refuses to use it under another world size.
"""
import torch
import torch.distributed as dist

from ..recording import HistoryRecorder


def _world(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("DistributedRecorder: torch.distributed is not initialised (call dist.init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


class DistributedRecorder:
    """HistoryRecorder for DDP: every rank calls record() and finish(); rank 0 (of `group`) records."""

    def __init__(self, model, optimizer, policy=None, group=None, **recorder_options):
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
        self._reduced_sq, self._reduced, self._reduced_norms = 0.0, False, {}
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
        self.params = [p for p in model.module.parameters() if p.requires_grad]

    def record(self, batch_indices):
        """Record the coming optimizer step; batch_indices: this rank's sample indices (1-D integers).
        Collective: every rank must call it at every step."""
        local = torch.as_tensor(batch_indices)
        if local.dtype.is_floating_point or local.dtype == torch.bool or local.dim() != 1:
            raise ValueError(f"record: batch_indices must be this rank's 1-D integer sample indices, got {local.dtype} of shape {tuple(local.shape)}")
        local = local.to("cpu", torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([local.numel()]), group=self.group)
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) != 1:
            # every rank sees the same sizes, so every rank raises: none is left waiting in a collective
            raise ValueError(
                f"record: step {self.steps} has per-rank batch sizes {sizes}; DDP averages the ranks' mean gradients, which equals "
                "the world batch's mean gradient (what the replay computes) only for equal sizes. Use drop_last=True, or a data "
                "set size that is a multiple of world size x batch size"
            )
        self._check_reduced_gradients()
        padded = [torch.empty(sizes[0], dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(padded, local, group=self.group)
        world = torch.cat(padded)
        if self.recorder is not None:
            self._rebaseline()
            self.recorder.record(world)
        self.steps += 1
        return world

    def _check_reduced_gradients(self):
        if not self._reduced:
            raise ValueError(f"record: step {self.steps}: no DDP gradient all-reduce ran since the last record(); call record() after "
                             "the backward of the DDP model (under no_sync(), after the last micro-batch's backward)")
        reduced = self._reduced_sq ** 0.5
        now = sum(float(p.grad.double().pow(2).sum()) for p in self.params if p.grad is not None) ** 0.5
        self._reduced_sq, self._reduced = 0.0, False
        if abs(now - reduced) > 1e-6 * reduced and "clipping" not in self.allow:
            raise ValueError(f"record: step {self.steps}'s gradients changed after DDP's all-reduce (norm {reduced:.6g} -> {now:.6g}: "
                             "gradient clipping?); the replay computes unclipped gradients. Train without clipping, or pass "
                             "allow=('clipping',) if your replay loss_fn reproduces it")

    def _rebaseline(self):
        # HistoryRecorder (recording.py) keeps the norms backward left in _raw_norms, by position in its params;
        # under DDP those are the rank's local gradients, not the averaged ones it records. This needs a public
        # way to tell the recorder that gradients were reduced (requested); until then the private list is updated.
        raw = getattr(self.recorder, "_raw_norms", None)
        if raw is not None:
            for i, p in enumerate(self.recorder.params):
                if raw[i] is not None and id(p) in self._reduced_norms:
                    raw[i] = self._reduced_norms[id(p)]
        self._reduced_norms = {}

    def finish(self, train_set, loss_fn, **finish_options):
        """The GradientHistory (rank 0) or None (other ranks). Not collective: rank 0 computes alone."""
        if self.recorder is None:
            return None
        history = self.recorder.finish(train_set, loss_fn, **finish_options)
        history.meta["distributed"] = {"world_size": self.world_size, "backend": self.backend, "recording_rank": 0}
        return history


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


class _Reduction:
    """The comm hook's state: the group, and the DistributedRecorder that receives the measured norms."""

    def __init__(self, group):
        self.group, self.recorder = group, None


def _allreduce_measuring(state, bucket):
    """DDP's default reduction (divide by world size, then sum over ranks), adding the squared norm of the result
    to the recorder's _reduced_sq: the norm of the averaged gradient as DDP hands it to the parameters."""
    group = state.group if state.group is not None else dist.group.WORLD
    tensor = bucket.buffer()
    tensor.div_(dist.get_world_size(group))
    future = dist.all_reduce(tensor, group=group, async_op=True).get_future()

    def measured(fut):
        reduced, recorder = fut.value()[0], state.recorder
        recorder._reduced_sq += float(reduced.double().pow(2).sum())
        for p, g in zip(bucket.parameters(), bucket.gradients()):  # views of the reduced buffer
            recorder._reduced_norms[id(p)] = torch.linalg.vector_norm(g.detach()).clone()
        recorder._reduced = True
        return reduced

    return future.then(measured)
