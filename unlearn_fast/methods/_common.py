"""Small pieces every history-based method shares."""
import torch


def batch_loss(model, loss_fn, batch):
    x, y = batch
    return loss_fn(model(x), y)


def remaining(batch, forget_mask):
    return batch[~forget_mask[batch]]


def check_history(history, model, forget, method):
    """The history must match the model and must have seen every forgotten sample."""
    from ..history import GradientHistory

    if not isinstance(history, GradientHistory):
        raise ValueError(f"{method}: history must be a GradientHistory (from HistoryRecorder.finish or GradientHistory.load), got {type(history).__name__}")
    history.check_model(model)
    if forget.numel() and int(forget.max()) >= history.n_train:
        raise ValueError(f"forget: index {int(forget.max())} is beyond the {history.n_train} samples the history was recorded on")
    unseen = forget[~history.seen_mask()[forget]]
    if unseen.numel():
        raise ValueError(f"forget: indices {unseen[:10].tolist()} never appear in the recorded history (never trained on)")
