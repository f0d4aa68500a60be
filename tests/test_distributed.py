"""DDP (gloo, 2 CPU processes): rank 0 records the world batches; a single-process retrain replays the run."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast.history import GradientHistory, flat_params
from unlearn_fast.integrations import distributed as ufd
from unlearn_fast.methods import retrain

WORLD, PER_RANK, EPOCHS, N = 2, 4, 2, 48
TOL = 1e-5  # float32 weights of size ~0.3: the replay sums a world batch in another order than DDP's all-reduce


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 6, generator=g)
    y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()
    return torch.utils.data.TensorDataset(X, y)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _optimizer(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)


class _Indexed(torch.utils.data.Dataset):  # sample i -> (i, x, y)
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return (i, *self.ds[i])


def _worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        ds, net = _data(), _net()
        model = torch.nn.parallel.DistributedDataParallel(net)
        opt, sched = _optimizer(net)
        rec = ufd.DistributedRecorder(model, opt, uf.HistoryPolicy(kind="full"))
        sampler = torch.utils.data.DistributedSampler(_Indexed(ds), shuffle=True, seed=3)
        loader = torch.utils.data.DataLoader(_Indexed(ds), batch_size=PER_RANK, sampler=sampler)
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            for idx, x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                rec.record(idx)
                opt.step()
                sched.step()
        torch.save(net.state_dict(), os.path.join(out, f"final_{rank}.pt"))
        history = rec.finish(ds, F.cross_entropy)
        if rank == 0:
            history.save(os.path.join(out, "history"))
        else:
            assert history is None
        # unequal per-rank batch sizes: refused on every rank (none left waiting in a collective)
        rec2 = ufd.DistributedRecorder(model, opt)
        try:
            rec2.record(torch.arange(3 + rank))
        except ValueError as err:
            with open(os.path.join(out, f"unequal_{rank}.txt"), "w") as f:
                f.write(str(err))
        # clipping after DDP's all-reduce: refused on every rank (the recorder's own check would see every step as edited)
        idx, x, y = next(iter(loader))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
        try:
            rec2.record(idx)
        except ValueError as err:
            with open(os.path.join(out, f"clipped_{rank}.txt"), "w") as f:
                f.write(str(err))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run():
    with tempfile.TemporaryDirectory() as out:
        # One retry, in a fresh rendezvous: once in about ten full-suite runs on the 2-core CI box a gloo rank died
        # with "terminate called without an active exception" (SIGABRT) before the test body ran; a second abort fails.
        for attempt in range(2):
            try:
                mp.spawn(_worker, args=(os.path.join(out, f"init{attempt}"), out), nprocs=WORLD, join=True)
                break
            except mp.ProcessExitedException:
                if attempt == 1:
                    raise
        finals = [torch.load(os.path.join(out, f"final_{r}.pt")) for r in range(WORLD)]
        def message(name):
            path = os.path.join(out, name)
            return open(path).read() if os.path.exists(path) else None

        refusals = {kind: [message(f"{kind}_{r}.txt") for r in range(WORLD)] for kind in ("unequal", "clipped")}
        yield GradientHistory.load(os.path.join(out, "history")), finals, refusals


def _trained(state):
    net = _net()
    net.load_state_dict(state)
    return net


def test_history_of_the_world_batches(ddp_run):
    history, finals, _ = ddp_run
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])  # DDP keeps the ranks equal
    assert history.meta["distributed"]["world_size"] == WORLD
    assert [s[0] for s in history.meta["param_spec"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no "module." prefix
    batches = history.schedule["batches"]
    assert len(batches) == EPOCHS * N // (WORLD * PER_RANK)
    assert all(len(b) == WORLD * PER_RANK for b in batches)
    for e in range(EPOCHS):  # each epoch's world batches cover the data set once
        assert sorted(torch.cat(batches[e * 6 : (e + 1) * 6]).tolist()) == list(range(N))


def test_single_process_replay_equals_ddp(ddp_run):
    history, finals, _ = ddp_run
    trained = _trained(finals[0])
    replayed, _ = retrain.run(copy.deepcopy(trained), history, torch.zeros(0, dtype=torch.int64), _data(), F.cross_entropy)
    dw = float((flat_params(replayed) - flat_params(trained)).abs().max())
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    assert dw < TOL < moved / 100, (dw, moved)


def _hand_retrain(history, forget):
    """Plain single-process loop over the recorded world batches without `forget`: mean loss, SGD step.
    (Measured: equal to uf.unlearn's retrain bit for bit; the replay forgetting nothing is 6e-8 from DDP, and a
    history of rank 0's indices alone would be 0.25 away.)"""
    ds, net = _data(), _net()
    opt, _ = _optimizer(net)
    X, y = ds.tensors
    keep = torch.ones(N, dtype=torch.bool)
    keep[forget] = False
    for batch, lr in zip(history.schedule["batches"], history.schedule["lrs"][:, 0].tolist()):
        rem = batch[keep[batch]]
        if rem.numel() == 0:
            continue
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        F.cross_entropy(net(X[rem]), y[rem]).backward()
        opt.step()
    return net


def test_forgetting_matches_hand_written_retrain(ddp_run):
    history, finals, _ = ddp_run
    trained = _trained(finals[0])
    forget = [0, 5, 17, 30, 41]
    result = uf.unlearn(trained, history, forget, _data(), F.cross_entropy, method="retrain")
    reference = _hand_retrain(history, torch.tensor(forget))
    dw = float((flat_params(result.model) - flat_params(reference)).abs().max())
    moved = float((flat_params(reference) - flat_params(trained)).abs().max())  # forgetting changed the model
    assert dw < TOL < moved / 100, (dw, moved)


def test_unequal_rank_batches_refused_on_every_rank(ddp_run):
    for message in ddp_run[2]["unequal"]:
        assert message is not None and "per-rank batch sizes [3, 4]" in message


def test_clipping_after_the_all_reduce_refused_on_every_rank(ddp_run):
    for message in ddp_run[2]["clipped"]:
        assert message is not None and "changed after DDP's all-reduce" in message and "clipping" in message


def test_world_size_check(ddp_run):
    history = ddp_run[0]
    assert ufd.recorded_world_size(history) == WORLD
    ufd.check_world_size(history, WORLD)
    with pytest.raises(ValueError, match="recorded with world size 2, used under world size 1"):
        ufd.check_world_size(history)  # no process group here: world size 1
    single = copy.copy(history)
    single.meta = {k: v for k, v in history.meta.items() if k != "distributed"}
    with pytest.raises(ValueError, match="recorded with world size 1, used under world size 2"):
        ufd.check_world_size(single, 2)


def test_recorder_needs_ddp_and_a_process_group():
    net = _net()
    opt, _ = _optimizer(net)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        ufd.DistributedRecorder(net, opt)
