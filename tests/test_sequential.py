"""Sequential deletion requests: a request on a model produced by an earlier one forgets the union (every
method restarts from the history, so forgetting only the new samples would re-learn the earlier ones), and a
history refuses a model whose weights it did not record or produce."""
import copy

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.history import flat_params

LOSS = torch.nn.functional.cross_entropy
A, B, C = [0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]
UNION = sorted(A + B + C)


def train(kind, codec=None):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 1.5
    y = torch.randint(0, 3, (120,), generator=gen)
    data = torch.utils.data.TensorDataset(centers[y] + torch.randn(120, 6, generator=gen, dtype=torch.float64), y)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, weight_decay=1e-2)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind=kind, codec=codec, rank=8, budget_vectors=1024))  # float64 rows: room for rank 8
    for epoch in range(4):
        order = torch.randperm(120, generator=gen)
        for b in range(0, 120, 20):
            idx = order[b : b + 20]
            opt.zero_grad()
            LOSS(model(data.tensors[0][idx]), data.tensors[1][idx]).backward()
            rec.record(idx, batch_size=20)
            opt.step()
    return data, model, rec.finish(data, LOSS)


@pytest.fixture(scope="module")
def full():
    return train("full")


@pytest.fixture(scope="module")
def minimal():
    return train("minimal")


def chain(model, history, data, method):
    results = []
    for request in (A, B, C):
        results.append(uf.unlearn(model, history, request, data, LOSS, method=method))
        model = results[-1].model
    return results


def gap(a, b):
    return float(torch.linalg.vector_norm(flat_params(a) - flat_params(b)))


@pytest.mark.parametrize("method, kind", [("retrain", "full"), ("deltagrad", "full"), ("mini", "minimal")])
def test_three_chained_requests_equal_one_request_for_their_union(method, kind, request):
    data, trained, recorded = request.getfixturevalue(kind)
    history = copy.deepcopy(recorded)  # each method its own request log
    first, second, third = chain(trained, history, data, method)
    union = uf.unlearn(trained, copy.deepcopy(recorded), UNION, data, LOSS, method=method).model
    c_alone = uf.unlearn(trained, copy.deepcopy(recorded), C, data, LOSS, method=method).model
    if method == "retrain":
        assert torch.equal(flat_params(third.model), flat_params(union))
    else:  # the approximate methods: as close to the union request as to themselves, far from forgetting C alone
        assert gap(third.model, union) <= 1e-9 * gap(union, trained)
    assert gap(c_alone, union) > 0.1 * gap(union, trained)  # what the old code returned: A and B re-learned
    assert [r.stats["forgotten_total"] for r in (first, second, third)] == [6, 12, 18]
    assert [r.stats["forgotten_earlier"] for r in (first, second, third)] == [0, 6, 12]
    assert [req["forget"] for req in history.requests] == [A, sorted(A + B), UNION]
    assert [req["method"] for req in history.requests] == [method] * 3
    assert history.requests[-1]["model_digest"] == uf.history.weights_digest(third.model)


def test_a_chain_survives_save_and_load(tmp_path, full):
    data, trained, recorded = full
    path = str(tmp_path / "h")
    copy.deepcopy(recorded).save(path)
    model = trained
    for request in (A, B, C):
        model = uf.unlearn(model, uf.GradientHistory.load(path), request, data, LOSS, method="retrain").model
    union = uf.unlearn(trained, copy.deepcopy(recorded), UNION, data, LOSS, method="retrain").model
    assert torch.equal(flat_params(model), flat_params(union))
    assert [req["forget"] for req in uf.GradientHistory.load(path).requests] == [A, sorted(A + B), UNION]


def test_a_model_with_other_weights_is_refused_unless_allowed(full):
    data, trained, recorded = full
    history = copy.deepcopy(recorded)
    other = copy.deepcopy(trained)
    with torch.no_grad():
        other.weight.mul_(1.01)  # the same architecture, other weights
    for method in ("retrain", "deltagrad"):
        with pytest.raises(ValueError, match="model: its weights are neither the final weights this history was recorded for"):
            uf.unlearn(other, history, A, data, LOSS, method=method)
    assert history.requests == []
    # told explicitly: the history's model is unlearned (what every method does), the request is logged
    forced = uf.unlearn(other, history, A, data, LOSS, method="retrain", allow_unrecorded_model=True)
    expected = uf.unlearn(trained, copy.deepcopy(recorded), A, data, LOSS, method="retrain")
    assert torch.equal(flat_params(forced.model), flat_params(expected.model))
    assert forced.stats["forgotten_total"] == 6 and len(history.requests) == 1


def test_requests_whose_union_names_the_whole_training_set_are_refused(full):
    data, trained, recorded = full
    history = copy.deepcopy(recorded)
    first = uf.unlearn(trained, history, list(range(60)), data, LOSS, method="retrain").model
    with pytest.raises(ValueError, match="forget: with the earlier requests this model served it names the whole training set"):
        uf.unlearn(first, history, list(range(60, 120)), data, LOSS, method="retrain")
