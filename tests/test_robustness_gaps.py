"""Robustness gaps closed together: an FSDP2 shard recording refuses sparse gradients and parameters without one by
name (as HistoryRecorder handles them), an empty forget set is checked like any request, a corrupted chunk file
never yields a result, class labels passed to record() for sample indices are named at finish(), and a fallback that
cannot run is refused before the first method runs."""
import copy
import os
import re
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast.history import flat_params

LOSS = F.cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- 1. ShardedRecorder (FSDP2, one gloo rank)
class SparseEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, sparse=True)
        self.out = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.emb(x))


class UnusedHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 3)
        self.aux = torch.nn.Linear(6, 3)  # never used by forward

    def forward(self, x):
        return self.body(x)


def _one_step(net, opt, rec):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    rec.record(torch.arange(4))
    opt.step()


def _sharded_worker(rank, init_file, out):
    from torch.distributed.fsdp import fully_shard

    from unlearn_fast.integrations import distributed as ufd

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=1)
    torch.set_num_threads(1)

    def message(name, fn):
        try:
            fn()
            text = "accepted"
        except Exception as err:  # noqa: BLE001 (the test reads its type and text)
            text = f"{type(err).__name__}: {err}"
        with open(os.path.join(out, name), "w") as f:
            f.write(text)

    try:
        torch.manual_seed(0)
        net = fully_shard(SparseEmbedding())
        message("sparse", lambda: ufd.ShardedRecorder(net, torch.optim.SGD(net.parameters(), lr=0.1)))
        net = fully_shard(UnusedHead())
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        rec = ufd.ShardedRecorder(net, opt)
        message("grad_none", lambda: _one_step(net, opt, rec))
        rec.close()
        # what the refusal advises: the head frozen before the recorder is created
        net.aux.requires_grad_(False)
        rec = ufd.ShardedRecorder(net, opt)
        message("frozen", lambda: _one_step(net, opt, rec))
        del rec, net, opt
    finally:
        dist.destroy_process_group()
    # as tests/test_fsdp.py's ranks: fully_shard's gloo threads outlive the group; leave without finalization
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def sharded_refusals(one_thread):
    with tempfile.TemporaryDirectory() as out:
        # (forked, not spawned: the rank needs no fresh interpreter, and importing torch again took 3.4 of its 6 s; one torch thread, as
        # tests/conftest.py keeps it, so no OpenMP pool is touched in the child)
        mp.start_processes(_sharded_worker, args=(os.path.join(out, "init"), out), nprocs=1, join=True, start_method="fork")
        yield {name: open(os.path.join(out, name)).read() for name in ("sparse", "grad_none", "frozen")}


def test_sharded_recorder_refuses_a_sparse_embedding_when_created(sharded_refusals):
    # before: accepted, then backward crashed inside FSDP2 (NotImplementedError: fsdp::chunk_cat ... 'SparseCPU' backend)
    assert sharded_refusals["sparse"].startswith("ValueError: ShardedRecorder: parameter 'emb.weight' gets sparse gradients "
                                                 "(Embedding(sparse=True))"), sharded_refusals["sparse"]


def test_sharded_recorder_refuses_a_parameter_without_gradient_by_name(sharded_refusals):
    # before: "record: step 0: no backward reached the model on ranks [0] since the last step", though it reached the body
    message = sharded_refusals["grad_none"]
    assert message.startswith("ValueError: record: step 0: parameter 'aux.weight' has no gradient (.grad is None) on ranks [0]"), message
    assert "Freeze it (requires_grad=False)" in message and "history not extended" in message
    assert sharded_refusals["frozen"] == "accepted"


# ----------------------------------------------------------------------------- shared: a small recorded run
N, D, C = 96, 6, 3


