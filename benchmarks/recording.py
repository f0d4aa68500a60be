"""What recording costs a training run: per-step overhead of HistoryRecorder.record(), resident memory
against steps, and disk bytes per step per codec.

Overhead: for each model, rounds of K training steps each, interleaved within a round: plain SGD (no
recorder), kind="minimal", and kind="full" with codec int8 streamed to disk by the background writer
(path=), and kind="full" int8 in memory. The table reports the median over rounds of each mode's mean step time
and the ratio to the plain step measured in the same round (medians of per-round ratios: this machine is shared
and noisy). The full modes are timed in steady state: one untimed chunk first, then several chunks' steps
(FULL_WINDOW_CHUNKS), the streamed one including the wait for the last chunk at the end (not the weights digest of
flush(): that is a trainer checkpoint's cost, reported apart per flush).
Goals (issue 13): minimal at most +5 %, full int8 streamed at most +25 %.

Memory: one run of S steps per mode on the largest MLP with VmRSS read after every step: full int8
streamed (bounded: the open chunk plus at most two waiting ones) against full int8 held in memory
(grows with steps). Plotted to recording_rss.png.

Bytes: disk bytes per step of a finished streamed history per codec on the smallest MLP (directory size /
steps), against the model's fp32 size.

    .venv/bin/python benchmarks/recording.py [--sizes 10,50,100] [--rounds 5] [--steps 4] [--rss-steps 40] [--threads N]
        [--before OLD/recording.json]
Writes benchmarks/results/recording.md, .json, recording_rss.png and recording_overhead.png. --before adds a table of an earlier run's ratios
(e.g. this script run at another commit into another --out, just before) next to this run's.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import unlearn_fast as uf
from machine import cpu_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GOALS = {"minimal": 1.05, "full_int8_memory": 1.25, "full_int8_stream": 1.25}


def commit():
    """The commit of the unlearn_fast being measured (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(uf.__file__)), capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# ----------------------------------------------------------------------------- workloads
def mlp(millions):
    """Four square layers of width h: about 4 h^2 parameters."""
    h = int((millions * 1e6 / 4) ** 0.5)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(h, h), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1], torch.nn.Linear(h, 10))
    return f"MLP {millions}M", model, (lambda n, g: torch.randn(n, h, generator=g)), 10, 64


def cnn():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )
    return "CNN 32x32", model, (lambda n, g: torch.randn(n, 3, 32, 32, generator=g)), 10, 64


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=64))

    class LM(torch.nn.Module):  # logits of a batch of token ids: the loss below is next-token cross-entropy
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(input_ids=x).logits[:, :-1].reshape(-1, 2048)

    return "GPT-2 4x256", LM(model), (lambda n, g: torch.randint(0, 2048, (n, 64), generator=g)), None, 8


def e2e_logistic():
    """The end-to-end benchmark's logistic regression on 8x8 digits (64 features, 10 classes, batch 64): a step of a few
    tenths of a millisecond, where the recorder's per-step Python work is what shows."""
    return "Logistic 64x10", torch.nn.Linear(64, 10), (lambda n, g: torch.randn(n, 64, generator=g)), 10, 64


