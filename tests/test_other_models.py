"""Models, losses and optimizers the benchmark does not train (found by a probe of the library as a new user would use
it): Mini's curvature products under regression losses and attention layers, against J' H J formed from autograd;
what Mini cannot transform refused by name, the fallback taking over and the caller's model left as trained; deltagrad's
refusals handed to the fallback; audit's classifier metrics refused for a regression model."""
import copy

import pytest
import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast.history import flat_params, set_flat_params
from unlearn_fast.methods import mini
from unlearn_fast.methods._common import UnsupportedTrainingError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ggn_reference(model, loss_fn, x, y, w):
    """J' H_out J from autograd: the model's Jacobian in w and the loss's Hessian in the outputs, both formed."""
    named = list(model.named_parameters())

    def outputs(flat):
        parts = torch.split(flat, [p.numel() for _, p in named])
        return torch.func.functional_call(model, {n: t.view(p.shape) for (n, p), t in zip(named, parts)}, (x,))

    with torch.no_grad():
        out = outputs(w)
    J = torch.autograd.functional.jacobian(outputs, w).reshape(out.numel(), w.numel())
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1))
    return J.T @ H @ J


class Attention(torch.nn.Module):
    """One self-attention layer over a short sequence, then a linear head: in eval mode nn.MultiheadAttention takes its
    fused fast path, which has no forward-mode derivatives."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


CASES = {  # model, inputs, targets, loss
    "mse": (lambda: torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)),
            lambda g: torch.randn(7, 3, generator=g), lambda g: torch.randn(7, 2, generator=g), F.mse_loss),
    "huber": (lambda: torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)),
              lambda g: torch.randn(7, 3, generator=g), lambda g: 2 * torch.randn(7, 2, generator=g), F.huber_loss),
    "attention": (Attention, lambda g: torch.randn(5, 3, 4, generator=g), lambda g: torch.randint(0, 3, (5,), generator=g), F.cross_entropy),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_curvature_products_match_the_formed_gauss_newton_matrix(case):
    make, inputs, targets, loss_fn = CASES[case]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = make().double().eval()
    x, y = inputs(g).double(), targets(g)
    y = y.double() if y.dtype.is_floating_point else y
    w = flat_params(model).clone()
    V = torch.randn(4, w.numel(), generator=g, dtype=torch.float64)
    G = ggn_reference(model, loss_fn, x, y, w)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.testing.assert_close(mini._ggn_matmul(model, loss_fn, (x, y), w, V), V @ G, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(mini._ggn_quadratic(model, loss_fn, (x, y), w, V), ((V @ G) * V).sum(1), rtol=1e-9, atol=1e-11)
    assert torch.backends.mha.get_fastpath_enabled() == fast_path  # (turned off for the products only)


class Branching(torch.nn.Module):
    """A head used only on batches holding a large input: data-dependent control flow, which vmap cannot batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    def forward(self, x):
        out = self.a(x)
        return out + self.b(x) if bool((x[:, 0] > 1.5).any()) else out


def train(model, kind, steps=12, optimizer=None):
    torch.manual_seed(0)
    X, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    data = torch.utils.data.TensorDataset(X, y)
    opt = optimizer(model.parameters()) if optimizer else torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind=kind))
    for t in range(steps):
        idx = torch.arange(t * 8, (t + 1) * 8) % 96
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.record(idx)
        opt.step()
    return data, rec


