"""FSDP2 (fully_shard, gloo, 2 CPU processes): every rank records its shards; the shard histories replay under the same
sharding and gather into one single-process history."""
import copy
import gc
import os
import shutil
import sys
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
from dist_setup import dropout_net  # noqa: E402
from dist_setup import dropout_model as _dropout_model  # noqa: E402

FORGET = [0, 5, 17, 30, 41]


def _sharded(placement=None):
    from torch.distributed.fsdp import fully_shard

    net = _net()
    if placement is None:
        fully_shard(net)
    else:
        fully_shard(net, shard_placement_fn=placement)
    return net


def _full_state(net):
    # every rank takes part in full_tensor's all-gather
    return {k: v.full_tensor().detach().clone() for k, v in net.state_dict().items()}


def _message(fn, out, name):
    try:
        fn()
    except ValueError as err:
        with open(os.path.join(out, name), "w") as f:
            f.write(str(err))


def _edge_forget(history):
    """Rank 1's whole part of step 0 and all of step 3."""
    b = history.schedule["batches"]
    return sorted(set(b[0][PER_RANK:].tolist()) | set(b[3].tolist()))


def _worker(rank, init_file, out, work=None):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        (work or _work)(rank, out)  # _work, or the resumed run's
    finally:
        gc.collect()
        dist.destroy_process_group()
    # fully_shard keeps a reference to its process group (docs/distributed.md, "Teardown"): its gloo threads outlive
    # destroy_process_group (3 per rank, measured), and a gloo thread alive at interpreter finalization can abort the
    # process (SIGABRT). Everything is written and the group destroyed: leave without finalization (exit status 0;
    # an exception above still reaches mp.spawn)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _work(rank, out):
    from torch.distributed.tensor import Shard

    ds, net = _data(), _sharded()
    opt, sched = _optimizer(net.parameters())
    rec = ufd.ShardedRecorder(net, opt)
    # the same run recorded a second time, streamed to out/streamed/rank-<r> in chunks of 5 steps (12 steps: 5, 5, 2)
    streamed = ufd.ShardedRecorder(net, opt, path=os.path.join(out, "streamed"))
    streamed.chunk_steps = 5
    sampler = torch.utils.data.DistributedSampler(uf.IndexedDataset(ds), shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(uf.IndexedDataset(ds), batch_size=PER_RANK, sampler=sampler)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for idx, x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            rec.record(idx)
            streamed.record(idx)
            opt.step()
            sched.step()
    history = rec.finish(ds)
    streamed.finish(ds)
    ufd.save_sharded(history, os.path.join(out, "history"))
    trained = _full_state(net)
    if rank == 0:
        torch.save(trained, os.path.join(out, "trained.pt"))
    history = ufd.load_sharded(os.path.join(out, "history"), net)
    # replays under the same sharding, each into a fresh fully_shard'ed model
    replayed, stats = ufd.run_sharded(_sharded(), history, [], ds, F.cross_entropy)
    assert stats["steps"] == len(history.schedule["batches"])
    state = _full_state(replayed)
    if rank == 0:
        torch.save(state, os.path.join(out, "replay_none.pt"))
    result = ufd.unlearn_sharded(net, history, FORGET, ds, F.cross_entropy, replay_model=_sharded())
    state = _full_state(result.model)
    if rank == 0:
        torch.save(state, os.path.join(out, "replay_forget.pt"))
    # rank 1 retains nothing of step 0 (it joins FSDP2's collectives with a zero-weighted loss), step 3 is skipped whole
    edge, _ = ufd.run_sharded(_sharded(), history, _edge_forget(history), ds, F.cross_entropy)
    state = _full_state(edge)
    if rank == 0:
        torch.save(state, os.path.join(out, "replay_edge.pt"))
    # a second request on the model the first produced: forgets the union of both (the binding of uf.unlearn)
    second = ufd.unlearn_sharded(result.model, history, [1], ds, F.cross_entropy, replay_model=_sharded())
    state = _full_state(second.model)
    if rank == 0:
        torch.save(state, os.path.join(out, "replay_second.pt"))
    with open(os.path.join(out, f"requests_{rank}.txt"), "w") as f:
        f.write(repr([r["forget"] for r in history.requests]))
    # a model the history does not know (untrained): refused on every rank
    _message(lambda: ufd.unlearn_sharded(_sharded(), history, FORGET, ds, F.cross_entropy, replay_model=_sharded()), out, f"unknown_{rank}.txt")
    _message(lambda: uf.HistoryRecorder(net, opt), out, f"plain_{rank}.txt")
    # another sharding: dim 1 of the weights instead of dim 0
    other = _sharded(lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    _message(lambda: ufd.run_sharded(other, history, FORGET, ds, F.cross_entropy), out, f"sharding_{rank}.txt")
    # rank 1 given rank 0's shards (of the same run): refused on every rank, naming the rank
    mixed = GradientHistory.load(os.path.join(out, "history", "rank-0"))
    _message(lambda: ufd.run_sharded(_sharded(), mixed, FORGET, ds, F.cross_entropy), out, f"mixed_{rank}.txt")
    _message(lambda: ufd.load_sharded(os.path.join(out, "history"), other), out, f"load_{rank}.txt")
    # rank 1 holding another run's shards (a second recording): refused on every rank by the run id
    fresh = _sharded()
    rec2 = ufd.ShardedRecorder(fresh, _optimizer(fresh.parameters())[0])
    assert rec2.meta["distributed"]["run"] != history.meta["distributed"]["run"]
    foreign = copy.copy(history)
    foreign.meta = dict(history.meta, distributed=rec2.meta["distributed"] if rank == 1 else history.meta["distributed"])
    _message(lambda: ufd.run_sharded(_sharded(), foreign, FORGET, ds, F.cross_entropy), out, f"run_{rank}.txt")
    # the DDP recorder and replay refuse a sharded model, naming FSDP2 and the sharded API
    _message(lambda: ufd.DistributedRecorder(net, opt), out, f"ddp_recorder_{rank}.txt")
    _message(lambda: ufd.run(net, history, torch.tensor(FORGET), ds, F.cross_entropy), out, f"ddp_replay_{rank}.txt")
    # clipping after the reduce-scatter: refused on every rank
    rec3 = ufd.ShardedRecorder(net, opt)
    idx, x, y = next(iter(loader))
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
    _message(lambda: rec3.record(idx), out, f"clipped_{rank}.txt")
    # unequal per-rank batch sizes, and a step without record(): refused on every rank; kind="minimal": refused
    rec4 = ufd.ShardedRecorder(net, opt)
    _message(lambda: rec4.record(torch.arange(3 + rank)), out, f"unequal_{rank}.txt")
    opt.step()
    _message(lambda: rec4.record(idx), out, f"unrecorded_{rank}.txt")
    _message(lambda: ufd.ShardedRecorder(net, opt, uf.HistoryPolicy(kind="minimal")), out, f"minimal_{rank}.txt")
    # a world size of 1: each rank alone in a group of its own, the model sharded over a 1-rank mesh
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    alone = [dist.new_group([r]) for r in range(WORLD)][rank]
    single = fully_shard(_net(), mesh=DeviceMesh.from_group(alone, "cpu"))
    _message(lambda: ufd.load_sharded(os.path.join(out, "history"), single, group=alone), out, f"world_{rank}.txt")
    # a module's train / eval mode changed after step 0: refused on every rank (the replay runs one set of modes)
    rec5 = ufd.ShardedRecorder(net, opt)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    rec5.record(idx)
    opt.step()
    net[0].eval()
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    _message(lambda: rec5.record(idx), out, f"modes_{rank}.txt")
    del rec4, rec5, single, edge, rec, rec2, rec3, net, fresh, other, mixed, replayed, result, second, opt, sched
    _dropout_run(rank, out)


def _dropout_sharded():
    from torch.distributed.fsdp import fully_shard

    net = dropout_net()
    fully_shard(net)
    return net


def _dropout_run(rank, out):
    """Dropout under FSDP2: every rank draws its masks from its own generator (seeded per rank); each shard history keeps
    every rank's state of every step (refused until 2026-12-05). Streamed in chunks of 5 steps."""
    ds, net = _data(), _dropout_sharded()
    opt, sched = _optimizer(net.parameters())
    torch.manual_seed(100 + rank)
    rec = ufd.ShardedRecorder(net, opt, path=os.path.join(out, "dropout"))
    rec.chunk_steps = 5
    _train_steps(net, opt, sched, rec, _steps(*_loader(ds)))
    rec.finish(ds)
    trained = _full_state(net)
    if rank == 0:
        torch.save(trained, os.path.join(out, "dropout_trained.pt"))
    history = ufd.load_sharded(os.path.join(out, "dropout"), net)
    for name, forget in (("none", []), ("forget", FORGET)):
        # (the replay model in eval mode, as a caller may leave it: the replay runs the modules in training's modes)
        replayed, _ = ufd.run_sharded(_dropout_sharded().eval(), history, forget, ds, F.cross_entropy)
        state = _full_state(replayed)
        if rank == 0:
            torch.save(state, os.path.join(out, f"dropout_replay_{name}.pt"))


@pytest.fixture(scope="module")
def fsdp_run():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(os.path.join(out, "init"), out), nprocs=WORLD, join=True)

        def message(name):
            path = os.path.join(out, name)
            return open(path).read() if os.path.exists(path) else None

        kinds = ("sharding", "load", "mixed", "run", "unknown", "plain", "unequal", "unrecorded", "minimal", "world", "ddp_recorder", "ddp_replay", "clipped", "requests", "modes")
        refusals = {kind: [message(f"{kind}_{r}.txt") for r in range(WORLD)] for kind in kinds}
        shards = [GradientHistory.load(os.path.join(out, "history", f"rank-{r}")) for r in range(WORLD)]
        states = {name: torch.load(os.path.join(out, f"{name}.pt")) for name in ("trained", "replay_none", "replay_forget", "replay_second", "replay_edge")}
        streamed = [GradientHistory.load(os.path.join(out, "streamed", f"rank-{r}")) for r in range(WORLD)]
        dropout = {"shards": [GradientHistory.load(os.path.join(out, "dropout", f"rank-{r}")) for r in range(WORLD)],
                   **{name: torch.load(os.path.join(out, f"dropout_{name}.pt")) for name in ("trained", "replay_none", "replay_forget")}}
        yield shards, states, refusals, streamed, dropout


def _model(state):
    net = _net()
    net.load_state_dict(state)
    return net


def _max_diff(a, b):
    return float((flat_params(a) - flat_params(b)).abs().max())


def test_shard_histories_hold_each_ranks_shards(fsdp_run):
    shards, states = fsdp_run[:2]
    metas = [h.meta["distributed"] for h in shards]
    assert [m["rank"] for m in metas] == [0, 1] and {m["world_size"] for m in metas} == {WORLD}
    assert metas[0]["run"] == metas[1]["run"] and metas[0]["sharding"] == "fsdp2"
    # the 3-row layer sharded unevenly: rank 0 rows 0:2, rank 1 row 2
    assert [(s["local_shape"], s["offset"]) for s in metas[0]["shards"]][2:] == [([2, 16], [0, 0]), ([2], [0])]
    assert [(s["local_shape"], s["offset"]) for s in metas[1]["shards"]][2:] == [([1, 16], [2, 0]), ([1], [2])]
    assert metas[0]["shards"][0]["placements"] == ["Shard(dim=0)"]
    assert shards[0].schedule["w0"].numel() == 8 * 6 + 8 + 2 * 16 + 2 and shards[1].schedule["w0"].numel() == 8 * 6 + 8 + 16 + 1
    for a, b in zip(*(h.schedule["batches"] for h in shards)):  # every rank stores the same world batches
        assert torch.equal(a, b) and a.numel() == WORLD * PER_RANK
    batches = shards[0].schedule["batches"]
    assert len(batches) == EPOCHS * N // (WORLD * PER_RANK)
    for e in range(EPOCHS):
        assert sorted(torch.cat(batches[e * 6 : (e + 1) * 6]).tolist()) == list(range(N))


def test_gathered_history_is_the_single_process_one(fsdp_run):
    shards, states = fsdp_run[:2]
    gathered = ufd.gather_shards(reversed(shards))  # any order
    assert torch.equal(gathered.schedule["w0"], flat_params(_net()))
    # the recorded gradient of step 0 (reassembled from the shards) is the world batch's mean gradient at w0
    ds, net = _data(), _net()
    X, y = ds.tensors
    b0 = gathered.schedule["batches"][0]
    F.cross_entropy(net(X[b0]), y[b0]).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert float((gathered.trajectory["g"].row(0) - expected).abs().max()) < 1e-6
    assert float(expected.abs().max()) > 1e-2
    # bound to the whole trained model: uf.unlearn's retrain takes it and, forgetting nothing, lands on the trained weights
    trained = _model(states["trained"])
    single, _ = retrain.run(copy.deepcopy(trained), gathered, torch.zeros(0, dtype=torch.int64), ds, F.cross_entropy)
    moved = float((flat_params(trained) - gathered.schedule["w0"]).abs().max())
    assert _max_diff(single, trained) < TOL < moved / 100, (_max_diff(single, trained), moved)
    with tempfile.TemporaryDirectory() as d:  # it saves and loads like any history
        gathered.save(d)
        again = GradientHistory.load(d)
        assert torch.equal(again.trajectory["g"].all(), gathered.trajectory["g"].all())


def test_fsdp_replay_forgetting_nothing_equals_training(fsdp_run):
    shards, states = fsdp_run[:2]
    trained, replay = _model(states["trained"]), _model(states["replay_none"])
    moved = _max_diff(trained, _net())
    assert _max_diff(replay, trained) < TOL < moved / 100, (_max_diff(replay, trained), moved)


def test_fsdp_replay_forgetting_equals_single_process_and_hand_retrain(fsdp_run):
    shards, states, refusals = fsdp_run[:3]
    gathered = ufd.gather_shards(shards)
    trained, fsdp = _model(states["trained"]), _model(states["replay_forget"])
    single = uf.unlearn(trained, gathered, FORGET, _data(), F.cross_entropy, method="retrain").model
    hand = _hand_retrain(gathered, FORGET)
    moved = _max_diff(hand, trained)
    assert _max_diff(fsdp, hand) < TOL < moved / 100, (_max_diff(fsdp, hand), moved)
    assert _max_diff(fsdp, single) < TOL
    assert refusals["requests"][0] == refusals["requests"][1] == repr([FORGET, sorted(FORGET + [1])])  # logged in each rank's history


def test_fsdp_replay_with_a_rank_retaining_nothing_and_a_skipped_step(fsdp_run):
    shards, states = fsdp_run[:2]
    gathered = ufd.gather_shards(shards)
    forget = _edge_forget(gathered)
    assert len(forget) == PER_RANK + WORLD * PER_RANK
    hand = _hand_retrain(gathered, forget)
    edge, trained = _model(states["replay_edge"]), _model(states["trained"])
    assert _max_diff(edge, hand) < TOL < _max_diff(hand, trained) / 100, (_max_diff(edge, hand), _max_diff(hand, trained))


def test_a_second_request_forgets_the_union(fsdp_run):
    shards, states = fsdp_run[:2]
    gathered = ufd.gather_shards(shards)
    union = sorted(FORGET + [1])
    hand = _hand_retrain(gathered, union)
    first = _hand_retrain(gathered, FORGET)
    second = _model(states["replay_second"])
    assert _max_diff(second, hand) < TOL < _max_diff(hand, first) / 100, (_max_diff(second, hand), _max_diff(hand, first))


def test_refuses_a_model_the_history_does_not_know_on_every_rank(fsdp_run):
    for message in fsdp_run[2]["unknown"]:
        assert message is not None and "shards on ranks [0, 1] are neither the trained model's" in message, message


def test_refuses_another_sharding_on_every_rank(fsdp_run):
    for rank, message in enumerate(fsdp_run[2]["sharding"]):
        # Shard(dim=1) of the 16x6 weight: 16x3 shards at column offsets 0 and 3 instead of 8x6 at rows 0 and 8
        assert message is not None and "rank 0: history: parameter 0.weight was sharded differently" in message, message
        assert "(placements ['Shard(dim=0)'], local shard [8, 6] at offset [8, 0]) than in this model (placements ['Shard(dim=1)'], " \
               "local shard [16, 3] at offset [0, 3])" in message.split("; rank 1: ")[1], message
    for rank, message in enumerate(fsdp_run[2]["load"]):  # load_sharded checks the sharding of the model it is given
        assert message is not None and message.startswith("history: parameter 0.weight was sharded differently"), message


def test_refuses_the_other_ranks_shards_on_every_rank(fsdp_run):
    for message in fsdp_run[2]["mixed"]:
        assert message is not None and "rank 1: history: holds the shards of rank 0, used on rank 1" in message, message
        assert "rank 0:" not in message


def test_refuses_shards_of_another_run_on_every_rank(fsdp_run):
    for message in fsdp_run[2]["run"]:
        assert message is not None and "ranks [1] hold shard histories of another recording" in message, message


def test_refuses_clipping_after_the_reduce_scatter_on_every_rank(fsdp_run):
    for message in fsdp_run[2]["clipped"]:
        assert message is not None and "changed after FSDP2's reduce-scatter" in message, message


def test_dropout_keeps_every_ranks_generator_state_and_is_replayed_exactly(fsdp_run):
    run = fsdp_run[4]
    shards, trained = run["shards"], _dropout_model(run["trained"])
    width = torch.get_rng_state().numel()
    states = shards[0].schedule["rng_states"]
    assert states.shape == (STEPS, WORLD * width) and torch.equal(shards[1].schedule["rng_states"], states)  # every shard keeps them all
    assert not torch.equal(states[:, :width], states[:, width:])  # the ranks' generators differ
    assert _max_diff(_dropout_model(run["replay_none"]), trained) < TOL  # the FSDP2 replay, each rank drawing its own masks
    gathered = ufd.gather_shards(shards)
    nothing = torch.zeros(0, dtype=torch.int64)
    single, _ = retrain.run(_dropout_model(run["trained"]), gathered, nothing, _data(), F.cross_entropy)
    moved = float((flat_params(trained) - gathered.schedule["w0"]).abs().max())
    assert _max_diff(single, trained) < TOL < moved / 100, (_max_diff(single, trained), moved)
    forgot, _ = retrain.run(_dropout_model(run["trained"]), gathered, torch.tensor(FORGET), _data(), F.cross_entropy)
    assert _max_diff(forgot, trained) > 100 * TOL
    assert _max_diff(_dropout_model(run["replay_forget"]), forgot) < TOL
    unseeded = copy.copy(gathered)  # without the states the replay draws other masks
    unseeded.schedule = {k: v for k, v in gathered.schedule.items() if k != "rng_states"}
    assert _max_diff(retrain.run(_dropout_model(run["trained"]), unseeded, nothing, _data(), F.cross_entropy)[0], trained) > 100 * TOL


def test_recorder_refusals_on_every_rank(fsdp_run):
    refusals = fsdp_run[2]
    for rank in range(WORLD):
        assert "per-rank batch sizes [3, 4]" in (refusals["unequal"][rank] or ""), refusals["unequal"][rank]
        assert "an optimizer step ran without a record() before it (ranks [0, 1])" in (refusals["unrecorded"][rank] or ""), refusals["unrecorded"][rank]
        assert "policy kind 'minimal' is not supported for FSDP2" in (refusals["minimal"][rank] or ""), refusals["minimal"][rank]
        assert "step 1: modules are in other train / eval modes than at step 0 (ranks [0, 1])" in (refusals["modes"][rank] or ""), refusals["modes"][rank]


def test_ddp_api_and_plain_recorder_refuse_a_sharded_model_naming_fsdp2(fsdp_run):
    for message in fsdp_run[2]["plain"]:
        assert message is not None and "DTensor" in message and "ShardedRecorder" in message, message
    for kind in ("ddp_recorder", "ddp_replay"):
        for message in fsdp_run[2][kind]:
            assert message is not None and "FSDP2" in message and "ShardedRecorder" in message and "DTensor" in message, (kind, message)


def test_refuses_another_world_size(fsdp_run):
    shards, _, refusals = fsdp_run[:3]
    for message in refusals["world"]:  # loaded by a rank in a group of 1, its model sharded over a 1-rank mesh
        assert message is not None and message.startswith("history: FSDP2 shards recorded with world size 2, used under world size 1"), message
    with pytest.raises(ValueError, match="FSDP2 shards recorded with world size 2, used under world size 4"):
        ufd.check_sharding(shards[0], None, 4, 0)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        ufd.load_sharded("unused", None)


def test_single_process_methods_refuse_a_shard_history_naming_fsdp2(fsdp_run):
    shards, states = fsdp_run[:2]
    trained = _model(states["trained"])
    for method in ("retrain", "deltagrad", "mini"):
        with pytest.raises(ValueError, match=r"FSDP2 shard 0 of 2"):
            uf.unlearn(trained, shards[0], FORGET, _data(), F.cross_entropy, method=method)


def test_gather_refuses_missing_or_mixed_ranks(fsdp_run):
    shards = fsdp_run[0]
    with pytest.raises(ValueError, match=r"got the shards of ranks \[0\], the run had world size 2"):
        ufd.gather_shards(shards[:1])
    other = copy.copy(shards[1])
    other.meta = dict(other.meta, distributed=dict(other.meta["distributed"], run="another"))
    with pytest.raises(ValueError, match="2 different runs"):
        ufd.gather_shards([shards[0], other])
    with pytest.raises(ValueError, match="not an FSDP2 shard history"):
        ufd.gather_shards([ufd.gather_shards(shards)])


# ----------------------------------------------------------------------------- streamed shard histories, killed and resumed
def _same_history(a, b, rows=None):
    """Schedule and rows (the first `rows` of them when given) bit for bit."""
    n = len(a.schedule["batches"]) if rows is None else rows
    assert len(a.schedule["batches"]) == n and len(b.schedule["batches"]) >= n
    assert all(torch.equal(x, y) for x, y in zip(a.schedule["batches"], b.schedule["batches"]))
    assert torch.equal(a.schedule["w0"], b.schedule["w0"])
    for key in ("lrs", "batch_sizes", "micro_counts"):
        assert torch.equal(a.schedule[key], b.schedule[key][:n]), key
    assert a.schedule["micro_sizes"].numel() == b.schedule["micro_sizes"].numel() == 0  # (no gradient accumulation)
    assert torch.equal(a.trajectory["g"].all(), b.trajectory["g"].all()[:n])


def _without_run(meta):
    return dict(meta, distributed={k: v for k, v in meta["distributed"].items() if k != "run"})


def test_streamed_shard_histories_equal_the_in_memory_ones(fsdp_run):
    shards, streamed = fsdp_run[0], fsdp_run[3]
    for rank, (memory, disk) in enumerate(zip(shards, streamed)):
        assert disk.complete and disk.chunk_steps == [5, 5, 2]  # streamed in chunks of 5 steps
        _same_history(disk, memory)
        assert torch.equal(disk.summary["w_final"], memory.summary["w_final"])
        assert _without_run(disk.meta) == _without_run(memory.meta) and disk.meta["distributed"]["rank"] == rank
        assert disk.meta["distributed"]["run"] != memory.meta["distributed"]["run"]  # two recorders of one training run
    # the streamed shards gather into the single-process history, as the in-memory ones do
    gathered, reference = ufd.gather_shards(streamed), ufd.gather_shards(shards)
    assert torch.equal(gathered.trajectory["g"].all(), reference.trajectory["g"].all())


def _checkpoint(net, opt, sched):
    """A rank's trainer checkpoint under FSDP2: its local shards of the parameters and of SGD's momentum, the groups'
    hyper-parameters and the scheduler's state."""
    params = list(net.parameters())
    return {"params": [p.to_local().detach().clone() for p in params],
            "momentum": [opt.state[p]["momentum_buffer"].to_local().clone() for p in params],
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups], "sched": sched.state_dict()}


