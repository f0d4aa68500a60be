"""The small problem both multi-process suites train (tests/test_distributed.py: DDP, tests/test_fsdp.py: FSDP2)."""
import torch
import torch.nn.functional as F

WORLD, PER_RANK, EPOCHS, N = 2, 4, 2, 48
TOL = 1e-5  # float32 weights of size ~0.3: the replays sum a world batch in other orders than the all-reduce / reduce-scatter


def data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 6, generator=g)
    y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()
    return torch.utils.data.TensorDataset(X, y)


def net():
    # 16-row and 3-row layers: under FSDP2 the 3-row ones shard unevenly over 2 ranks (2 rows and 1)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def dropout_net():
    """net() with dropout 0.3 between its layers: each rank draws its own masks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))


def dropout_model(state):
    """dropout_net() holding the weights of a state_dict."""
    model = dropout_net()
    model.load_state_dict(state)
    return model


def optimizer(params):
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=1e-3)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)


def hand_retrain(history, forget):
    """A plain single-process loop over the recorded world batches without `forget`: mean loss, SGD step (the
    independent reference both suites compare the replays with; measured under DDP: equal to uf.unlearn's retrain bit
    for bit, while a history of rank 0's indices alone would be 0.25 away)."""
    ds, model = data(), net()
    opt, _ = optimizer(model.parameters())
    X, y = ds.tensors
    keep = torch.ones(N, dtype=torch.bool)
    keep[torch.as_tensor(forget, dtype=torch.int64)] = False
    for batch, lr in zip(history.schedule["batches"], history.schedule["lrs"][:, 0].tolist()):
        rem = batch[keep[batch]]
        if rem.numel() == 0:
            continue
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        F.cross_entropy(model(X[rem]), y[rem]).backward()
        opt.step()
    return model


# ----------------------------------------------------------------------------- a run stopped and resumed (both suites)
STEPS = EPOCHS * N // (WORLD * PER_RANK)  # 12 optimizer steps, 6 an epoch
# recorded in chunks of CHUNK steps, flushed (and a checkpoint saved) after FLUSH_AT steps, killed after all STEPS: the
# recording on disk then holds chunks of 3, 3, 2 (the flush), 3; step 11, in the open chunk, is lost with the process
CHUNK, FLUSH_AT = 3, 8


def loader(ds):
    import unlearn_fast as uf

    sampler = torch.utils.data.DistributedSampler(uf.IndexedDataset(ds), shuffle=True, seed=3)
    return sampler, torch.utils.data.DataLoader(uf.IndexedDataset(ds), batch_size=PER_RANK, sampler=sampler)


def steps(sampler, loader, start=0, stop=STEPS):
    """(step, indices, x, y) of the run's steps start .. stop-1: the sampler's epochs, the batches before `start` skipped
    (what a trainer restarted from a checkpoint at step `start` does)."""
    per_epoch = len(loader)
    for epoch in range(start // per_epoch, EPOCHS):
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            step = epoch * per_epoch + i
            if step >= stop:
                return
            if step >= start:
                yield (step, *batch)


def train(model, opt, sched, rec, batches):
    """SGD steps on the (step, indices, x, y) batches of steps(), each recorded by rec."""
    for _, idx, x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.record(idx)
        opt.step()
        sched.step()


def die():
    """End this rank as a crash would (SIGKILL: no finish, no close, no interpreter exit), after a barrier, so that every
    rank has written what it meant to before any is killed."""
    import os
    import signal

    import torch.distributed as dist

    dist.barrier()
    os.kill(os.getpid(), signal.SIGKILL)


def spawn_killed(fn, args):
    """mp.spawn WORLD processes of fn that end in die(); AssertionError unless they were killed (a worker's exception
    propagates with its traceback)."""
    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:
        if err.signal_name != "SIGKILL":
            raise
        return
    raise AssertionError("the workers ended without being killed")


# ----------------------------------------------------------------------------- trainers launched as torchrun would
def _as_torchrun(rank, world, port, out, work):
    """A spawned process as torchrun starts one (its environment), running work(rank, out); a failure is written to
    error_<rank>.txt for the test to report."""
    import os
    import traceback

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        work(rank, out)
    except BaseException:  # noqa: BLE001 (reported by the test)
        open(os.path.join(out, f"error_{rank}.txt"), "w").write(traceback.format_exc())
        code = 1
    # gloo's threads may outlive interpreter teardown and abort it (docs/distributed.md, "Teardown"): leave now
    os._exit(code)


def spawn_as_torchrun(work, out):
    """work(rank, out) in WORLD processes started with torchrun's environment (the Hugging Face and Lightning trainers
    take the process group from it); AssertionError with the first rank's traceback if any failed."""
    import os
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_as_torchrun, args=(WORLD, port, str(out), work), nprocs=WORLD, start_method="spawn", join=True)
    errors = [open(os.path.join(out, f)).read() for f in os.listdir(out) if f.startswith("error_")]
    assert not errors, errors[0]
