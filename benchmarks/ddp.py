"""DDP retrain replay (unlearn_fast.integrations.distributed.run, 2 gloo CPU processes, 1 thread each) timed against
the single-process replay (methods.retrain.run, 1 and 2 threads) of the same DDP history, and their difference.

    python benchmarks/ddp.py [--repeats 5] [--epochs 2] [--out benchmarks/results/ddp]
    python benchmarks/ddp.py --fsdp [--repeats 5] [--epochs 2] [--out benchmarks/results/fsdp]
    python benchmarks/ddp.py --dropout 0.2 [--out benchmarks/results/ddp_dropout]
    python benchmarks/ddp.py --dropout 0.2 --accumulate 2 [--out benchmarks/results/ddp_dropout_accumulated]

--dropout P: the MLP with dropout P after each hidden layer, each rank's generator seeded apart: the history keeps
every rank's generator state per step and every replay draws each rank's masks from its own.

--accumulate A: each rank's batch as A micro-batches (the first A - 1 under no_sync, each loss / A), recorded with
allow=('accumulation',); with dropout every rank's micro-batches are kept and replayed one by one.

--fsdp: the same workload trained under FSDP2 (fully_shard, 2 gloo processes) with and without ShardedRecorder, the
FSDP2 replay (run_sharded) timed, and compared with the single-process replay of the gathered shard histories.

The history is recorded under DDP (2 ranks, DistributedSampler, DistributedRecorder, kind="full" with int8) on an
MLP; every replay forgets the same 10 % of the training set. Times are medians over --repeats interleaved rounds of
the replay alone (history already loaded; the ranks start together after a barrier and the time is the slower
rank's); each round also runs the single-process replay on 1 and 2 threads in rank 0 while rank 1 waits.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

# OpenMP threads that spin while waiting take the core from the other process (and from other jobs on a shared
# machine): 2-thread runs measured 10x slower with the default policy here; set before torch loads (children inherit)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from machine import cpu_model  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import unlearn_fast as uf  # noqa: E402
from unlearn_fast.history import GradientHistory, flat_params  # noqa: E402
from unlearn_fast.integrations import distributed as ufd  # noqa: E402
from unlearn_fast.methods import retrain  # noqa: E402

WORLD, N, D, HIDDEN, CLASSES, PER_RANK = 2, 8192, 32, 512, 10, 128


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g)
    y = (X @ torch.randn(D, CLASSES, generator=g)).argmax(1)
    return torch.utils.data.TensorDataset(X, y)


DROPOUT = float(os.environ.get("UF_BENCH_DROPOUT", "0"))  # (--dropout: set before the ranks spawn, which inherit it)
ACCUMULATE = int(os.environ.get("UF_BENCH_ACCUMULATE", "1"))  # (--accumulate, likewise)


def net():
    torch.manual_seed(0)
    drop = [torch.nn.Dropout(DROPOUT)] if DROPOUT else []
    return torch.nn.Sequential(torch.nn.Linear(D, HIDDEN), torch.nn.ReLU(), *drop, torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
                               *drop, torch.nn.Linear(HIDDEN, CLASSES))


def forget_set():
    # (seed 1 would be DistributedSampler(seed=0)'s permutation of epoch 1: whole world batches forgotten)
    return torch.randperm(N, generator=torch.Generator().manual_seed(12345))[: N // 10].sort().values


def worker(rank, init_file, out, epochs, repeats):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ds, model = data(), net()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(1000 + rank)  # (dropout: each rank's own masks)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rec = ufd.DistributedRecorder(ddp, opt, uf.HistoryPolicy(kind="full", codec="int8"), allow=("accumulation",) if ACCUMULATE > 1 else ())
        sampler = torch.utils.data.DistributedSampler(uf.IndexedDataset(ds), shuffle=True, seed=0, drop_last=True)
        loader = torch.utils.data.DataLoader(uf.IndexedDataset(ds), batch_size=PER_RANK, sampler=sampler, drop_last=True)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for idx, x, y in loader:
                opt.zero_grad()
                for m, (xm, ym) in enumerate(zip(x.chunk(ACCUMULATE), y.chunk(ACCUMULATE))):
                    with ddp.no_sync() if m < ACCUMULATE - 1 else contextlib.nullcontext():
                        (F.cross_entropy(ddp(xm), ym) / ACCUMULATE).backward()
                rec.record(idx)
                opt.step()
        train_s = time.perf_counter() - t0
        history = rec.finish(ds, F.cross_entropy)
        if rank == 0:
            history.save(os.path.join(out, "history"))
            torch.save(model.state_dict(), os.path.join(out, "trained.pt"))
        dist.barrier()
        history = GradientHistory.load(os.path.join(out, "history"))
        forget = forget_set()
        # interleaved rounds (this machine's load changes by the minute): the DDP replay on both ranks, then on rank 0
        # the single-process replay on 1 and 2 threads while rank 1 waits in a barrier (blocked, not spinning)
        times, single, waiting_cpu, cpu, single_models = [], {1: [], 2: []}, [], [], {}
        for r in range(repeats + 1):  # round 0: warm-up, not counted
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            replayed, stats = ufd.run(net(), history, forget, ds, F.cross_entropy)
            c1 = time.process_time()
            dist.barrier()
            if r:
                times.append(time.perf_counter() - t0)
                cpu.append(c1 - c0)
            cpu0 = time.process_time()
            if rank == 0:
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    t0 = time.perf_counter()
                    single_models[threads], single_stats = retrain.run(net(), history, forget, ds, F.cross_entropy)
                    if r:
                        single[threads].append(time.perf_counter() - t0)
                torch.set_num_threads(1)
            dist.barrier()
            if rank == 1 and r:
                waiting_cpu.append(time.process_time() - cpu0)  # CPU rank 1 used while rank 0 ran the single-process replays
        none, _ = ufd.run(net(), history, torch.zeros(0, dtype=torch.int64), ds, F.cross_entropy)
        # the communication alone: one all-reduce of the replay's buffer (the gradient and one flag per parameter) per step
        buf = torch.zeros(sum(p.numel() for p in model.parameters()) + len(list(model.parameters())))
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(stats["steps"]):
            dist.all_reduce(buf)
        comm_s = time.perf_counter() - t0
        if rank == 1:
            torch.save((waiting_cpu, cpu), os.path.join(out, "rank1_cpu.pt"))
        dist.barrier()
        if rank == 0:
            waiting_cpu, cpu1 = torch.load(os.path.join(out, "rank1_cpu.pt"))
            torch.save({"waiting_cpu": waiting_cpu, "cpu": [cpu, cpu1], "replayed": replayed.state_dict(), "none": none.state_dict(), "times": times, "single": single,
                        "single_models": {t: m.state_dict() for t, m in single_models.items()}, "train_s": train_s, "comm_s": comm_s, "steps": stats["steps"],
                        "recorded_steps": len(history.schedule["batches"]), "single_steps": single_stats["steps"]},
                       os.path.join(out, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def fsdp_worker(rank, init_file, out, epochs, repeats):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ds = data()

        def sharded():
            m = net()
            fully_shard(m)
            return m

        def train(model, rec):
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            recorder = ufd.ShardedRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="int8")) if rec else None
            sampler = torch.utils.data.DistributedSampler(uf.IndexedDataset(ds), shuffle=True, seed=0, drop_last=True)
            loader = torch.utils.data.DataLoader(uf.IndexedDataset(ds), batch_size=PER_RANK, sampler=sampler, drop_last=True)
            dist.barrier()
            t0 = time.perf_counter()
            for epoch in range(epochs):
                sampler.set_epoch(epoch)
                for idx, x, y in loader:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    if recorder is not None:
                        recorder.record(idx)
                    opt.step()
            dist.barrier()
            return time.perf_counter() - t0, recorder

        train_plain_s, _ = train(sharded(), False)
        model = sharded()
        train_s, rec = train(model, True)
        history = rec.finish(ds)
        ufd.save_sharded(history, os.path.join(out, "history"))
        trained = {k: v.full_tensor() for k, v in model.state_dict().items()}
        history = ufd.load_sharded(os.path.join(out, "history"), model)
        dist.barrier()
        gathered = None
        if rank == 0:  # the single-process history, for the single-process replay interleaved with the FSDP2 one
            gathered = ufd.gather_shards([GradientHistory.load(os.path.join(out, "history", f"rank-{r}")) for r in range(WORLD)])
            gathered.trajectory = None  # the retrain replay reads the schedule alone
        forget, times, cpu, single_times, single = forget_set(), [], [], [], None
        for r in range(repeats + 1):  # round 0: warm-up, not counted
            fresh = sharded()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            replayed, stats = ufd.run_sharded(fresh, history, forget, ds, F.cross_entropy)
            c1 = time.process_time()
            dist.barrier()
            if r:
                times.append(time.perf_counter() - t0)
                cpu.append(c1 - c0)
            if rank == 0:  # rank 1 waits in the barrier (blocked, not spinning)
                t0 = time.perf_counter()
                single, single_stats = retrain.run(net(), gathered, forget, ds, F.cross_entropy)
                if r:
                    single_times.append(time.perf_counter() - t0)
            dist.barrier()
        replayed = {k: v.full_tensor() for k, v in replayed.state_dict().items()}
        none, _ = ufd.run_sharded(sharded(), history, torch.zeros(0, dtype=torch.int64), ds, F.cross_entropy)
        none = {k: v.full_tensor() for k, v in none.state_dict().items()}
        every = [None] * WORLD
        dist.all_gather_object(every, {"times": times, "cpu": cpu, "train_s": train_s, "train_plain_s": train_plain_s})
        if rank == 0:
            torch.save({"ranks": every, "trained": trained, "replayed": replayed, "none": none, "steps": stats["steps"],
                        "recorded_steps": len(history.schedule["batches"]), "single": single.state_dict(), "single_times": single_times,
                        "single_steps": single_stats["steps"]}, os.path.join(out, "fsdp.pt"))
    finally:
        dist.destroy_process_group()
    # fully_shard keeps its gloo group alive past destroy_process_group (docs/distributed.md, "Teardown"): no finalization
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fsdp_main(args):
    load_before = os.getloadavg()
    started = time.perf_counter()
    ds, forget = data(), forget_set()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fsdp_worker, args=(os.path.join(tmp, "init"), tmp, args.epochs, args.repeats), nprocs=WORLD, join=True)
        res = torch.load(os.path.join(tmp, "fsdp.pt"))
        shard_dirs = [os.path.join(tmp, "history", f"rank-{r}") for r in range(WORLD)]
        shard_bytes = [sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(d) for name in names) for d in shard_dirs]
        gathered = ufd.gather_shards([GradientHistory.load(d) for d in shard_dirs])
        gathered.trajectory = None  # the retrain replay reads the schedule alone
    torch.set_num_threads(1)
    single_none, _ = retrain.run(net(), gathered, torch.zeros(0, dtype=torch.int64), ds, F.cross_entropy)
    trained, replayed, none, single = (load_state(res[k]) for k in ("trained", "replayed", "none", "single"))
    single_times = res["single_times"]
    diff = lambda a, b: float((flat_params(a) - flat_params(b)).abs().max())  # noqa: E731
    ranks = res["ranks"]
    fsdp_times = [max(a, b) for a, b in zip(ranks[0]["times"], ranks[1]["times"])]  # the slower rank's
    o = {
        "command": "python benchmarks/ddp.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "logical_cpus": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_average_1_5_15_before": list(load_before), "load_average_1_5_15_after": list(os.getloadavg()),
        "workload": {"model": f"MLP {D}-{HIDDEN}-{HIDDEN}-{CLASSES} ReLU" + (f", dropout {DROPOUT} (each rank's masks)" if DROPOUT else ""), "parameters": sum(p.numel() for p in net().parameters()),
                     "n_train": N, "world_size": WORLD, "world_batch": WORLD * PER_RANK, "epochs": args.epochs,
                     "recorded_steps": res["recorded_steps"], "replayed_steps": res["steps"], "forget": len(forget), "codec": "int8"},
        "fsdp_training_s": {"plain": max(r["train_plain_s"] for r in ranks), "with_ShardedRecorder": max(r["train_s"] for r in ranks)},
        "fsdp_replay": {"times": fsdp_times, "median_s": statistics.median(fsdp_times),
                        "median_cpu_s_per_rank": [statistics.median(r["cpu"]) for r in ranks]},
        "single_process_replay_1_thread": {"times": single_times, "median_s": statistics.median(single_times), "steps": res["single_steps"]},
        "shard_history_bytes_per_rank": shard_bytes,
        "max_abs_diff": {
            "fsdp_replay_vs_single_replay_of_gathered_forget_10pct": diff(replayed, single),
            "fsdp_replay_forget_nothing_vs_fsdp_trained": diff(none, trained),
            "single_replay_of_gathered_forget_nothing_vs_fsdp_trained": diff(single_none, trained),
            "forgetting_moved_the_model_by": diff(single, trained),
        },
        "wall_s": time.perf_counter() - started,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(o, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(fsdp_report(o))
    print(fsdp_report(o))


def fsdp_report(o):
    w, t, d = o["workload"], o["fsdp_training_s"], o["max_abs_diff"]
    f, s = o["fsdp_replay"], o["single_process_replay_1_thread"]
    q = lambda ts: f"[{min(ts):.3f} .. {max(ts):.3f}]"  # noqa: E731
    return f"""# FSDP2 retrain replay (2 gloo processes) against a single process

