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