def _restore(state, net, opt, sched):
    params = list(net.parameters())
    with torch.no_grad():
        for p, local in zip(params, state["params"]):
            p.to_local().copy_(local)
    for p, local in zip(params, state["momentum"]):
        buffer = torch.zeros_like(p)  # a DTensor sharded as p
        buffer.to_local().copy_(local)
        opt.state[p]["momentum_buffer"] = buffer
    for group, saved in zip(opt.param_groups, state["groups"]):
        group.update(saved)
    sched.load_state_dict(state["sched"])


def _stopped_worker(rank, init_file, out):
    """The run of _work streamed to out/rec in chunks of CHUNK steps, flushed with a checkpoint after FLUSH_AT steps,
    killed after the last step (no finish, no close)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    ds, net = _data(), _sharded()
    opt, sched = _optimizer(net.parameters())
    # another recording (another run id) of the initial weights, flushed at once: its rank-1 directory is the foreign run
    other = ufd.ShardedRecorder(net, opt, path=os.path.join(out, "other"))
    other.flush()
    other.close()
    rec = ufd.ShardedRecorder(net, opt, path=os.path.join(out, "rec"))
    rec.chunk_steps = CHUNK
    sampler, loader = _loader(ds)
    _train_steps(net, opt, sched, rec, _steps(sampler, loader, stop=FLUSH_AT))
    rec.flush()  # every rank: the trainer's checkpoint comes with a flush
    torch.save(_checkpoint(net, opt, sched), os.path.join(out, f"ckpt_{rank}.pt"))
    _train_steps(net, opt, sched, rec, _steps(sampler, loader, start=FLUSH_AT))
    rec._writer.join()  # the sealed chunks are on disk (a kill mid-write keeps the earlier ones: store.py)
    die()


def _resume_work(rank, out):
    """New processes: the refusals (nothing written), then every rank's checkpoint restored, the recording resumed and
    the run trained to its end; the finished history replayed by run_sharded, forgetting nothing."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    ds, net = _data(), _sharded()
    opt, sched = _optimizer(net.parameters())
    root = os.path.join(out, "rec")
    _message(lambda: ufd.ShardedRecorder.resume(root, net, opt), out, f"weights_{rank}.txt")  # untrained weights
    _restore(torch.load(os.path.join(out, f"ckpt_{rank}.pt")), net, opt, sched)
    other = _sharded(lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    other.load_state_dict(net.state_dict())  # the same weights, sharded along dim 1
    _message(lambda: ufd.ShardedRecorder.resume(root, other, _optimizer(other.parameters())[0]), out, f"sharding_{rank}.txt")
    _message(lambda: ufd.ShardedRecorder.resume(os.path.join(out, "mixed_rank"), net, opt), out, f"rank_{rank}.txt")
    _message(lambda: ufd.ShardedRecorder.resume(os.path.join(out, "mixed_run"), net, opt), out, f"run_{rank}.txt")
    _message(lambda: ufd.ShardedRecorder(net, opt, path=root), out, f"exists_{rank}.txt")
    alone = [dist.new_group([r]) for r in range(WORLD)][rank]
    single = fully_shard(_net(), mesh=DeviceMesh.from_group(alone, "cpu"))
    _message(lambda: ufd.ShardedRecorder.resume(root, single, _optimizer(single.parameters())[0], group=alone), out, f"world_{rank}.txt")
    rec = ufd.ShardedRecorder.resume(root, net, opt)
    with open(os.path.join(out, f"resumed_at_{rank}.txt"), "w") as f:
        f.write(str(rec.steps))
    sampler, loader = _loader(ds)
    _train_steps(net, opt, sched, rec, _steps(sampler, loader, start=FLUSH_AT))
    rec.finish(ds)
    _message(rec.flush, out, f"flush_{rank}.txt")  # a finished recorder: refused on every rank
    trained = _full_state(net)
    history = ufd.load_sharded(root, net)  # the streamed layout, finished in place
    replayed, _ = ufd.run_sharded(_sharded(), history, [], ds, F.cross_entropy)
    replay = _full_state(replayed)
    if rank == 0:
        torch.save({"trained": trained, "replay": replay}, os.path.join(out, "resumed.pt"))
    del rec, other, single, net, opt, sched, replayed, history


@pytest.fixture(scope="module")
def fsdp_resumed():
    with tempfile.TemporaryDirectory() as out:
        spawn_killed(_stopped_worker, (os.path.join(out, "init1"), out))
        root = os.path.join(out, "rec")
        killed = [GradientHistory.load(os.path.join(root, f"rank-{r}")) for r in range(WORLD)]
        # read now (the resume truncates the recording): what each rank's directory held when the processes were killed
        partial = [{"complete": h.complete, "chunk_steps": h.chunk_steps, "history": GradientHistory(
            h.meta, dict(h.schedule), {k: _in_memory(v) for k, v in h.trajectory.items()})} for h in killed]
        try:
            ufd.gather_shards(killed)
            gather = None
        except ValueError as err:
            gather = str(err)
        # rank 1 given rank 0's directory; rank 1 given another run's
        for name, sources in (("mixed_rank", ("rec/rank-0", "rec/rank-0")), ("mixed_run", ("rec/rank-0", "other/rank-1"))):
            for r, source in enumerate(sources):
                shutil.copytree(os.path.join(out, source), os.path.join(out, name, f"rank-{r}"))
        mp.spawn(_worker, args=(os.path.join(out, "init2"), out, _resume_work), nprocs=WORLD, join=True)

        def message(name):
            path = os.path.join(out, name)
            return open(path).read() if os.path.exists(path) else None

        kinds = ("weights", "sharding", "rank", "run", "exists", "world", "flush", "resumed_at")
        yield {"partial": partial, "gather": gather, "root": root, "states": torch.load(os.path.join(out, "resumed.pt")),
               "histories": [GradientHistory.load(os.path.join(root, f"rank-{r}")) for r in range(WORLD)],
               "messages": {kind: [message(f"{kind}_{r}.txt") for r in range(WORLD)] for kind in kinds}}


def _in_memory(rows):
    from unlearn_fast.history import ChunkedRows, EncodedRows

    values = rows.all().clone()
    return ChunkedRows([(values.shape[0], EncodedRows({"values": values}, "fp32", rows.blocksize, rows.p, rows.dtype))], "fp32", rows.blocksize, rows.p, rows.dtype)


def test_killed_shard_recording_loads_up_to_its_last_chunk(fsdp_run, fsdp_resumed):
    for rank, partial in enumerate(fsdp_resumed["partial"]):
        # chunks of 3, 3, 2 (the flush), 3 were written; step 11 was in the open chunk when the processes were killed
        assert not partial["complete"] and partial["chunk_steps"] == [CHUNK, CHUNK, FLUSH_AT - 2 * CHUNK, CHUNK]
        _same_history(partial["history"], fsdp_run[3][rank], rows=STEPS - 1)
    assert fsdp_resumed["gather"] == "gather_shards: the shard histories of ranks [0, 1] are recordings that did not finish; resume and finish them"


def test_resumed_shard_recording_equals_the_uninterrupted_one(fsdp_run, fsdp_resumed):
    assert fsdp_resumed["messages"]["resumed_at"] == [str(FLUSH_AT)] * WORLD  # the steps after the flush were dropped
    for rank, (resumed, uninterrupted) in enumerate(zip(fsdp_resumed["histories"], fsdp_run[3])):
        assert resumed.complete and resumed.num_steps == STEPS
        _same_history(resumed, uninterrupted)
        assert torch.equal(resumed.summary["w_final"], uninterrupted.summary["w_final"])
        assert _without_run(resumed.meta) == _without_run(uninterrupted.meta)
    trained = fsdp_resumed["states"]["trained"]  # the resumed run trained to the uninterrupted one's weights
    assert all(torch.equal(trained[k], fsdp_run[1]["trained"][k]) for k in trained)


def test_fsdp_replay_of_a_resumed_streamed_history_reproduces_the_trained_weights(fsdp_resumed):
    states = fsdp_resumed["states"]
    trained, replay = _model(states["trained"]), _model(states["replay"])
    moved = _max_diff(trained, _net())
    assert _max_diff(replay, trained) < TOL < moved / 100, (_max_diff(replay, trained), moved)


def test_resume_refusals_on_every_rank(fsdp_resumed):
    m, root = fsdp_resumed["messages"], fsdp_resumed["root"]
    prefix = "ShardedRecorder.resume: refused (nothing was changed at "
    for rank in range(WORLD):
        weights = m["weights"][rank] or ""
        assert weights.startswith(prefix) and "rank 0: model: its local shards match none of the 1 flush points" in weights, weights
        assert "rank 1: model: its local shards match none" in weights, weights
        sharding = m["sharding"][rank] or ""
        assert "rank 0: history: parameter 0.weight was sharded differently" in sharding and "rank 1: history: parameter 0.weight" in sharding, sharding
        mixed = m["rank"][rank] or ""
        assert "rank 1: history: holds the shards of rank 0, used on rank 1" in mixed and "rank 0:" not in mixed, mixed
        run = m["run"][rank] or ""
        assert "ranks [1] hold the shard recording of another run than rank 0's" in run, run
        exists = m["exists"][rank] or ""
        assert exists.startswith("ShardedRecorder: rank 0: path: ") and "rank 1: path: " in exists and "already holds a history" in exists, exists
        world = m["world"][rank] or ""  # each rank alone in a group of 1
        assert world.startswith(prefix) and "rank 0: history: FSDP2 shards recorded with world size 2, used under world size 1" in world, world
        assert m["flush"][rank] == "flush: the recorder is finished", m["flush"][rank]
