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

from dist_setup import EPOCHS, N, PER_RANK, TOL, WORLD  # noqa: E402  (tests/ is on sys.path, also in spawned ranks)
from dist_setup import data as _data  # noqa: E402
from dist_setup import hand_retrain as _hand_retrain  # noqa: E402
from dist_setup import net as _net  # noqa: E402
from dist_setup import optimizer as _optimizer  # noqa: E402
from dist_setup import CHUNK, FLUSH_AT, STEPS, die, spawn_killed  # noqa: E402
from dist_setup import loader as _loader  # noqa: E402
from dist_setup import steps as _steps  # noqa: E402
from dist_setup import train as _train_steps  # noqa: E402
from dist_setup import dropout_net as _dropout_net  # noqa: E402
from dist_setup import dropout_model as _dropout_model  # noqa: E402


def _worker(rank, init_file, out, work=None):
    # (ufd, imported with this module, imported torch.distributed.nn.functional before this init: see _teardown)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        (work or _work)(rank, out)  # _work, or the resumed run's
    finally:
        _teardown(rank, out)


def _gloo_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


def _teardown(rank, out):
    """The models, recorders and hooks of _work are gone (gc for their cycles) before destroy_process_group, so the
    process group is destroyed here and its gloo threads are joined while the interpreter is alive. A gloo thread
    alive at interpreter exit that still has to take the GIL aborts the process ("terminate called without an active
    exception", SIGABRT: the fixture's former flake); test_no_gloo_thread_outlives_the_process_group checks none is."""
    import gc

    gc.collect()
    dist.destroy_process_group()
    gc.collect()
    if os.path.isdir("/proc/self/task"):
        with open(os.path.join(out, f"threads_{rank}.txt"), "w") as f:
            f.write(" ".join(_gloo_threads()) or "none")


def _work(rank, out):
    ds, net = _data(), _net()
    # buckets of ~200 bytes: each parameter is all-reduced in its own bucket, and the comm hook's callbacks run
    # concurrently on gloo's worker threads (the recorder's norm bookkeeping must not race)
    model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=2e-4)
    opt, sched = _optimizer(net.parameters())
    # streamed to disk (rank 0): the history written there carries the world size as well
    rec = ufd.DistributedRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=os.path.join(out, "streamed"))
    sampler = torch.utils.data.DistributedSampler(uf.IndexedDataset(ds), shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(uf.IndexedDataset(ds), batch_size=PER_RANK, sampler=sampler)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for idx, x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.record(idx)
            opt.step()
            sched.step()
    _finish(rec, net, ds, out, rank)
    _replays(rank, model, out)
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
    # two backward passes (accumulation) without allow=('accumulation',): refused on every rank (until 2026-12-06 by rank
    # 0's recorder alone, the other rank then waiting in the next collective)
    rec3 = ufd.DistributedRecorder(model, opt)
    opt.zero_grad()
    with model.no_sync():
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    F.cross_entropy(model(x[2:]), y[2:]).backward()
    _message(lambda: rec3.record(idx), out, f"accumulated_{rank}.txt")
    _dropout_run(rank, out)


def _finish(rec, net, ds, out, rank, prefix=""):
    """Every rank's final weights saved (<prefix>final_<rank>.pt), the history rank 0 finished saved (<prefix>history)
    and loaded back on every rank."""
    torch.save(net.state_dict(), os.path.join(out, f"{prefix}final_{rank}.pt"))
    history = rec.finish(ds, F.cross_entropy)
    if rank == 0:
        history.save(os.path.join(out, f"{prefix}history"))
    else:
        assert history is None
    dist.barrier()
    return GradientHistory.load(os.path.join(out, f"{prefix}history"))


def _dropout_run(rank, out):
    """Dropout under DDP: every rank draws its masks from its own generator (seeded per rank here); the recording keeps
    each rank's state of every step (refused until 2026-12-05: no replay could redraw the masks)."""
    ds, net = _data(), _dropout_net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(100 + rank)  # (after the net's own seeding)
    opt, sched = _optimizer(net.parameters())
    rec = ufd.DistributedRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=os.path.join(out, "dropout_streamed"))
    _train_steps(model, opt, sched, rec, _steps(*_loader(ds)))
    torch.save(net.state_dict(), os.path.join(out, f"dropout_final_{rank}.pt"))
    rec.finish(ds, F.cross_entropy)
    dist.barrier()
    history = GradientHistory.load(os.path.join(out, "dropout_streamed"))
    for name, forget in (("none", []), ("forget", FORGET)):
        replayed, _ = ufd.run(_dropout_net(), history, torch.tensor(forget, dtype=torch.int64), ds, F.cross_entropy)
        torch.save(replayed.state_dict(), os.path.join(out, f"dropout_replay_{name}_{rank}.pt"))
    ufd.DistributedRecorder(model, opt, allow=("dropout",)).close()  # declared: recorded without the states
    _dropout_accumulated_run(rank, out)


