"""Parameters training's optimizer skipped (.grad None: an unused head, a branch not taken) and sparse gradients.

torch.optim skips a parameter whose .grad is None: no weight decay, no momentum, no Adam moments. The recorder keeps
which parameters were skipped at which steps (meta["recording"]["grad_none"]) and every replay of the recorded rows
(methods/trajectory.py: the rebuilt w_t, rewind's checkpoints, deltagrad) skips them too; before, the rebuilt trajectory
stepped on their zero rows and decayed an unused head (deltagrad T0=1 landed 1.02 gaps from retrain, rewind 5e-2 off w*).
An embedding with sparse=True is refused by name when the recorder is created (it crashed inside backward before).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast.history import flat_params
from unlearn_fast.methods.trajectory import weights_at

N, D, C = 120, 8, 3
FORGET = torch.arange(20)  # in the first two epochs only


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


class WithAux(torch.nn.Module):
    """A body that trains and an auxiliary head that the forward uses only while `use_aux` is set (never, by default)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(D, C)
        self.aux = torch.nn.Linear(D, C)
        self.use_aux = False

    def forward(self, x):
        out = self.body(x)
        return out + self.aux(x) if self.use_aux else out


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen)
    return torch.utils.data.TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long())


def batches():
    """Two epochs over every sample, then 6 batches of the others: a checkpoint at step 10 has no forgotten sample after it."""
    gen, out = torch.Generator().manual_seed(1), []
    for _ in range(2):
        out += list(torch.randperm(N, generator=gen).split(24))
    rest = torch.arange(len(FORGET), N)
    return out + [rest[torch.randperm(len(rest), generator=gen)[:24]] for _ in range(6)]


OPTIMIZERS = {
    "sgd_wd": lambda m: torch.optim.SGD(m.parameters(), lr=0.2, weight_decay=1e-2),
    "sgd_momentum_wd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov_groups": lambda m: torch.optim.SGD([{"params": m.body.parameters()}, {"params": m.aux.parameters(), "weight_decay": 0.05}],
                                                      lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-1),
}


