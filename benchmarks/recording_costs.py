"""Where the time of a full recording goes, and what rebuilding its weights costs (the numbers behind the notes on
issue 13 and docs/baselines.md), on the 10M-parameter MLP of benchmarks/recording.py:

- a plain training step, and `record()` alone in a streamed int8 recording (median over its steps);
- writing one 60 MB chunk as the store does: XXH3-128 digest, write() into the page cache, fsync, fadvise;
- one step of methods/trajectory.py's rebuild (decode a gradient row, one optimizer step) with fp32 and int8 rows.

    python benchmarks/recording_costs.py [--out benchmarks/results/recording_costs.md]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import xxhash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recording as R  # noqa: E402

import unlearn_fast as uf  # noqa: E402
from unlearn_fast.history import ChunkedRows, GradientHistory  # noqa: E402
from unlearn_fast.methods.trajectory import replay  # noqa: E402


def plain_step_ms(run, opt, k=12):
    run.steps(2, opt)
    return 1e3 * run.steps(k, opt) / k


def record_ms(run, tmp):
    opt = run.optimizer()
    rec = uf.HistoryRecorder(run.model, opt, uf.HistoryPolicy(kind="full", codec="int8"), path=os.path.join(tmp, "h"))
    inner, times = rec.record, []

    def timed(*args):
        start = time.perf_counter()
        inner(*args)
        times.append(time.perf_counter() - start)

    rec.record = timed
    run.steps(36, opt, rec)
    rec.flush()
    rec.close()
    return 1e3 * statistics.median(times)


def write_ms(tmp, nbytes=60 << 20, rounds=4):
    """Median ms of each stage of writing one chunk of `nbytes` (what store._write_durably does), and its process CPU ms."""
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    stages = []
    for _ in range(rounds):
        fn = os.path.join(tmp, "chunk")
        t0, c0 = time.perf_counter(), time.process_time()
        fd = os.open(fn, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        view = memoryview(data)
        xxhash.xxh3_128(view).hexdigest()
        t1 = time.perf_counter()
        while view:
            view = view[os.write(fd, view):]
        t2 = time.perf_counter()
        os.fsync(fd)
        t3 = time.perf_counter()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        t4, c4 = time.perf_counter(), time.process_time()
        os.unlink(fn)
        stages.append([1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2), 1e3 * (t4 - t3), 1e3 * (c4 - c0)])
    return [statistics.median(col) for col in zip(*stages)]


def rebuild_ms(run, codec, steps=24):
    opt = run.optimizer()
    rec = uf.HistoryRecorder(run.model, opt, uf.HistoryPolicy(kind="full", codec=codec))
    run.steps(steps, opt, rec)
    rec._seal()  # the rows as finish() would hand them over (no train_set needed to time the rebuild)
    p = rec.w0.numel()
    rows = ChunkedRows([(n, r["g"]) for n, _, r in rec._chunks], codec, rec.policy.blocksize, p, rec.w0.dtype)
    lrs = torch.cat([s["schedule.lrs"] for _, s, _ in rec._chunks])
    history = GradientHistory(dict(rec.meta), {"w0": rec.w0, "lrs": lrs, "batch_sizes": torch.ones(len(lrs), dtype=torch.int64)}, {"g": rows})
    rec.close()
    start = time.perf_counter()
    for _ in replay(history):
        pass
    return 1e3 * (time.perf_counter() - start) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "recording_costs.md"))
    args = ap.parse_args()
    run = R.Run(R.mlp(10))
    tmp = tempfile.mkdtemp(prefix="uf-costs-", dir=os.environ.get("UF_BENCH_TMP"))
    plain = plain_step_ms(run, run.optimizer())
    rec = record_ms(run, tmp)
    digest, write, fsync, fadvise, cpu = write_ms(tmp)
    rebuild = {codec: rebuild_ms(run, codec) for codec in ("fp32", "int8")}
    lines = [
        "# Where a full recording's time goes, and the cost of rebuilding its weights", "",
        f"`python benchmarks/recording_costs.py` on {R.cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. MLP of {R.params(run.model) / 1e6:.1f}M parameters, SGD momentum 0.9.", "",
        "| what | ms | / plain training step |", "|---|---|---|",
        f"| plain training step | {plain:.1f} | 1 |",
        f"| `record()` in a streamed int8 recording (median of 36 steps) | {rec:.1f} | {rec / plain:.2f} |",
        f"| one rebuilt step, fp32 rows (methods/trajectory.py) | {rebuild['fp32']:.1f} | {rebuild['fp32'] / plain:.2f} |",
        f"| one rebuilt step, int8 rows | {rebuild['int8']:.1f} | {rebuild['int8'] / plain:.2f} |", "",
        "Writing one 60 MB chunk as the store does (median of 4):", "",
        "| XXH3-128 | write() | fsync | fadvise | process CPU |", "|---|---|---|---|---|",
        f"| {digest:.1f} | {write:.1f} | {fsync:.1f} | {fadvise:.1f} | {cpu:.1f} |",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
