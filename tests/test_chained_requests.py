"""A chained request (the result of an earlier uf.unlearn passed as model) gets the loss_fn / train_set check the first
request gets: every method replays the history with them whatever model is passed, so they are compared at the trained
weights rebuilt from the history (a replay of its gradient rows, or the summary's w_star), not at the model's."""
import copy

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.history import flat_params

from test_sequential import full, minimal, train  # noqa: F401  (the same small float64 logistic run, and its fixtures)

LOSS = torch.nn.functional.cross_entropy
A, B = [0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]
WRONG = {  # what each wrong argument looks like, and the argument the refusal names
    "label smoothing": (lambda o, t: LOSS(o, t, label_smoothing=0.05), False, "loss_fn / train_set: "),
    "permuted train_set": (LOSS, True, "loss_fn / train_set: "),
    "sum loss": (lambda o, t: LOSS(o, t, reduction="sum"), False, "loss_fn: "),
}


def permuted(data):
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    return torch.utils.data.TensorDataset(*(t[perm] for t in data.tensors))


@pytest.mark.parametrize("wrong", sorted(WRONG))
@pytest.mark.parametrize("method, kind", [("retrain", "full"), ("deltagrad", "full"), ("mini", "minimal")])
def test_a_chained_request_with_another_loss_or_train_set_is_refused(method, kind, wrong, request):
    data, trained, recorded = request.getfixturevalue(kind)
    history = copy.deepcopy(recorded)
    first = uf.unlearn(trained, history, A, data, LOSS, method=method).model
    kept = flat_params(first).clone()
    loss_fn, permute, named = WRONG[wrong]
    with pytest.raises(ValueError) as err:
        uf.unlearn(first, history, B, permuted(data) if permute else data, loss_fn, method=method)
    assert str(err.value).startswith(named)
    assert len(history.requests) == 1  # nothing served
    assert torch.equal(flat_params(first), kept)  # the check ran on a private copy


def test_an_unrecorded_model_allowed_is_checked_too(full):
    data, trained, recorded = full
    other = copy.deepcopy(trained)
    with torch.no_grad():
        other.weight.mul_(1.01)
    with pytest.raises(ValueError, match="^loss_fn / train_set: "):
        uf.unlearn(other, copy.deepcopy(recorded), A, permuted(data), LOSS, method="retrain", allow_unrecorded_model=True)


def test_the_right_chained_request_equals_one_request_for_the_union(full):
    data, trained, recorded = full
    history = copy.deepcopy(recorded)
    first = uf.unlearn(trained, history, A, data, LOSS, method="retrain").model
    second = uf.unlearn(first, history, B, data, LOSS, method="retrain")
    union = uf.unlearn(trained, copy.deepcopy(recorded), A + B, data, LOSS, method="retrain").model
    assert torch.equal(flat_params(second.model), flat_params(union))
    assert second.stats["forgotten_total"] == 12
    # deltagrad too: the rebuilt weights are the trained ones bit for bit (fp32-or-wider rows), so the strict check passes
    chained = uf.unlearn(first, history, B, data, LOSS, method="deltagrad")
    assert chained.stats["forgotten_total"] == 12


def test_lossy_rows_rebuild_the_trained_weights_only_nearly_and_keep_the_ratio_check():
    data, trained, recorded = train("full", codec="int8")
    history = copy.deepcopy(recorded)
    first = uf.unlearn(trained, history, A, data, LOSS, method="retrain").model
    second = uf.unlearn(first, history, B, data, LOSS, method="retrain")  # not refused for the rows' rounding
    union = uf.unlearn(trained, copy.deepcopy(recorded), A + B, data, LOSS, method="retrain").model
    assert torch.equal(flat_params(second.model), flat_params(union))
    with pytest.raises(ValueError, match=r"^loss_fn: gives (19|20)\.?\d* times the gradient"):
        uf.unlearn(second.model, history, [30], data, WRONG["sum loss"][0], method="retrain")