def _two_dropout_net(state=None):
    """Two dropout layers: a rank part forwarded at once draws the second layer's masks after all of the first's, its
    micro-batches one by one draw them in between (one dropout layer would draw the same sequence either way on CPU)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                              torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    if state is not None:
        net.load_state_dict(state)
    return net


def _dropout_accumulated_run(rank, out):
    """Dropout with gradient accumulation under DDP (refused until 2026-12-06): each rank's batch as 2 micro-batches, the
    first under no_sync, each loss / 2; every rank's micro-batches are kept with the step and replayed one by one, the
    second drawing its masks on from where the first left the rank's generator."""
    ds, net = _data(), _two_dropout_net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(200 + rank)
    opt, sched = _optimizer(net.parameters())
    rec = ufd.DistributedRecorder(model, opt, uf.HistoryPolicy(kind="full"), allow=("accumulation",))
    for _, idx, x, y in _steps(*_loader(ds)):
        opt.zero_grad()
        with model.no_sync():
            (F.cross_entropy(model(x[:2]), y[:2]) / 2).backward()
        (F.cross_entropy(model(x[2:]), y[2:]) / 2).backward()
        rec.record(idx)
        opt.step()
        sched.step()
    history = _finish(rec, net, ds, out, rank, "accumulated_")
    for name, forget in (("none", []), ("forget", FORGET)):
        replayed, _ = ufd.run(_two_dropout_net(), history, torch.tensor(forget, dtype=torch.int64), ds, F.cross_entropy)
        torch.save(replayed.state_dict(), os.path.join(out, f"accumulated_replay_{name}_{rank}.pt"))


FORGET = [0, 5, 17, 30, 41]  # ~10 % of the training set


def _edge_forget(history):
    """Rank 1's whole part of step 0 (rank 1 has nothing to compute there) and all of step 3 (a skipped step)."""
    b = history.schedule["batches"]
    return sorted(set(b[0][PER_RANK:].tolist()) | set(b[3].tolist()))


def _message(fn, out, name):
    try:
        fn()
    except ValueError as err:
        with open(os.path.join(out, name), "w") as f:
            f.write(str(err))


def _replays(rank, model, out):
    """The DDP replay (every rank) of the history rank 0 saved: forgetting nothing, ~10 %, and an edge case."""
    history = GradientHistory.load(os.path.join(out, "history"))
    ds = _data()
    replayed, stats = ufd.run(_net(), history, torch.zeros(0, dtype=torch.int64), ds, F.cross_entropy)
    assert stats["steps"] == len(history.schedule["batches"])
    torch.save(replayed.state_dict(), os.path.join(out, f"replay_none_{rank}.pt"))
    for name, forget in (("forget", FORGET), ("edge", _edge_forget(history))):
        result = ufd.unlearn(model, history, forget, ds, F.cross_entropy)  # the DDP model itself: unwrapped, left untouched
        torch.save(result.model.state_dict(), os.path.join(out, f"replay_{name}_{rank}.pt"))
    # a history recorded in a single process (no distributed metadata): refused under 2 ranks, on every rank
    single = copy.copy(history)
    single.meta = {k: v for k, v in history.meta.items() if k != "distributed"}
    _message(lambda: ufd.run(_net(), single, torch.tensor(FORGET), ds, F.cross_entropy), out, f"worldsize_{rank}.txt")
    # ranks asking for different forget sets: refused on every rank (none left waiting in a collective)
    _message(lambda: ufd.run(_net(), history, torch.tensor([rank]), ds, F.cross_entropy), out, f"mismatch_{rank}.txt")