def test_a_model_mini_cannot_transform_is_refused_by_name_and_left_as_trained():
    torch.manual_seed(0)
    model = Branching()
    data, rec = train(model, "minimal")
    trained = copy.deepcopy(model.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with pytest.raises(UnsupportedTrainingError, match="torch.func"):
        rec.finish(data, F.cross_entropy)
    for name, t in model.state_dict().items():  # (a failure partway once left a checkpoint's weights in the model)
        assert torch.equal(t, trained[name]), name
    assert all(p.grad is g is None or torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_the_fallback_runs_where_mini_cannot_transform_the_model():
    torch.manual_seed(0)
    model = Branching()
    data, rec = train(model, "full")
    history = rec.finish(data, F.cross_entropy)
    forget = torch.tensor([1, 2, 3])
    with pytest.raises(UnsupportedTrainingError, match="torch.func"):
        uf.unlearn(model, copy.deepcopy(history), forget, data, F.cross_entropy, method="mini")
    with pytest.warns(RuntimeWarning, match="fallback"):
        result = uf.unlearn(model, copy.deepcopy(history), forget, data, F.cross_entropy, method="mini", fallback="retrain")
    exact = uf.unlearn(model, copy.deepcopy(history), forget, data, F.cross_entropy, method="retrain")
    assert result.stats["fallback"] == "retrain"
    assert torch.equal(flat_params(result.model), flat_params(exact.model))


def test_deltagrad_hands_an_optimizer_it_cannot_model_to_the_fallback():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data, rec = train(model, "full", optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01))
    history = rec.finish(data, F.cross_entropy)
    with pytest.raises(UnsupportedTrainingError, match="torch.optim.SGD"):
        uf.unlearn(model, copy.deepcopy(history), [1, 2], data, F.cross_entropy, method="deltagrad")
    with pytest.warns(RuntimeWarning, match="fallback"):
        result = uf.unlearn(model, copy.deepcopy(history), [1, 2], data, F.cross_entropy, method="deltagrad", fallback="retrain")
    assert result.stats["fallback"] == "retrain"


class SumToo(torch.nn.Module):
    """Returns (logits, their batch sum): an output that is not one row per sample."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        out = self.lin(x)
        return out, out.sum()


def test_outputs_that_are_not_per_sample_get_no_batch_trick_and_a_named_refusal():
    torch.manual_seed(0)
    model = SumToo()
    X, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    data = torch.utils.data.TensorDataset(X, y)
    loss_fn = lambda out, t: F.cross_entropy(out[0], t)  # noqa: E731
    w = flat_params(model).clone()
    assert not mini.loss_is_a_mean(model, loss_fn, data, torch.arange(4), w)
    with pytest.raises(UnsupportedTrainingError, match="one row per sample"):
        mini.weighted_gradient_sum(model, loss_fn, data, torch.arange(8), torch.ones(8), w, batch_size=8)


def test_a_minimal_recording_of_an_lstm_is_refused_when_the_recorder_is_made():
    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = torch.nn.LSTM(3, 4, batch_first=True), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model = Recurrent()
    with pytest.raises(ValueError, match="'lstm'.*kind='full'"):
        uf.HistoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), uf.HistoryPolicy(kind="minimal"))
    uf.HistoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), uf.HistoryPolicy(kind="full"))


def test_audit_refuses_a_regression_model_and_outputs_that_are_not_class_scores():
    torch.manual_seed(0)
    X = torch.randn(40, 4)
    regression = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match="test: y must be integer class labels"):
        uf.audit(regression, regression, regression, test=(X, torch.randn(40, 1)), forget=(X, torch.randn(40, 1)),
                 heldout=(X, torch.randn(40, 1)))
    labels = torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match=r"test: the model must return class scores .* got a tensor of shape \(2, 1\)"):
        uf.audit(regression, regression, regression, test=(X, labels), forget=(X, labels), heldout=(X, labels))


class Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bag, self.out = torch.nn.EmbeddingBag(50, 8, mode="mean"), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.bag(x))


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.enc(x).mean(1))


def test_newton_runs_through_attention_and_refuses_what_has_no_second_derivative_by_name():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (60,))
    encoder = torch.utils.data.TensorDataset(torch.randn(60, 4, 8), y)
    result = uf.unlearn(Encoder(), None, [0, 1], encoder, F.cross_entropy, method="newton", damping=1.0)  # (SDPA's fused backward has no derivative)
    assert result.stats["residuals"][0] < 1e-5
    bags = torch.utils.data.TensorDataset(torch.randint(0, 50, (60, 5)), y)
    with pytest.raises(UnsupportedTrainingError, match="_embedding_bag_backward"):
        uf.unlearn(Bag(), None, [0, 1], bags, F.cross_entropy, method="newton", damping=1.0)