def e2e_mlp():
    """The end-to-end benchmark's MLP on 8x8 digits."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return "MLP 64-64-10", model, (lambda n, g: torch.randn(n, 64, generator=g)), 10, 64


def loss_for(classes):
    if classes is None:  # language model: targets are the next tokens of x
        return lambda out, x: torch.nn.functional.cross_entropy(out, x[:, 1:].reshape(-1))
    return torch.nn.functional.cross_entropy


class Run:
    """One workload's training loop; `steps(k, recorder)` runs k steps and returns their wall time."""

    device = "cpu"  # main() sets it from --device

    def __init__(self, spec):
        self.name, self.model, self.make_x, self.classes, self.batch = spec
        self.model.to(self.device)
        self.loss = loss_for(self.classes)
        self.gen = torch.Generator().manual_seed(0)
        self.n = 10_000
        self.at = 0

    def optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def steps(self, k, opt, rec=None, rss=None):
        x = self.make_x(self.batch, self.gen).to(self.device)
        y = x if self.classes is None else torch.randint(0, self.classes, (self.batch,), generator=self.gen).to(self.device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(k):
            idx = torch.arange(self.at, self.at + self.batch) % self.n
            self.at += self.batch
            opt.zero_grad(set_to_none=True)
            self.loss(self.model(x), y).backward()
            if rec is not None:
                rec.record(idx)
            opt.step()
            if rss is not None:
                rss.append(rss_mib())
        if self.device != "cpu":  # the queued kernels belong to these steps
            torch.cuda.synchronize()
        self.cpu_seconds = time.process_time() - cpu  # every thread's: training's, and the writer's
        return time.perf_counter() - start


def params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- measurements
MODES = ("plain", "minimal", "full_int8_memory", "full_int8_stream")
LONG_RUN = 1152  # a minimal recorder is timed as in the middle of a run this long (its checkpoint grid at steady state)
# kind="full": timed over this many chunks (at most FULL_WINDOW_MAX steps) after one untimed chunk: the background writer
# may hold MAX_WAITING chunks, so a writer slower than training blocks record() within the window
FULL_WINDOW_CHUNKS, FULL_WINDOW_MAX = 4, 96
MIN_WINDOW_S = 0.05  # each mode's steps in a round span at least this many seconds of plain training (small models take more steps)


def recorder(mode, run, opt, path):
    if mode == "plain":
        return None
    if mode == "minimal":
        rec = uf.HistoryRecorder(run.model, opt, uf.HistoryPolicy(kind="minimal"))
        for step in range(LONG_RUN):  # the grid as after LONG_RUN steps: a checkpoint every rec.grid.every steps
            rec.grid.offer(step)
        rec.steps = LONG_RUN
        return rec
    return uf.HistoryRecorder(run.model, opt, uf.HistoryPolicy(kind="full", codec="int8"), path=path if mode.endswith("stream") else None)


def overhead(spec, rounds, k, tmp):
    """Per mode and round, the mean time of k steps; a minimal recorder's steps that took a checkpoint are timed apart
    (they are 1 in rec.grid.every steps of a long run) and the amortized cost reported."""
    run = Run(spec)
    opt = run.optimizer()
    run.steps(2, opt)  # warm-up: allocator, thread pool
    k = max(k, math.ceil(MIN_WINDOW_S / (run.steps(3, opt) / 3)))
    times = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}  # CPU seconds per step of the whole process: less sensitive to other users of the machine
    checkpoint_steps, every, flush_seconds = [], None, []
    for r in range(rounds):
        for mode in MODES:
            opt = run.optimizer()
            path = os.path.join(tmp, f"h{r}")
            rec = recorder(mode, run, opt, path)
            n = k
            if mode.startswith("full"):
                # as in the middle of a run: one chunk recorded (the writer busy with it, its buffers to refill), then
                # a window of several chunks, so that the writer's work overlaps training as it does in a long run
                run.steps(rec.chunk_steps, opt, rec)
                n = max(k, min(FULL_WINDOW_MAX, FULL_WINDOW_CHUNKS * rec.chunk_steps))
            plain_steps, cpu_seconds = [], 0.0
            for _ in range(n):
                taken = len(rec.checkpoints) if mode == "minimal" else 0
                seconds = run.steps(1, opt, rec)
                cpu_seconds += run.cpu_seconds
                if mode == "minimal" and rec.grid.kept and rec.grid.kept[-1] == rec.steps - 1 and len(rec.checkpoints) > taken:
                    checkpoint_steps.append(seconds)
                else:
                    plain_steps.append(seconds)
            if mode == "full_int8_stream":
                # what is still queued counts (spread over the window): a writer slower than training shows here. Waited
                # for without flush(), whose resume mark hashes the weights: a cost of each trainer checkpoint, not of
                # every step (timed apart below)
                start, cpu_start = time.perf_counter(), time.process_time()
                rec._seal()
                rec._writer.join()
                plain_steps[-1] += time.perf_counter() - start
                cpu_seconds += time.process_time() - cpu_start
                start = time.perf_counter()
                rec.flush()
                flush_seconds.append(time.perf_counter() - start)
            if mode == "minimal":
                every = rec.grid.every
            if rec is not None:
                rec.close()
            shutil.rmtree(path, ignore_errors=True)
            times[mode].append(statistics.mean(plain_steps) if plain_steps else float("nan"))
            cpu[mode].append(cpu_seconds / n)
            print(f"  {spec[0]} round {r} {mode}: {times[mode][-1] * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
    plain = times["plain"]
    out = {"params": params(run.model), "plain_ms": 1e3 * statistics.median(plain), "minimal_checkpoint_every": every}
    for mode in MODES[1:]:
        ratios = [m / p for m, p in zip(times[mode], plain)]
        cpu_ratios = [m / p for m, p in zip(cpu[mode], cpu["plain"])]
        out[mode] = {"ms": 1e3 * statistics.median(times[mode]), "ratio": statistics.median(ratios), "ratios": ratios,
                     "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios}
    out["full_int8_stream"]["flush_ms"] = 1e3 * statistics.median(flush_seconds)
    if checkpoint_steps:  # one checkpoint every `every` steps: its extra time spread over them
        extra = statistics.median(checkpoint_steps) / statistics.median(plain) - 1
        out["minimal"]["checkpoint_step_ratio"] = 1 + extra
        out["minimal"]["amortized_ratio"] = out["minimal"]["ratio"] + extra / every
    return out


def memory(spec, steps, tmp):
    run = Run(spec)
    curves = {}
    for mode in ("full_int8_stream", "full_int8_in_memory"):
        opt = run.optimizer()
        path = os.path.join(tmp, "rss") if mode.endswith("stream") else None
        rec = uf.HistoryRecorder(run.model, opt, uf.HistoryPolicy(kind="full", codec="int8"), path=path)
        rss = [rss_mib()]
        run.steps(steps, opt, rec, rss)
        curves[mode] = rss
        rec.close()
        if path:
            shutil.rmtree(path)
        del rec
        print(f"  rss {mode}: {rss[0]:.0f} -> {rss[-1]:.0f} MiB over {steps} steps", file=sys.stderr, flush=True)
    return curves


def disk_bytes(spec, steps, tmp):
    run = Run(spec)
    out = {}
    for codec in uf.history.CODECS:
        opt = run.optimizer()
        path = os.path.join(tmp, codec)
        rec = uf.HistoryRecorder(run.model, opt, uf.HistoryPolicy(kind="full", codec=codec), path=path)
        sizes = []
        for _ in range(2):  # the growth between two flushes: per-step bytes without w0 and the manifest
            run.steps(steps, opt, rec)
            rec.flush()
            sizes.append(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs))
        rec.close()
        out[codec] = (sizes[1] - sizes[0]) / steps
        shutil.rmtree(path)
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_overhead(rows, path):
    """Each mode's step-time ratio to plain training per workload (median of rounds, with each round's ratio as a
    dot), and the goals as lines."""
    plt = _pyplot()
    if plt is None:
        return False
    modes = MODES[1:]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[mode]["ratio"] for r in rows.values()], width, label=mode.replace("_", " "))
        for x, r in zip(xs, rows.values()):
            ax.plot([x] * len(r[mode]["ratios"]), r[mode]["ratios"], "k.", markersize=3)
    for mode, style in (("minimal", ":"), ("full_int8_stream", "--")):
        ax.axhline(GOALS[mode], color="grey", linestyle=style, linewidth=1, label=f"goal {mode.split('_')[0]} ({GOALS[mode]})")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(list(rows))
    ax.set_ylabel("step time / plain step")
    ax.set_ylim(0.8, max(1.5, max(max(r[m]["ratios"]) for r in rows.values() for m in modes) + 0.05))
    ax.set_title("record() overhead (bars: median of rounds; dots: each round)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def plot(curves, name, path):
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, rss in curves.items():
        ax.plot(range(len(rss)), rss, label=mode.replace("_", " "))
    ax.set_xlabel("training steps recorded")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"HistoryRecorder kind='full', int8, {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,50,100", help="MLP sizes in millions of parameters")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per mode per round")
    ap.add_argument("--rss-steps", type=int, default=40)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the models train (the history is written from host memory)")
    ap.add_argument("--before", default=None, help="recording.json of an earlier run (another commit) to show next to this one")
    ap.add_argument("--label", default=None, help="what is measured, recorded as its commit (default: git HEAD of unlearn_fast)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    Run.device = args.device
    before = None
    if args.before:
        with open(args.before) as f:
            before = json.load(f)
    sizes = [float(s) if "." in s else int(s) for s in args.sizes.split(",")]
    specs = [mlp(s) for s in sizes] + [cnn(), gpt2(), e2e_logistic(), e2e_mlp()]
    tmp = tempfile.mkdtemp(prefix="uf-recording-", dir=os.environ.get("UF_BENCH_TMP"))
    load_before = os.getloadavg()
    try:
        rows = {}
        for spec in specs:
            print(f"{spec[0]}: {params(spec[1]) / 1e6:.1f}M parameters", file=sys.stderr, flush=True)
            rows[spec[0]] = overhead(spec, args.rounds, args.steps, tmp)
        big = specs[len(sizes) - 1]
        curves = memory(big, args.rss_steps, tmp)
        small = specs[0]
        bytes_per_step = disk_bytes(small, 4, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/recording.py " + " ".join(sys.argv[1:])
    result = {"command": command, "cpu": cpu_model(), "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "loadavg_before": load_before, "loadavg_after": load_after, "rounds": args.rounds, "steps_per_round": args.steps,
              "overhead": rows, "rss_mib": curves, "rss_model": big[0], "disk_bytes_per_step": bytes_per_step,
              "disk_model": {"name": small[0], "params": params(small[1])}, "before": before and {k: before[k] for k in ("command", "overhead", "loadavg_before", "loadavg_after", "commit") if k in before},
              "commit": args.label or commit()}
    with open(os.path.join(args.out, "recording.json"), "w") as f:
        json.dump(result, f, indent=1)
    plotted = plot(curves, big[0], os.path.join(args.out, "recording_rss.png"))
    plot_overhead(rows, os.path.join(args.out, "recording_overhead.png"))
    lines = [
        "# Recording overhead, memory and bytes", "",
        f"`{command}` on {cpu_model()}{'' if args.device == 'cpu' else ', models on ' + torch.cuda.get_device_name()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. Medians over {args.rounds} interleaved rounds of "
        f"at least {args.steps} steps per mode (more for small models: at least {MIN_WINDOW_S * 1e3:.0f} ms of plain steps); ratio = the mode's step time / the plain step's in the same round (median of rounds).", "",
        "| workload | parameters | plain step | minimal (no checkpoint) | amortized | full int8 in memory | full int8 streamed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        def cell(mode, key="ratio"):
            value = r[mode].get(key)
            return "n/a" if value is None else f"{value:.3f} ({'met' if value <= GOALS[mode] else 'MISSED'})"

        lines.append(f"| {name} | {r['params'] / 1e6:.3g}M | {r['plain_ms']:.3g} ms | {cell('minimal')} | {cell('minimal', 'amortized_ratio')} | "
                     f"{cell('full_int8_memory')} | {cell('full_int8_stream')} |")
    lines += ["", f"Ratios to the plain step (goals: minimal <= {GOALS['minimal']}, full int8 <= {GOALS['full_int8_stream']}). A minimal recorder "
              f"is timed as in the middle of a {LONG_RUN}-step run: 'no checkpoint' is its usual step, 'amortized' adds the steps that take "
              "a parameter checkpoint (one in `every`, from its grid) spread over those steps. 'in memory' encodes g_t at record() "
              "and keeps them; 'streamed' also hands each chunk to the background writer (XXH3-128 digest, write, fsync), which shares this "
              "2-core machine with training's threads. Both full modes are timed in steady state: after one untimed chunk, over "
              f"{FULL_WINDOW_CHUNKS} chunks' steps (at most {FULL_WINDOW_MAX}, at least the round's), and 'streamed' waits for "
              "the last chunk on disk at the end (that wait spread over the window). A `flush()` (what a trainer checkpoint "
              "calls: a resume mark with the weights' sha256) is timed apart: " + ", ".join(
                  f"{name} {r['full_int8_stream']['flush_ms']:.0f} ms" for name, r in rows.items()) + " per flush."]
    lines += ["", "recording_overhead.png plots these ratios, each round's as a dot." if plotted else ""]
    lines += ["", "CPU time of the whole process per step (every thread: training's and the writer's; a minimal step that takes a "
              "checkpoint counted in), against the plain step's, median of rounds: the work record() adds, less sensitive to "
              "other users of this shared machine than wall time.", "",
              "| workload | minimal | full int8 in memory | full int8 streamed |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[mode]['cpu_ratio']:.3f}" for mode in ("minimal", "full_int8_memory", "full_int8_stream")) + " |")
    if before is not None:
        lines += ["", f"## Before and after (this run against `{before['command']}` at commit {before.get('commit', '?')}, load average "
                  f"{before['loadavg_before'][0]:.2f} before, {before['loadavg_after'][0]:.2f} after)", "",
                  "| workload | minimal before -> after | full int8 in memory before -> after | full int8 streamed before -> after |", "|---|---|---|---|"]
        for name, r in rows.items():
            b = before["overhead"].get(name)
            if b is None:
                continue
            cells = [f"{b[mode]['ratio']:.3f} -> {r[mode]['ratio']:.3f}" + (f" (CPU {b[mode]['cpu_ratio']:.3f} -> {r[mode]['cpu_ratio']:.3f})"
                     if "cpu_ratio" in b[mode] else "") for mode in ("minimal", "full_int8_memory", "full_int8_stream")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    p = result["disk_model"]["params"]
    lines += ["", f"## Resident memory against steps ({big[0]}, {args.rss_steps} steps)", "",
              "| mode | RSS at start | RSS after the last step | growth per step |", "|---|---|---|---|"]
    for mode, rss in curves.items():
        half = len(rss) // 2
        slope = (rss[-1] - rss[half]) / max(1, len(rss) - 1 - half)  # second half: after the chunk buffers filled
        lines.append(f"| {mode.replace('_', ' ')} | {rss[0]:.0f} MiB | {rss[-1]:.0f} MiB | {slope:.1f} MiB |")
    lines += ["", "recording_rss.png plots both curves." if plotted else "(matplotlib missing: no plot)", "",
              f"## Disk bytes per step ({small[0]}, {p / 1e6:.1f}M parameters, g_t per step)", "",
              "| codec | bytes per step | / model fp32 size |", "|---|---|---|"]
    for codec, b in bytes_per_step.items():
        lines.append(f"| {codec} | {b / 2**20:.2f} MiB | {b / (4 * p):.3f} |")
    with open(os.path.join(args.out, "recording.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