@pytest.fixture(scope="module")
def ddp_run():
    with tempfile.TemporaryDirectory() as out:
        # (no retry: the SIGABRT "terminate called without an active exception" seen once in ten full-suite runs came
        # from gloo threads outliving destroy_process_group; see _teardown and docs/distributed.md, "Teardown")
        mp.spawn(_worker, args=(os.path.join(out, "init"), out), nprocs=WORLD, join=True)
        finals = [torch.load(os.path.join(out, f"final_{r}.pt")) for r in range(WORLD)]
        def message(name):
            path = os.path.join(out, name)
            return open(path).read() if os.path.exists(path) else None

        refusals = {kind: [message(f"{kind}_{r}.txt") for r in range(WORLD)]
                    for kind in ("unequal", "clipped", "worldsize", "mismatch", "accumulated")}
        threads = [message(f"threads_{r}.txt") for r in range(WORLD)]
        replays = {kind: [torch.load(os.path.join(out, f"replay_{kind}_{r}.pt")) for r in range(WORLD)] for kind in ("none", "forget", "edge")}
        streamed = GradientHistory.load(os.path.join(out, "streamed"))
        dropout = {"history": GradientHistory.load(os.path.join(out, "dropout_streamed")),
                   "finals": [torch.load(os.path.join(out, f"dropout_final_{r}.pt")) for r in range(WORLD)],
                   **{name: [torch.load(os.path.join(out, f"dropout_replay_{name}_{r}.pt")) for r in range(WORLD)] for name in ("none", "forget")}}
        accumulated = {"history": GradientHistory.load(os.path.join(out, "accumulated_history")),
                       "finals": [torch.load(os.path.join(out, f"accumulated_final_{r}.pt")) for r in range(WORLD)],
                       **{name: [torch.load(os.path.join(out, f"accumulated_replay_{name}_{r}.pt")) for r in range(WORLD)]
                          for name in ("none", "forget")}}
        yield GradientHistory.load(os.path.join(out, "history")), finals, refusals, replays, threads, streamed, dropout, accumulated


def _trained(state):
    net = _net()
    net.load_state_dict(state)
    return net