def train(make_opt, aux_steps=(), path=None):
    """(history, trained model, initial model, [w_t before step t]); the aux head is used on the steps in aux_steps."""
    ds = data()
    torch.manual_seed(0)
    model = WithAux()
    initial = copy.deepcopy(model)
    opt = make_opt(model)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=path)
    ws = []
    for t, idx in enumerate(batches()):
        model.use_aux = t in aux_steps
        ws.append(flat_params(model).clone())
        x, y = ds[idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.record(idx, batch_size=len(idx))
        opt.step()
    model.use_aux = False
    return rec.finish(ds, F.cross_entropy), model, initial, ws


def aux_of(model):
    return torch.cat([model.aux.weight.detach().reshape(-1), model.aux.bias.detach()])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unused_head_is_recorded_and_the_trajectory_skips_it(name):
    history, model, initial, ws = train(OPTIMIZERS[name])
    assert torch.equal(aux_of(model), aux_of(initial))  # torch.optim never moved it
    assert history.meta["recording"]["grad_none"] == [[0, ["aux.weight", "aux.bias"]]]
    rebuilt = weights_at(history, range(history.num_steps))
    assert all(torch.equal(rebuilt[t], w) for t, w in enumerate(ws))  # bit for bit, the unused head included


@pytest.mark.parametrize("name", ["sgd_wd", "sgd_momentum_wd", "sgd_nesterov_groups"])
def test_deltagrad_every_step_exact_equals_retrain_and_leaves_the_unused_head(name):
    history, model, _, _ = train(OPTIMIZERS[name])
    ds = data()
    retrained = uf.unlearn(model, history, FORGET, ds, F.cross_entropy, method="retrain").model
    got = uf.unlearn(model, history, FORGET, ds, F.cross_entropy, method="deltagrad", T0=1).model
    gap = float(torch.linalg.vector_norm(flat_params(model) - flat_params(retrained)))
    assert gap > 1e-2
    assert float(torch.linalg.vector_norm(flat_params(got) - flat_params(retrained))) <= 1e-5 * gap
    assert torch.equal(aux_of(got), aux_of(model))
    assert torch.equal(aux_of(retrained), aux_of(model))
    # the approximate steps too leave it where training left it
    assert torch.equal(aux_of(uf.unlearn(model, history, FORGET, ds, F.cross_entropy, method="deltagrad").model), aux_of(model))


@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adamw"])
def test_rewind_after_the_last_forgotten_sample_returns_the_trained_weights(name):
    history, model, _, _ = train(OPTIMIZERS[name])
    result = uf.unlearn(model, history, FORGET, data(), F.cross_entropy, method="rewind", steps=6)
    assert result.stats["checkpoint_step"] == 10 and result.stats["checkpoint_source"] == "trajectory"
    assert torch.equal(aux_of(result.model), aux_of(model))
    assert torch.equal(flat_params(result.model), flat_params(model))  # the run's own steps from its own state


@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adamw"])
def test_a_head_used_on_some_steps_is_skipped_on_the_others(name):
    aux_steps = {3, 4, 9}
    history, _, _, ws = train(OPTIMIZERS[name], aux_steps=aux_steps)
    assert history.meta["recording"]["grad_none"] == [[0, ["aux.weight", "aux.bias"]], [3, []], [5, ["aux.weight", "aux.bias"]],
                                                      [9, []], [10, ["aux.weight", "aux.bias"]]]
    rebuilt = weights_at(history, range(history.num_steps))
    assert all(torch.equal(rebuilt[t], w) for t, w in enumerate(ws))


def test_deltagrad_refuses_a_head_skipped_on_some_steps_only_under_momentum():
    history, model, _, _ = train(OPTIMIZERS["sgd_momentum_wd"], aux_steps={3})
    with pytest.raises(ValueError, match=r"deltagrad: parameter 'aux.weight' had no gradient .* method='retrain' or 'rewind'"):
        uf.unlearn(model, history, FORGET, data(), F.cross_entropy, method="deltagrad", T0=1)


def test_a_streamed_recording_with_a_skipped_head_resumes(tmp_path):
    path = str(tmp_path / "rec")
    ds = data()
    torch.manual_seed(0)
    model = WithAux()
    opt = OPTIMIZERS["sgd_momentum_wd"](model)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=path)
    order = batches()
    saved = None
    for t, idx in enumerate(order):
        if t == 8:
            rec.flush()
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        x, y = ds[idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.record(idx, batch_size=len(idx))
        opt.step()
    rec.close()  # killed; the trainer restarts from the checkpoint of step 8
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    rec = uf.HistoryRecorder.resume(path, model, opt)
    for idx in order[8:]:
        x, y = ds[idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.record(idx, batch_size=len(idx))
        opt.step()
    history = rec.finish(ds, F.cross_entropy)
    assert history.meta["recording"]["grad_none"] == [[0, ["aux.weight", "aux.bias"]]]
    again = uf.unlearn(model, history, FORGET, ds, F.cross_entropy, method="rewind", steps=6).model
    assert torch.equal(flat_params(again), flat_params(model))


def test_a_malformed_grad_none_is_refused():
    history, model, _, _ = train(OPTIMIZERS["sgd_wd"])
    history.meta["recording"]["grad_none"] = [[0, ["no.such.parameter"]]]
    with pytest.raises(ValueError, match="grad_none"):
        weights_at(history, [3])


# -- sparse gradients

class Bag(torch.nn.Module):
    def __init__(self, kind="embedding"):
        super().__init__()
        self.kind = kind
        if kind == "embedding":
            self.e = torch.nn.Embedding(50, 16, sparse=True)
        elif kind == "bag":
            self.e = torch.nn.EmbeddingBag(50, 16, sparse=True)
        else:  # a plain parameter looked up sparsely in the forward
            self.table = torch.nn.Parameter(torch.randn(50, 16))
        self.o = torch.nn.Linear(16, 3)

    def forward(self, x):
        if self.kind == "embedding":
            return self.o(self.e(x).mean(1))
        if self.kind == "bag":
            return self.o(self.e(x))
        return self.o(F.embedding(x, self.table, sparse=True).mean(1))


def tokens():
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 50, (40, 6), generator=gen)
    return tok, tok[:, 0] % 3


def step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("kind,param", [("embedding", "e.weight"), ("bag", "e.weight")])
def test_a_sparse_embedding_is_refused_when_the_recorder_is_created(kind, param):
    torch.manual_seed(0)
    model = Bag(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(ValueError, match=rf"HistoryRecorder: parameter '{param}' gets sparse gradients .*sparse=False"):
        uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    # nothing was hooked: the model and optimizer train as before
    assert not model.e.weight._post_accumulate_grad_hooks and not opt._optimizer_step_pre_hooks and not model._forward_pre_hooks
    x, y = tokens()
    before = model.e.weight.detach().clone()
    step(model, opt, x, y)
    assert not torch.equal(model.e.weight, before)


def test_a_sparse_gradient_from_the_forward_is_refused_by_record_not_inside_backward():
    torch.manual_seed(0)
    model = Bag("functional")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    x, y = tokens()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # the recorder's hook does not raise here
    assert model.table.grad.is_sparse
    with pytest.raises(ValueError, match=r"record: step 0: parameter 'table' has a sparse gradient .*sparse=False"):
        rec.record(torch.arange(40), batch_size=40)
    assert rec.steps == 0
    rec.close()
    before = model.table.detach().clone()
    opt.step()
    step(model, opt, x, y)
    assert not torch.equal(model.table, before)