def small_data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return torch.utils.data.TensorDataset(X, (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long())


def record_small(policy):
    data = small_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    rec = uf.HistoryRecorder(model, opt, policy)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for idx in torch.randperm(N, generator=gen).split(12):
            opt.zero_grad()
            LOSS(model(data.tensors[0][idx]), data.tensors[1][idx]).backward()
            rec.record(idx, batch_size=len(idx))
            opt.step()
    return data, model, rec.finish(data, LOSS)


def fresh(history):
    """A copy of the shared history with its own empty request log, saved nowhere (as tests/test_storage.py's)."""
    h = copy.copy(history)
    h.requests, h.path = [], None
    return h


@pytest.fixture(scope="module")
def recorded(one_thread):
    return record_small(uf.HistoryPolicy(kind="full", codec="fp32"))


# ----------------------------------------------------------------------------- 2. an empty forget set
def test_an_empty_request_returns_an_unchanged_copy(recorded):
    data, model, history = recorded
    result = uf.unlearn(model, history, [], data, LOSS, method="retrain")
    assert torch.equal(flat_params(result.model), flat_params(model)) and result.model is not model
    assert result.stats == {"method": "retrain", "forgotten": 0}
    assert history.requests == []  # nothing served, nothing logged


@pytest.mark.parametrize("method", ["retrain", "deltagrad", "rewind"])
def test_an_empty_request_checks_train_set_and_history_like_any_request(recorded, method):
    data, model, history = recorded
    short = torch.utils.data.TensorDataset(*(t[: N - 6] for t in data.tensors))
    for forget in ([], [0]):  # (before: the empty request returned the model as if served)
        with pytest.raises(ValueError, match=rf"^train_set: has {N - 6} samples, the history was recorded on a training set of {N}"):
            uf.unlearn(model, history, forget, short, LOSS, method=method)
        with pytest.raises(ValueError, match=rf"^{method}: history must be a GradientHistory .* got NoneType"):
            uf.unlearn(model, None, forget, data, LOSS, method=method)
        with pytest.raises(TypeError, match="unexpected keyword argument 'T00'"):
            uf.unlearn(model, history, forget, data, LOSS, method=method, T00=3)


def test_a_request_for_every_trained_sample_is_refused_where_training_used_part_of_train_set(one_thread):
    # training used the first 2/3 of train_set: forgetting all of them leaves nothing trained on (Mini on a minimal
    # history reported it unlearned, barely moved); a complex index is no index either
    data = small_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(D, C).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal"))
    used = 2 * N // 3
    for idx in torch.arange(used).split(12):
        opt.zero_grad()
        LOSS(model(data.tensors[0][idx]), data.tensors[1][idx]).backward()
        rec.record(idx)
        opt.step()
    history = rec.finish(data, LOSS)
    for method in ("mini", "rewind"):
        with pytest.raises(ValueError, match=f"forget: names every one of the {used} samples training used"):
            uf.unlearn(model, fresh(history), torch.arange(used), data, LOSS, method=method)
    with pytest.raises(ValueError, match="complex64"):
        uf.unlearn(model, fresh(history), torch.tensor([1.7 + 5j]), data, LOSS, method="mini")


def test_arguments_of_the_wrong_kind_are_refused_naming_them(recorded):
    data, model, history = recorded
    with pytest.raises(ValueError, match="model: must be the trained nn.Module, got NoneType"):
        uf.unlearn(None, fresh(history), [0], data, LOSS, method="retrain")
    with pytest.raises(ValueError, match="loss_fn: method 'retrain' needs the training loss"):
        uf.unlearn(model, fresh(history), [0], data, None, method="retrain")
    with pytest.raises(ValueError, match="train_set: must be a map-style data set .* got Tensor"):
        uf.unlearn(model, fresh(history), [0], data.tensors[0], LOSS, method="retrain")


def test_a_fallback_that_cannot_run_is_refused_before_the_first_method_runs(monkeypatch, one_thread):
    """A fallback whose history section is missing (deltagrad on a "minimal" history) or whose options it does not take
    is refused when the request is made: before, it failed only once the first method had given up, maybe minutes later."""
    from unlearn_fast.methods import mini

    data, model, history = record_small(uf.HistoryPolicy(kind="minimal"))
    ran = []
    monkeypatch.setattr(mini, "run", lambda *args, **kwargs: ran.append(1))
    with pytest.raises(ValueError, match=r"^fallback: deltagrad needs the history's trajectory: record with HistoryPolicy\(kind='full'\)"):
        uf.unlearn(model, history, [0, 1], data, LOSS, method="mini", fallback="deltagrad")
    with pytest.raises(TypeError, match="unexpected keyword argument 'T00'"):
        uf.unlearn(model, history, [0, 1], data, LOSS, method="mini", fallback="retrain", fallback_options={"T00": 3})
    with pytest.raises(ValueError, match=r"^deltagrad needs the history's trajectory"):  # (the method itself: as before)
        uf.unlearn(model, history, [0, 1], data, LOSS, method="deltagrad")
    assert ran == [] and history.requests == []


def test_a_method_that_cannot_model_the_run_hands_over_to_the_named_fallback(one_thread):
    """Mini refuses AdamW and deltagrad batch norm (UnsupportedTrainingError, a ValueError as before); with fallback=
    the fallback now runs on them, as on any "not unlearned" (before: the ValueError ended the request). Bad input still
    raises whatever the fallback."""
    data = small_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, C)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="fp32"))
    for idx in torch.randperm(N, generator=torch.Generator().manual_seed(1)).split(12):
        opt.zero_grad()
        LOSS(model(data.tensors[0][idx]), data.tensors[1][idx]).backward()
        rec.record(idx, batch_size=len(idx))
        opt.step()
    history = rec.finish(data, LOSS)
    retrained = uf.unlearn(model, fresh(history), [3, 4], data, LOSS, method="retrain").model
    for method, refusal in (("mini", "has batch norm"), ("deltagrad", "has batch norm")):
        with pytest.raises(uf.UnsupportedTrainingError, match=refusal) as err:
            uf.unlearn(model, fresh(history), [3, 4], data, LOSS, method=method)
        assert isinstance(err.value, ValueError)
        with pytest.warns(RuntimeWarning, match=rf"^{method}: not unlearned \(model: has batch norm .*running fallback method 'retrain'"):
            result = uf.unlearn(model, fresh(history), [3, 4], data, LOSS, method=method, fallback="retrain")
        assert result.stats["fallback"] == "retrain" and refusal in result.stats[method]["reason"]
        assert torch.equal(flat_params(result.model), flat_params(retrained))
    from unlearn_fast.methods.mini import sgd_settings

    with pytest.raises(uf.UnsupportedTrainingError, match=r"^mini: models SGD training .*AdamW"):  # (what Mini refuses next)
        sgd_settings(history.meta, "mini")
    short = torch.utils.data.TensorDataset(*(t[: N - 6] for t in data.tensors))
    with pytest.raises(ValueError, match="^train_set: has"):  # bad input: no fallback
        uf.unlearn(model, fresh(history), [3, 4], short, LOSS, method="mini", fallback="retrain")