def test_history_of_the_world_batches(ddp_run):
    history, finals = ddp_run[:2]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])  # DDP keeps the ranks equal
    assert history.meta["distributed"] == {"world_size": WORLD, "backend": "gloo", "recording_rank": 0}
    assert ddp_run[5].meta["distributed"] == history.meta["distributed"]  # the streamed copy rank 0 wrote
    assert [b.tolist() for b in ddp_run[5].schedule["batches"]] == [b.tolist() for b in history.schedule["batches"]]
    assert [s[0] for s in history.meta["param_spec"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no "module." prefix
    batches = history.schedule["batches"]
    assert len(batches) == EPOCHS * N // (WORLD * PER_RANK)
    assert all(len(b) == WORLD * PER_RANK for b in batches)
    for e in range(EPOCHS):  # each epoch's world batches cover the data set once
        assert sorted(torch.cat(batches[e * 6 : (e + 1) * 6]).tolist()) == list(range(N))


def test_single_process_replay_equals_ddp(ddp_run):
    history, finals = ddp_run[:2]
    trained = _trained(finals[0])
    replayed, _ = retrain.run(copy.deepcopy(trained), history, torch.zeros(0, dtype=torch.int64), _data(), F.cross_entropy)
    dw = float((flat_params(replayed) - flat_params(trained)).abs().max())
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    assert dw < TOL < moved / 100, (dw, moved)


def test_forgetting_matches_hand_written_retrain(ddp_run):
    history, finals = ddp_run[:2]
    trained = _trained(finals[0])
    forget = FORGET
    result = uf.unlearn(trained, history, forget, _data(), F.cross_entropy, method="retrain")
    reference = _hand_retrain(history, torch.tensor(forget))
    dw = float((flat_params(result.model) - flat_params(reference)).abs().max())
    moved = float((flat_params(reference) - flat_params(trained)).abs().max())  # forgetting changed the model
    assert dw < TOL < moved / 100, (dw, moved)


def test_unequal_rank_batches_refused_on_every_rank(ddp_run):
    for message in ddp_run[2]["unequal"]:
        assert message is not None and "per-rank batch sizes [3, 4]" in message


def test_undeclared_accumulation_refused_on_every_rank(ddp_run):
    for message in ddp_run[2]["accumulated"]:
        assert message is not None and "backward passes (gradient accumulation)" in message and "allow=('accumulation',)" in message


def test_clipping_after_the_all_reduce_refused_on_every_rank(ddp_run):
    for message in ddp_run[2]["clipped"]:
        assert message is not None and "changed after DDP's all-reduce" in message and "clipping" in message


def test_dropout_keeps_every_ranks_generator_state_and_is_replayed_exactly(ddp_run):
    run = ddp_run[6]
    history, trained = run["history"], _dropout_model(run["finals"][0])
    states = history.schedule["rng_states"]
    width = torch.get_rng_state().numel()
    assert states.shape == (STEPS, WORLD * width)
    assert not torch.equal(states[:, :width], states[:, width:])  # the ranks' generators differ (seeded per rank)
    nothing = torch.zeros(0, dtype=torch.int64)
    single, _ = retrain.run(_dropout_net(), history, nothing, _data(), F.cross_entropy)
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    assert _max_diff(single, trained) < TOL < moved / 100, (_max_diff(single, trained), moved)
    for r in range(WORLD):  # DDP replay on every rank, each drawing its own masks
        assert _max_diff(_dropout_model(run["none"][r]), trained) < TOL
    # without the states the replay draws other masks: measured 0.28 off the trained weights
    unseeded = copy.copy(history)
    unseeded.schedule = {k: v for k, v in history.schedule.items() if k != "rng_states"}
    assert _max_diff(retrain.run(_dropout_net(), unseeded, nothing, _data(), F.cross_entropy)[0], trained) > 100 * TOL


def test_dropout_with_accumulation_replays_every_ranks_micro_batches(ddp_run):
    run = ddp_run[7]
    history, trained = run["history"], _two_dropout_net(run["finals"][0])
    # every rank's 2 micro-batches of 2, rank after rank, and every rank's generator state at its first forward
    assert history.schedule["micro_counts"].tolist() == [2 * WORLD] * STEPS and set(history.schedule["micro_sizes"].tolist()) == {2}
    assert history.schedule["rng_states"].shape == (STEPS, WORLD * torch.get_rng_state().numel())
    nothing = torch.zeros(0, dtype=torch.int64)
    single, _ = retrain.run(_two_dropout_net(), history, nothing, _data(), F.cross_entropy)
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    assert _max_diff(single, trained) < TOL < moved / 100, (_max_diff(single, trained), moved)
    for r in range(WORLD):
        assert _max_diff(_two_dropout_net(run["none"][r]), trained) < TOL
    # each rank's part forwarded at once (the one-batch replay of before): other masks for its second micro-batch
    whole = GradientHistory(history.meta, {k: v for k, v in history.schedule.items() if k not in ("micro_counts", "micro_sizes")})
    assert _max_diff(retrain.run(_two_dropout_net(), whole, nothing, _data(), F.cross_entropy)[0], trained) > 100 * TOL
    forgot = uf.unlearn(trained, history, FORGET, _data(), F.cross_entropy, method="retrain").model
    assert _max_diff(forgot, trained) > 100 * TOL
    for r in range(WORLD):  # forgetting: the DDP replay and the single-process one agree
        assert _max_diff(_two_dropout_net(run["forget"][r]), forgot) < TOL


def test_dropout_forgetting_replays_the_same_under_ddp_and_in_one_process(ddp_run):
    run = ddp_run[6]
    history, trained = run["history"], _dropout_model(run["finals"][0])
    single = uf.unlearn(trained, history, FORGET, _data(), F.cross_entropy, method="retrain").model
    assert _max_diff(single, trained) > 100 * TOL  # forgetting moved the model
    for r in range(WORLD):
        assert _max_diff(_dropout_model(run["forget"][r]), single) < TOL


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
    opt, _ = _optimizer(net.parameters())
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        ufd.DistributedRecorder(net, opt)


def _max_diff(a, b):
    return float((flat_params(a) - flat_params(b)).abs().max())


def test_ddp_replay_ranks_end_equal(ddp_run):
    for kind, states in ddp_run[3].items():
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), kind


def test_ddp_replay_forgetting_nothing_equals_training_and_single_process_replay(ddp_run):
    history, finals, _, replays = ddp_run[:4]
    trained, ddp = _trained(finals[0]), _trained(replays["none"][0])
    single, _ = retrain.run(_net(), history, torch.zeros(0, dtype=torch.int64), _data(), F.cross_entropy)
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    assert _max_diff(ddp, trained) < TOL < moved / 100, (_max_diff(ddp, trained), moved)
    assert _max_diff(ddp, single) < TOL


@pytest.mark.parametrize("kind", ["forget", "edge"])
def test_ddp_replay_forgetting_equals_single_process_and_hand_retrain(ddp_run, kind):
    history, finals, _, replays = ddp_run[:4]
    forget = FORGET if kind == "forget" else _edge_forget(history)
    if kind == "edge":  # rank 1 retains nothing of step 0, and step 3 is forgotten whole
        assert len(forget) == PER_RANK + WORLD * PER_RANK
    trained, ddp = _trained(finals[0]), _trained(replays[kind][0])
    single = uf.unlearn(trained, history, forget, _data(), F.cross_entropy, method="retrain").model
    hand = _hand_retrain(history, torch.tensor(forget))
    moved = _max_diff(hand, trained)  # forgetting changed the model
    assert _max_diff(ddp, hand) < TOL < moved / 100, (_max_diff(ddp, hand), moved)
    assert _max_diff(ddp, single) < TOL


def test_ddp_replay_refuses_another_world_size_on_every_rank(ddp_run):
    for message in ddp_run[2]["worldsize"]:
        assert message is not None and "recorded with world size 1, used under world size 2" in message


def test_ddp_replay_refuses_ranks_with_different_forget_sets(ddp_run):
    for message in ddp_run[2]["mismatch"]:
        assert message is not None and "ranks [1] replay another history or forget set than rank 0" in message


def test_ddp_replay_needs_a_process_group():
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        ufd.run(_net(), None, torch.tensor([0]), _data(), F.cross_entropy)  # (checked before the history)


def test_no_gloo_thread_outlives_the_process_group(ddp_run):
    """After _teardown no gloo thread is left to meet interpreter finalization (the cause of the SIGABRT flake).
    Fails without ufd's early import of torch.distributed.nn.functional (its defaults then pin the process group)."""
    for threads in ddp_run[4]:
        assert threads in ("none", None), threads  # None: no /proc (not Linux)


# ----------------------------------------------------------------------------- a streamed DDP recording, killed and resumed
def _stopped_worker(rank, init_file, out):
    """Trains the run of _work, streaming its recording to out/rec in chunks of CHUNK steps, flushes and saves a
    checkpoint after FLUSH_AT steps, and is killed after the last step (no finish, no close)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    ds, net = _data(), _net()
    model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=2e-4)
    opt, sched = _optimizer(net.parameters())
    if rank == 0:  # a single-process recording (no distributed metadata: world size 1) of one flushed step
        solo = _net()
        solo_opt, _ = _optimizer(solo.parameters())
        single = uf.HistoryRecorder(solo, solo_opt, uf.HistoryPolicy(kind="full"), path=os.path.join(out, "single"))
        X, y = ds.tensors
        F.cross_entropy(solo(X[:4]), y[:4]).backward()
        single.record(torch.arange(4))
        solo_opt.step()
        single.flush()
        single.close()
    rec = ufd.DistributedRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=os.path.join(out, "rec"))
    if rank == 0:
        rec.recorder.chunk_steps = CHUNK
    sampler, loader = _loader(ds)
    for step, idx, x, y in _steps(sampler, loader):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.record(idx)
        opt.step()
        sched.step()
        if step + 1 == FLUSH_AT:
            rec.flush()  # every rank: the trainer's checkpoint comes with a flush
            if rank == 0:
                torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, os.path.join(out, "ckpt.pt"))
    if rank == 0:
        rec.recorder._writer.join()  # the sealed chunks are on disk (a kill mid-write keeps the earlier ones: store.py)
    die()


def _resume_work(rank, out):
    """New processes: the refusals, then the checkpoint loaded, the recording resumed and the run trained to its end."""
    ds, net = _data(), _net()
    model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=2e-4)
    opt, sched = _optimizer(net.parameters())
    root = os.path.join(out, "rec")
    _message(lambda: ufd.DistributedRecorder.resume(os.path.join(out, "single"), model, opt), out, f"worldsize_{rank}.txt")
    _message(lambda: ufd.DistributedRecorder.resume(root, model, opt), out, f"weights_{rank}.txt")  # untrained weights
    # one process per group (a world size of 1) resuming the 2-rank recording
    alone = [dist.new_group([r]) for r in range(WORLD)][rank]
    lone = torch.nn.parallel.DistributedDataParallel(_net(), process_group=alone)
    _message(lambda: ufd.DistributedRecorder.resume(root, lone, _optimizer(lone.parameters())[0], group=alone), out, f"alone_{rank}.txt")
    state = torch.load(os.path.join(out, "ckpt.pt"))
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rec = ufd.DistributedRecorder.resume(root, model, opt)
    with open(os.path.join(out, f"resumed_at_{rank}.txt"), "w") as f:
        f.write(str(rec.steps))
    sampler, loader = _loader(ds)
    for _, idx, x, y in _steps(sampler, loader, start=FLUSH_AT):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.record(idx)
        opt.step()
        sched.step()
    torch.save(net.state_dict(), os.path.join(out, f"final_{rank}.pt"))
    rec.finish(ds, F.cross_entropy)
    _message(rec.flush, out, f"flush_{rank}.txt")  # a finished recorder: refused on every rank
    del rec, lone, model, opt, sched


@pytest.fixture(scope="module")
def ddp_resumed():
    with tempfile.TemporaryDirectory() as out:
        spawn_killed(_stopped_worker, (os.path.join(out, "init1"), out))
        root = os.path.join(out, "rec")
        killed = GradientHistory.load(root)  # read now: the resume truncates it
        partial = {"complete": killed.complete, "chunk_steps": killed.chunk_steps, "batches": killed.schedule["batches"],
                   "g": killed.trajectory["g"].all().clone()}
        mp.spawn(_worker, args=(os.path.join(out, "init2"), out, _resume_work), nprocs=WORLD, join=True)

        def message(name):
            path = os.path.join(out, name)
            return open(path).read() if os.path.exists(path) else None

        yield {"partial": partial, "history": GradientHistory.load(root), "root": root, "single": os.path.join(out, "single"),
               "finals": [torch.load(os.path.join(out, f"final_{r}.pt")) for r in range(WORLD)],
               "messages": {kind: [message(f"{kind}_{r}.txt") for r in range(WORLD)] for kind in ("worldsize", "weights", "alone", "flush", "resumed_at", "threads")}}


def _dropout_stopped(rank, out):
    """The dropout run of _dropout_run streamed to out/dropout_rec, flushed with a checkpoint (its generator state
    included) after FLUSH_AT steps and stopped there (closed, as a job ends)."""
    ds, net = _data(), _dropout_net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt, sched = _optimizer(net.parameters())
    torch.manual_seed(100 + rank)
    rec = ufd.DistributedRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=os.path.join(out, "dropout_rec"))
    _train_steps(model, opt, sched, rec, _steps(*_loader(ds), stop=FLUSH_AT))
    rec.flush()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state()},
               os.path.join(out, f"dropout_ckpt_{rank}.pt"))
    rec.close()


def _dropout_resumed(rank, out):
    """New processes: the checkpoint loaded (each rank's generator too), the recording resumed, flushed at once, trained to the end."""
    ds, net = _data(), _dropout_net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt, sched = _optimizer(net.parameters())
    state = torch.load(os.path.join(out, f"dropout_ckpt_{rank}.pt"))
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    rec = ufd.DistributedRecorder.resume(os.path.join(out, "dropout_rec"), model, opt)
    rec.flush()  # (a flush before any resumed step: an empty chunk whose state rows must have the ranks' width)
    _train_steps(model, opt, sched, rec, _steps(*_loader(ds), start=FLUSH_AT))
    torch.save(net.state_dict(), os.path.join(out, f"dropout_resumed_final_{rank}.pt"))
    rec.finish(ds, F.cross_entropy)


def test_a_resumed_dropout_recording_replays_its_run_exactly():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(os.path.join(out, "init1"), out, _dropout_stopped), nprocs=WORLD, join=True)
        mp.spawn(_worker, args=(os.path.join(out, "init2"), out, _dropout_resumed), nprocs=WORLD, join=True)
        history = GradientHistory.load(os.path.join(out, "dropout_rec"))
        trained = _dropout_model(torch.load(os.path.join(out, "dropout_resumed_final_0.pt")))
    assert history.complete and history.num_steps == STEPS
    assert history.schedule["rng_states"].shape == (STEPS, WORLD * torch.get_rng_state().numel())
    single, _ = retrain.run(_dropout_net(), history, torch.zeros(0, dtype=torch.int64), _data(), F.cross_entropy)
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    assert _max_diff(single, trained) < TOL < moved / 100, (_max_diff(single, trained), moved)


def _rows(history, key):
    return history.trajectory[key].all()


def test_ddp_killed_recording_loads_up_to_its_last_chunk(ddp_run, ddp_resumed):
    uninterrupted, partial = ddp_run[5], ddp_resumed["partial"]
    # chunks of 3, 3, 2 (the flush), 3 were written; step 11 was in the open chunk when the processes were killed
    assert not partial["complete"] and partial["chunk_steps"] == [CHUNK, CHUNK, FLUSH_AT - 2 * CHUNK, CHUNK]
    assert len(partial["batches"]) == STEPS - 1
    assert all(torch.equal(a, b) for a, b in zip(partial["batches"], uninterrupted.schedule["batches"]))
    assert torch.equal(partial["g"], _rows(uninterrupted, "g")[: STEPS - 1])


def test_ddp_resumed_recording_equals_the_uninterrupted_one(ddp_run, ddp_resumed):
    uninterrupted, finals = ddp_run[5], ddp_run[1]
    history = ddp_resumed["history"]
    assert ddp_resumed["messages"]["resumed_at"] == [str(FLUSH_AT)] * WORLD  # the steps after the flush were dropped
    assert history.complete and history.num_steps == STEPS
    assert history.meta["distributed"] == uninterrupted.meta["distributed"] == {"world_size": WORLD, "backend": "gloo", "recording_rank": 0}
    assert all(torch.equal(a, b) for a, b in zip(history.schedule["batches"], uninterrupted.schedule["batches"]))
    for key in ("lrs", "batch_sizes", "micro_counts", "micro_sizes", "w0"):
        assert torch.equal(history.schedule[key], uninterrupted.schedule[key]), key
    assert torch.equal(_rows(history, "g"), _rows(uninterrupted, "g"))
    for state in ddp_resumed["finals"]:  # the resumed run trained to the uninterrupted one's weights, on every rank
        assert all(torch.equal(state[k], finals[0][k]) for k in state)


def test_ddp_resumed_history_replays_the_trained_weights(ddp_resumed):
    history, trained = ddp_resumed["history"], _trained(ddp_resumed["finals"][0])
    replayed, _ = retrain.run(copy.deepcopy(trained), history, torch.zeros(0, dtype=torch.int64), _data(), F.cross_entropy)
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    assert _max_diff(replayed, trained) < TOL < moved / 100, (_max_diff(replayed, trained), moved)
    # and forgetting: the hand-written loop over the resumed history's world batches
    result = uf.unlearn(trained, history, FORGET, _data(), F.cross_entropy, method="retrain")
    hand = _hand_retrain(history, torch.tensor(FORGET))
    assert _max_diff(result.model, hand) < TOL < _max_diff(hand, trained) / 100


def test_ddp_resume_refuses_another_world_size_on_every_rank(ddp_resumed):
    messages = ddp_resumed["messages"]
    single, root = ddp_resumed["single"], ddp_resumed["root"]
    assert messages["worldsize"][0] == messages["worldsize"][1]  # rank 1 raises rank 0's error
    assert messages["worldsize"][0].startswith(f"path: the recording at {single!r} was made with world size 1, resumed under world size 2")
    for message in messages["alone"]:  # each rank alone in a group of 1
        assert message is not None and message.startswith(f"path: the recording at {root!r} was made with world size 2, resumed under world size 1"), message


def test_ddp_resume_refuses_weights_matching_no_flush_point_on_every_rank(ddp_resumed):
    messages = ddp_resumed["messages"]["weights"]
    assert messages[0] == messages[1] and messages[0].startswith("model: its weights match none of the 1 flush points"), messages


def test_no_gloo_thread_outlives_the_process_group_after_a_resume(ddp_resumed):
    for threads in ddp_resumed["messages"]["threads"]:  # (the resumed run also built a DDP model on a group of its own)
        assert threads in ("none", None), threads


def test_ddp_flush_refusal_on_every_rank(ddp_resumed):
    messages = ddp_resumed["messages"]["flush"]
    assert messages[0] == messages[1] and messages[0].startswith("flush: the recorder is finished"), messages