- command: `{o["command"]}`; torch {o["torch"]}, {o["logical_cpus"]} logical CPUs shared with other jobs
- date: {o["date_utc"]} UTC; 1/5/15-minute load average before {[round(x, 2) for x in o["load_average_1_5_15_before"]]}, after {[round(x, 2) for x in o["load_average_1_5_15_after"]]}
- workload: {w["model"]} ({w["parameters"]:,} parameters) sharded by `fully_shard` over {w["world_size"]} ranks, {w["n_train"]} samples, world batch {w["world_batch"]}, {w["epochs"]} epochs = {w["recorded_steps"]} steps, SGD lr 0.05 momentum 0.9; ShardedRecorder kind="full", {w["codec"]}; every replay forgets the same {w["forget"]} samples (10 %)

| run | median | [min .. max] |
|---|---:|---:|
| FSDP2 replay (`ufd.run_sharded`, 1 thread per rank; the slower rank's time) | {f["median_s"]:.3f} s | {q(f["times"])} |
| single-process replay of the gathered history (`methods.retrain.run`, 1 thread) | {s["median_s"]:.3f} s | {q(s["times"])} |

Medians of {len(f["times"])} interleaved rounds after one warm-up round: each round runs the FSDP2 replay on both ranks, then the
single-process replay on rank 0 while rank 1 waits in a barrier. Single-process 1-thread time / FSDP2 time: {s["median_s"] / f["median_s"]:.2f}x.

Per-rank CPU time of the FSDP2 replay (median): {", ".join(f"{c:.3f} s" for c in f["median_cpu_s_per_rank"])}. FSDP2 training, {w["recorded_steps"]}
steps: {t["plain"]:.2f} s without recording, {t["with_ShardedRecorder"]:.2f} s with ShardedRecorder (one run each, one after the
other, on a machine whose load changes by the minute: not a measurement of the recording overhead).
Shard history on disk per rank: {", ".join(f"{b / 1e6:.2f} MB" for b in o["shard_history_bytes_per_rank"])}.

| comparison | max abs diff |
|---|---:|
| FSDP2 replay vs single-process replay of the gathered history, forgetting 10 % | {d["fsdp_replay_vs_single_replay_of_gathered_forget_10pct"]:.3g} |
| FSDP2 replay forgetting nothing vs the FSDP2-trained weights | {d["fsdp_replay_forget_nothing_vs_fsdp_trained"]:.3g} |
| single-process replay of the gathered history, forgetting nothing, vs the FSDP2-trained weights | {d["single_replay_of_gathered_forget_nothing_vs_fsdp_trained"]:.3g} |
| (scale) forgetting 10 % vs the trained weights | {d["forgetting_moved_the_model_by"]:.3g} |
"""


def load_state(state):
    m = net()
    m.load_state_dict(state)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ddp"))
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (ShardedRecorder, run_sharded) instead of DDP")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden layer (DDP only)")
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per rank and step (DDP only)")
    args = ap.parse_args()
    if args.accumulate > 1:
        global ACCUMULATE
        ACCUMULATE = args.accumulate
        os.environ["UF_BENCH_ACCUMULATE"] = str(args.accumulate)
    if args.dropout:
        global DROPOUT
        DROPOUT = args.dropout
        os.environ["UF_BENCH_DROPOUT"] = str(args.dropout)  # (the spawned ranks import this module again)
    if args.fsdp:
        if args.out.endswith(os.path.join("results", "ddp")):
            args.out = args.out[: -len("ddp")] + "fsdp"
        return fsdp_main(args)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp, args.epochs, args.repeats), nprocs=WORLD, join=True)
        res = torch.load(os.path.join(tmp, "ddp.pt"))
        history = GradientHistory.load(os.path.join(tmp, "history"))
        trained = load_state(torch.load(os.path.join(tmp, "trained.pt")))
    ds = data()
    single = {t: {"times": ts, "median_s": statistics.median(ts)} for t, ts in res["single"].items()}
    model, model2 = load_state(res["single_models"][1]), load_state(res["single_models"][2])
    torch.set_num_threads(1)
    single_none, _ = retrain.run(net(), history, torch.zeros(0, dtype=torch.int64), ds, F.cross_entropy)
    load_after = os.getloadavg()
    ddp_replayed, ddp_none = load_state(res["replayed"]), load_state(res["none"])
    diff = lambda a, b: float((flat_params(a) - flat_params(b)).abs().max())  # noqa: E731
    ddp_median = statistics.median(res["times"])
    out = {
        "command": "python benchmarks/ddp.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_average_1_5_15_before": list(load_before), "load_average_1_5_15_after": list(load_after),
        "workload": {"model": f"MLP {D}-{HIDDEN}-{HIDDEN}-{CLASSES} ReLU" + (f", dropout {DROPOUT} (each rank's masks)" if DROPOUT else "")
                     + (f", {ACCUMULATE} micro-batches per rank and step" if ACCUMULATE > 1 else ""), "parameters": sum(p.numel() for p in net().parameters()),
                     "n_train": N, "world_size": WORLD, "per_rank_batch": PER_RANK, "world_batch": WORLD * PER_RANK,
                     "epochs": args.epochs, "recorded_steps": res["recorded_steps"], "replayed_steps": res["steps"],
                     "replayed_steps_single_process": res["single_steps"], "forget": len(forget_set()), "optimizer": "SGD lr 0.05 momentum 0.9"},
        "ddp_training_with_recording_s": res["train_s"],
        "ddp_replay": {"times": res["times"], "median_s": ddp_median, "threads_per_rank": 1,
                       "cpu_s_per_rank": res["cpu"], "median_cpu_s_per_rank": [statistics.median(c) for c in res["cpu"]]},
        "ddp_allreduce_alone_s": res["comm_s"],
        "rank1_cpu_s_while_waiting_per_round": res["waiting_cpu"],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "single_process_replay": {f"{t}_threads": v for t, v in single.items()},
        "speedup_vs_single_1_thread": single[1]["median_s"] / ddp_median,
        "speedup_vs_single_2_threads": single[2]["median_s"] / ddp_median,
        "max_abs_diff": {
            "ddp_replay_vs_single_replay_forget_10pct": diff(ddp_replayed, model),
            "single_replay_1_thread_vs_2_threads_forget_10pct": diff(model, model2),
            "ddp_replay_vs_single_replay_forget_nothing": diff(ddp_none, single_none),
            "ddp_replay_forget_nothing_vs_ddp_trained": diff(ddp_none, trained),
            "single_replay_forget_nothing_vs_ddp_trained": diff(single_none, trained),
            "forgetting_moved_the_model_by": diff(model, trained),
        },
        "wall_s": time.perf_counter() - started,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(report(out))
    print(report(out))


def report(o):
    w, s, d = o["workload"], o["single_process_replay"], o["max_abs_diff"]
    ms = lambda v: f"{v:.3f} s"  # noqa: E731
    q = lambda ts: f"[{min(ts):.3f} .. {max(ts):.3f}]"  # noqa: E731
    return f"""# DDP retrain replay (2 gloo processes) against a single process

- command: `{o["command"]}`
- machine: {o["machine"]["cpu"]}, {o["machine"]["logical_cpus"]} logical CPUs (shared with other jobs), python {o["machine"]["python"]}, torch {o["machine"]["torch"]}
- date: {o["date_utc"]} UTC; 1/5/15-minute load average before {[round(x, 2) for x in o["load_average_1_5_15_before"]]}, after {[round(x, 2) for x in o["load_average_1_5_15_after"]]}
- workload: {w["model"]} ({w["parameters"]:,} parameters), {w["n_train"]} samples, {w["world_size"]} ranks x {w["per_rank_batch"]} = world batch {w["world_batch"]}, {w["epochs"]} epochs = {w["recorded_steps"]} recorded steps ({w["replayed_steps"]} replayed by DDP, {w["replayed_steps_single_process"]} by the single process), {w["optimizer"]}; history recorded under DDP (DistributedSampler, DistributedRecorder); every replay forgets the same {w["forget"]} samples (10 %)
- times: the replay alone (history loaded), median of {len(o["ddp_replay"]["times"])} interleaved rounds [min .. max] after one warm-up round; each round runs the DDP replay, then the single-process replay on 1 and on 2 threads (on rank 0, rank 1 blocked in a barrier)

| replay | threads | median | [min .. max] | single-process 1-thread time / this |
|---|---:|---:|---:|---:|
| DDP, 2 gloo processes (`ufd.run`) | 1 per rank | {ms(o["ddp_replay"]["median_s"])} | {q(o["ddp_replay"]["times"])} | {o["speedup_vs_single_1_thread"]:.2f}x |
| single process (`methods.retrain.run`) | 1 | {ms(s["1_threads"]["median_s"])} | {q(s["1_threads"]["times"])} | 1.00x |
| single process (`methods.retrain.run`) | 2 | {ms(s["2_threads"]["median_s"])} | {q(s["2_threads"]["times"])} | {s["1_threads"]["median_s"] / s["2_threads"]["median_s"]:.2f}x |

DDP against the single process on 2 threads: {o["speedup_vs_single_2_threads"]:.2f}x. The all-reduces alone ({w["replayed_steps"]} of the
replay's buffer, gloo over loopback) take {o["ddp_allreduce_alone_s"]:.3f} s of the DDP replay. Rank 1 used
{max(o["rank1_cpu_s_while_waiting_per_round"]):.3f} s of CPU at most per round while it waited for rank 0's single-process runs
(OMP_WAIT_POLICY={o["omp_wait_policy"]}). DDP training with recording took
{o["ddp_training_with_recording_s"]:.2f} s.

Largest absolute parameter difference:

| comparison | max abs diff |
|---|---:|
| DDP replay vs single-process replay (1 thread), forgetting 10 % | {d["ddp_replay_vs_single_replay_forget_10pct"]:.3g} |
| single-process replay on 1 thread vs on 2 threads, forgetting 10 % | {d["single_replay_1_thread_vs_2_threads_forget_10pct"]:.3g} |
| DDP replay vs single-process replay (1 thread), forgetting nothing | {d["ddp_replay_vs_single_replay_forget_nothing"]:.3g} |
| DDP replay forgetting nothing vs the DDP-trained weights | {d["ddp_replay_forget_nothing_vs_ddp_trained"]:.3g} |
| single-process replay forgetting nothing vs the DDP-trained weights | {d["single_replay_forget_nothing_vs_ddp_trained"]:.3g} |
| (scale) forgetting 10 % vs the trained weights | {d["forgetting_moved_the_model_by"]:.3g} |

The DDP replay forgetting nothing repeats DDP's arithmetic (each rank's mean over its half, halved, summed by the
all-reduce) and lands on the trained weights bit for bit; the single-process replay sums each world batch in
another order. The single-process replay's own result depends on its thread count: one world batch's gradient
on 2 threads differs from the 1-thread one by about 1e-7 relative (rounding; measured separately, not by this
script), and over the steps of this run the 1-thread and 2-thread replays of the same request drift apart by the
amount in the table, while the DDP replay (1 thread per rank) stays within rounding of the 1-thread replay.

CPU time of each rank during its DDP replays (median): {", ".join(f"{c:.3f} s" for c in o["ddp_replay"]["median_cpu_s_per_rank"])}
against {ms(o["ddp_replay"]["median_s"])} of wall time. The DDP replay splits each step's forward and backward over
the two processes and adds one all-reduce per step; both ranks wait for the slower one at every step. This
machine's 2 cores are shared with other jobs (load average above): 2 processes x 1 thread and 1 process x 2
threads each want both cores, and a rank that loses its core for a moment stalls the other at the next
all-reduce.
"""


if __name__ == "__main__":
    main()
