"""Exact retraining: replay the recorded schedule from w_0 without the forgotten samples (the gold standard).

Same initial weights, batch order, learning rates and optimizer hyper-parameters (any torch.optim
optimizer: it is rebuilt from the recorded class and groups). A batch made only of forgotten samples is
skipped. Forgetting nothing reproduces the original final weights bit for bit on CPU. A kind="minimal"
history keeps no batch order: its replay draws batches of the recorded sizes (seed=), i.e. a retrain with
another batch order, reported in stats["batch_order"].
"""
import torch

from ..history import restore_buffers, set_flat_params
from ..optimizers import optimizer_class, set_step_settings
from ._common import check_history, clip, clip_max_norm, history_batch_order, replay_step, replayed_batches


def build_optimizer(model, meta):
    """The recorded optimizer over `model`'s trainable parameters (or over a list of tensors standing for them, in
    order); its class comes from the allow-list in optimizers.py (a history names it as text and may be crafted)."""
    cls = optimizer_class(meta["optimizer"]["class"])
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else list(model)
    owners, n_groups = meta.get("group_of_param"), len(meta["optimizer"]["groups"])
    if not (isinstance(owners, list) and len(owners) == len(params)
            and all(type(g) is int and 0 <= g < n_groups for g in owners)):  # else parameters would silently go unoptimized
        raise ValueError(f"history: meta['group_of_param'] must give each of the {len(params)} parameters one of the {n_groups} "
                         f"recorded optimizer groups, got {owners!r:.200}")
    groups = []
    for gi, hyper in enumerate(meta["optimizer"]["groups"]):
        group = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hyper.items()}
        group["params"] = [p for p, g in zip(params, meta["group_of_param"]) if g == gi]
        groups.append(group)
    try:
        return cls(groups)
    except (TypeError, ValueError) as err:  # hyper-parameters from the file that the class refuses
        raise ValueError(f"history: optimizer {meta['optimizer']['class']} refuses the recorded hyper-parameters ({err})") from None


def run(model, history, forget, train_set, loss_fn, progress=None, seed=0):
    check_history(history, model, forget, train_set, "retrain")
    set_flat_params(model, history.schedule["w0"])
    restore_buffers(model, history.schedule.get("buffers0"))
    optimizer = build_optimizer(model, history.meta)
    forget_mask = torch.zeros(history.n_train, dtype=torch.bool)
    forget_mask[forget] = True
    max_norm = clip_max_norm(history)
    evals = steps = 0
    for t, parts in replayed_batches(history, forget_mask, seed):
        if progress is not None:
            progress.update(1)
        if not any(part.numel() for part in parts):
            continue
        set_step_settings(optimizer, *history.step_settings(t))
        optimizer.zero_grad(set_to_none=True)
        evals += replay_step(model, loss_fn, train_set, history, parts, t)
        clip(model, max_norm)
        optimizer.step()
        steps += 1
    return model, {"steps": steps, "gradient_evaluations": evals, "history_bytes_read": history.nbytes("schedule"),
                   "batch_order": history_batch_order(history)}
