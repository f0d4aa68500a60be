"""Recording: HistoryRecorder watches a training loop and returns a GradientHistory (history.py stores it)."""
import dataclasses

import torch

from .history import EncodedRows, GradientHistory, HistoryPolicy, flat_grads, flat_params, param_spec


class HistoryRecorder:
    """Records a GradientHistory while a model trains. Call record(batch_indices) after backward, before step.

    For kind "first_epoch" / "all_epochs" this returns the language-model per-sample recorder
    (unlearn_fast.lm.recording.FirstEpochRecorder), which takes the batch inputs as well.
    """

    def __new__(cls, model, optimizer, policy=None):
        policy = policy or HistoryPolicy()
        if policy.kind in ("first_epoch", "all_epochs"):
            from .lm.recording import FirstEpochRecorder

            return FirstEpochRecorder(model, optimizer, policy)
        return super().__new__(cls)

    def __init__(self, model, optimizer, policy=None):
        self.policy = policy or HistoryPolicy()
        self.model, self.optimizer = model, optimizer
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"HistoryRecorder: model must be an nn.Module, got {type(model).__name__}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("HistoryRecorder: model has no trainable parameters")
        opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) not in opt_ids for p in self.params):
            raise ValueError("HistoryRecorder: optimizer does not hold every trainable parameter of model")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.group_of_param = [next(i for i, g in enumerate(optimizer.param_groups) if any(q is p for q in g["params"])) for p in self.params]
        self.w0 = flat_params(model).clone()
        self.batches, self.lrs, self.ws, self.gs = [], [], [], []
        self.checkpoints, self.checkpoint_every = [], 1  # (step, EncodedRows of w_step): a few evenly spaced parameter snapshots for the summary
        self.meta = {
            "policy": dataclasses.asdict(self.policy),
            "param_spec": param_spec(model),
            "optimizer": {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}", "groups": _jsonable(groups)},
            "group_of_param": self.group_of_param,
        }

    def record(self, batch_indices):
        idx = torch.as_tensor(batch_indices, dtype=torch.int64).reshape(-1).cpu().clone()
        if idx.numel() == 0:
            raise ValueError("record: batch_indices is empty")
        if self.policy.kind == "full":
            # Check before appending anything, so a rejected step leaves batches, lrs, ws and gs aligned.
            w, g = flat_params(self.model), flat_grads(self.model)
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"record: step {len(self.batches)} has non-finite gradients; history not extended")
            self.ws.append(w.clone())
            self.gs.append(g.clone())
        if self.policy.kind in ("full", "minimal"):
            self._keep_checkpoint(len(self.batches))
        self.batches.append(idx)
        self.lrs.append([g["lr"] for g in self.optimizer.param_groups])

    def _keep_checkpoint(self, step):
        """Snapshots without knowing the run's length: every power-of-two step (training moves fastest at the
        start) and an even grid of spacing `checkpoint_every`; when the grid holds more than
        checkpoint_capacity(steps) points, every other one is dropped and the spacing doubles."""
        from .methods.mini import checkpoint_capacity

        early = lambda s: s & (s - 1) == 0  # noqa: E731  (0, 1, 2, 4, 8, ...)
        if step % self.checkpoint_every == 0 or early(step):
            # encoded now (the summary stores them through summary_codec anyway): an int8 snapshot holds a quarter of the memory
            w = flat_params(self.model)
            self.checkpoints.append((step, EncodedRows.encode(w[None], self.policy.summary_codec, self.policy.blocksize)))
        while sum(s % self.checkpoint_every == 0 for s, _ in self.checkpoints) > checkpoint_capacity(step + 1):
            self.checkpoint_every *= 2
            self.checkpoints = [(s, w) for s, w in self.checkpoints if s % self.checkpoint_every == 0 or early(s)]

    def finish(self, train_set, loss_fn, batch_size=1024):
        """Close the recording. For "full" and "minimal" this computes the final summary over train_set."""
        if not self.batches:
            raise ValueError("finish: nothing was recorded (call record() every training step)")
        n_train = len(train_set)
        top = int(torch.cat(self.batches).max())
        if top >= n_train:
            raise ValueError(f"finish: recorded batch index {top} is out of range for train_set of {n_train} samples")
        meta = dict(self.meta, n_train=n_train)
        schedule = {"w0": self.w0, "batches": self.batches, "lrs": torch.tensor(self.lrs, dtype=torch.float64)}
        trajectory = None
        if self.policy.kind == "full":
            c, bs = self.policy.codec, self.policy.blocksize
            trajectory = {"w": EncodedRows.encode(self.ws, c, bs), "g": EncodedRows.encode(self.gs, c, bs)}
        from .methods.mini import final_summary, sgd_settings

        try:
            sgd = sgd_settings(meta, "mini")
        except ValueError:  # not SGD: mini refuses such histories, so the schedule response is not computed
            sgd = None
        summary = final_summary(
            self.model, train_set, loss_fn, self.policy, len(self.batches), self.checkpoints, schedule["lrs"][:, 0], sgd, batch_size=batch_size
        )
        return GradientHistory(meta, schedule, trajectory, summary)


def _jsonable(groups):
    out = []
    for g in groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if isinstance(v, (int, float, bool, str, tuple, type(None)))})
    return out
