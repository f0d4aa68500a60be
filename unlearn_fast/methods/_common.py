"""Small pieces every history-based method shares."""
import torch


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


def check_history(history, model, forget, train_set, method):
    """The history must match the model and the training set, and must have seen every forgotten sample."""
    from ..history import GradientHistory

    if not isinstance(history, GradientHistory):
        raise ValueError(f"{method}: history must be a GradientHistory (from HistoryRecorder.finish or GradientHistory.load), got {type(history).__name__}")
    history.check_model(model)
    if len(train_set) != history.n_train:  # its batches are indices into the recorded training set
        raise ValueError(
            f"train_set: has {len(train_set)} samples, the history was recorded on a training set of {history.n_train}; "
            "pass the same data set (a torch.utils.data.Subset of its first samples if data was appended since)"
        )
    unseen = forget[~history.seen_mask()[forget]]
    if unseen.numel():
        raise ValueError(f"forget: indices {unseen[:10].tolist()} never appear in the recorded history (never trained on)")