# ----------------------------------------------------------------------------- 3. a corrupted chunk file
def _largest_object(path):
    current = open(os.path.join(path, "CURRENT")).read().split("\n")[0]
    manifest = re.search(r'"manifest": ?"([0-9a-f]+)"', current).group(1)
    names = [n for n in os.listdir(os.path.join(path, "objects")) if n != manifest]
    return max(names, key=lambda n: os.path.getsize(os.path.join(path, "objects", n)))


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_corrupted_chunk_never_yields_a_result(tmp_path, recorded, damage):
    data, model, history = recorded
    path = fresh(history).save(str(tmp_path / "h"))
    name = _largest_object(path)
    assert name == uf.GradientHistory.load(path).trajectory["g"].parts[0][1].part["data"]  # the gradient rows' chunk
    fpath = os.path.join(path, "objects", name)
    raw = bytearray(open(fpath, "rb").read())
    if damage == "flipped":
        for k in range(len(raw) // 2, len(raw) // 2 + 8):
            raw[k] ^= 0x5A
        open(fpath, "wb").write(bytes(raw))
    else:
        os.truncate(fpath, len(raw) // 2)
    forget = [0, 5, 17]
    corrupted = rf"^history: {re.escape(fpath)} is corrupted \(xxh3-128 mismatch\)"
    # rows are verified when a method first reads their chunk (load reads and verifies the schedule only)
    for method in ("deltagrad", "rewind"):
        with pytest.raises(ValueError, match=corrupted):
            uf.unlearn(model, uf.GradientHistory.load(path), forget, data, LOSS, method=method)
    # retrain reads no rows: its result is the intact history's, bit for bit
    got = uf.unlearn(model, uf.GradientHistory.load(path), forget, data, LOSS, method="retrain").model
    assert torch.equal(flat_params(got), flat_params(uf.unlearn(model, fresh(history), forget, data, LOSS, method="retrain").model))


# ----------------------------------------------------------------------------- 4. labels passed for sample indices
@pytest.fixture(scope="module")
def digits():
    from unlearn_fast.workloads import load_data

    X, y, _, _ = load_data("digits")  # 1437 training samples, labels 0..9
    return torch.utils.data.TensorDataset(X, y)


def record_digits(ds, batch, steps=40, allow=(), labels=True, replacement=False):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), allow=allow)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(ds), (batch,), generator=gen) if replacement else torch.randperm(len(ds), generator=gen)[:batch]
        x, y = ds[idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.record(y if labels else idx, batch_size=len(y))
        opt.step()
    return rec.finish(ds, F.cross_entropy)


def test_labels_for_indices_are_named_when_finish_refuses(digits):
    # one sample a step: labels never repeat within a batch, so record() cannot tell; finish() refused through its loss
    # check alone before ("loss_fn on train_set does not reproduce step 0's gradient")
    with pytest.raises(ValueError, match=r"^finish: batch_indices may be class labels, not sample indices: the 40 indices record\(\) got over "
                                         r"40 steps name only 10 distinct samples of train_set's 1437, all below 10; .* What failed: finish: "
                                         r"loss_fn on train_set does not reproduce step 0's gradient"):
        record_digits(digits, 1)
    with pytest.raises(ValueError, match=r"^finish: batch_indices may be class labels.* What failed: loss_fn: gives"):
        record_digits(digits, 64, allow=("repeated_samples",))


def test_labels_for_indices_are_warned_about_where_allow_skips_the_check(digits):
    # allow=("augmentation",) skips the step-0 gradient check: before, finish() returned a history of samples 0..9
    with pytest.warns(UserWarning, match=r"^finish: batch_indices may be class labels, not sample indices"):
        history = record_digits(digits, 1, allow=("augmentation",))
    assert int(history.seen_mask().sum()) == 10


def test_sampling_with_replacement_is_neither_refused_nor_warned_about(digits):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = record_digits(digits, 64, allow=("repeated_samples",), labels=False, replacement=True)
        record_digits(digits, 1, steps=60, labels=False)
    assert int(history.seen_mask().sum()) > 1000
