"""End to end through Hugging Face `transformers.Trainer`: a tiny GPT-2 trained by the real Trainer on the project's
canary corpus, recorded by unlearn_fast.integrations.hf, then one person's samples forgotten with the language-model
methods (gradient_ascent: fresh gradients; first_epoch_ascent: the first-epoch per-sample history the callback
recorded) and with retrain (the full step history replayed without them), each against a true retrain: the same
Trainer set-up run from the same initial weights on the data set without that person.

    .venv/bin/python benchmarks/hf_trainer.py [--epochs 30] [--threads 1]

Writes benchmarks/results/hf_trainer.{md,json,png} (the plot needs matplotlib).

    .venv/bin/python benchmarks/hf_trainer.py --resume-cost [--summary]

prints instead what a resumable recording costs (docs/integrations.md, "Checkpoints and resume"): train() streamed
with a history copy per checkpoint against in memory, the bytes and seconds of each copy, the resume's checks and
copy; --summary also checks that a kind="minimal" run resumed after a crash computes the same Mini summary. Set-up: byte-level BPE tokenizer
trained in memory on the corpus (uf.lm.train_bpe_tokenizer, digits one per token), GPT2LMHeadModel from a GPT2Config
(2 layers, width 64, SDPA attention, dropout 0: the Trainer integration refuses dropout, whose masks a replay cannot
redraw), Trainer defaults (AdamW, linear decay, max_grad_norm 1.0) with gradient accumulation 2.

A method "did its job" when (a) the person's mean loss and (b) the exposure of the person's secret each closed at least
half of the gap between the original model and the true retrain, and (c) retain perplexity rose by at most 5 %;
otherwise the report says "not unlearned" instead of a speed-up. `--report-only` re-renders the report from the json.
"""
import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import unlearn_fast as uf  # noqa: E402
from unlearn_fast.history import flat_params  # noqa: E402
from machine import cpu_model  # noqa: E402
from unlearn_fast.lm import RECOMMENDED, TextDataset, make_corpus, metrics, train_bpe_tokenizer  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
warnings.filterwarnings("ignore")


class Rows(torch.utils.data.Dataset):
    """The Trainer's data set: example i is {"input_ids": the unpadded tokens of TextDataset row i}."""

    def __init__(self, texts, indices=None):
        self.texts = texts
        self.indices = list(range(len(texts))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return {"input_ids": self.texts.input_ids[j][self.texts.labels[j] != -100]}


class Collate:
    """Right-padded causal-LM batches: labels are the inputs, -100 on padding."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), self.pad_id, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], mask[i, :n], labels[i, :n] = f["input_ids"], 1, f["input_ids"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainer_for(model, data, pad_id, epochs, out, batch=8, accumulation=2):
    import transformers

    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, num_train_epochs=epochs,
        learning_rate=3e-3, warmup_steps=20, use_cpu=True, report_to=[], remove_unused_columns=False,
        save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=Collate(pad_id))


class Timer:
    """Wall and CPU (process) seconds of a block. On a shared machine the CPU seconds of a single-threaded run are what
    the work costs; wall seconds add the waits for other users' processes."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def evaluate(model, ctx):
    forget, retain, heldout = ctx["forget_set"], ctx["retain_set"], ctx["heldout"]
    _, logp, mask = metrics.token_stats(model, forget)
    return {
        "forget_loss": float(metrics.losses(model, forget).mean()),
        "forget_min_k": float(metrics.min_k_losses(logp, mask, 0.2).mean()),
        "retain_loss": float(metrics.losses(model, retain).mean()),
        "retain_ppl": metrics.perplexity(model, retain),
        "test_loss": float(metrics.losses(model, heldout).mean()),
        "test_ppl": metrics.perplexity(model, heldout),
        "exposure": metrics.exposure(model, ctx["canary"].prefix, ctx["canary"].secret, ctx["tok"]),
    }


def machine():
    import transformers

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def _random_texts(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randint(1, 256, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g) for _ in range(n)]

    class Texts(torch.utils.data.Dataset):
        def __len__(self):
            return len(texts)

        def __getitem__(self, i):
            return {"input_ids": texts[i]}

    return Texts()


def _tiny_trainer(out, width, layers, **args):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=256, n_positions=64, resid_pdrop=0,
                                     embd_pdrop=0, attn_pdrop=0)
    options = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, use_cpu=True, report_to=[], optim="sgd",
                   learning_rate=0.5, max_grad_norm=0.2, remove_unused_columns=False, save_strategy="steps", save_steps=4,
                   logging_strategy="no", seed=0, disable_tqdm=True)
    options.update(args)
    return transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=transformers.TrainingArguments(**options),
                                train_dataset=_random_texts(), data_collator=Collate(0))


def resume_cost(summary):
    """Print the cost of resumable recording through the Trainer (tests/test_integrations.py's set-up: 48 random
    texts, batch 4, SGD, clipping 0.2, 2 epochs = 24 steps, a checkpoint every 4 steps)."""
    import shutil
    import transformers
    from unlearn_fast import store
    from unlearn_fast.integrations import hf

    copies, write = [], store.write

    def timed(path, *a, **k):  # hf's on_save copies through store.write into checkpoint-N/unlearn_history
        t = time.perf_counter()
        result = write(path, *a, **k)
        copies.append((str(path), time.perf_counter() - t))
        return result

    hf.store.write = timed
    root = tempfile.mkdtemp()
    try:
        print("| parameters | kind | train() in memory | train() resumable | history per checkpoint | copy per checkpoint | resume (checks + copy) |")
        print("|---|---|---|---|---|---|---|")
        for width, layers in ((32, 2), (128, 4)):
            for kind in ("full", "minimal"):
                policy = uf.HistoryPolicy(kind=kind, rank=2)
                wall = {}
                for resumable in (False, True):
                    out = os.path.join(root, f"{width}-{kind}-{resumable}")
                    trainer = _tiny_trainer(out, width, layers)
                    hf.record(trainer, policy, resumable=resumable)
                    copies.clear()
                    t = time.perf_counter()
                    trainer.train()
                    wall[resumable] = time.perf_counter() - t
                saved = [s for path, s in copies if "checkpoint-" in path]
                ckpts = sorted((d for d in os.listdir(out) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
                sizes = [sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(out, d, hf.HISTORY_DIR)) for f in fs)
                         for d in ckpts]
                resumed = _tiny_trainer(out, width, layers)
                cb = hf.record(resumed, policy)
                cont, spent = cb._continue, {}

                def measured(*a, **k):
                    t = time.perf_counter()
                    result = cont(*a, **k)
                    spent["resume"] = time.perf_counter() - t
                    return result

                cb._continue = measured
                middle = ckpts[len(ckpts) // 2]
                resumed.train(resume_from_checkpoint=os.path.join(out, middle))
                p = sum(q.numel() for q in resumed.model.parameters())
                print(f"| {p:,} | {kind} | {wall[False]:.2f} s | {wall[True]:.2f} s | {sizes[0] / 1e6:.2f}-{sizes[-1] / 1e6:.2f} MB "
                      f"({ckpts[0]}..{ckpts[-1]}) | {min(saved) * 1e3:.0f}-{max(saved) * 1e3:.0f} ms | {spent['resume'] * 1e3:.0f} ms ({middle}) |")
        if summary:
            class Crash(transformers.TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    if state.global_step == 13:
                        raise RuntimeError("simulated crash")

            policy, histories = uf.HistoryPolicy(kind="minimal"), []
            a = _tiny_trainer(os.path.join(root, "a"), 32, 2)
            cb = hf.record(a, policy)
            a.train()
            histories.append(cb.finish())
            b = _tiny_trainer(os.path.join(root, "b"), 32, 2)
            hf.record(b, policy)
            b.add_callback(Crash())
            try:
                b.train()
            except RuntimeError:
                pass
            c = _tiny_trainer(os.path.join(root, "b"), 32, 2)
            cb = hf.record(c, policy)
            c.train(resume_from_checkpoint=os.path.join(root, "b", "checkpoint-12"))
            histories.append(cb.finish())
            (full, resumed) = (h.summary for h in histories)
            same = {k: torch.equal(getattr(v, "all", lambda: v)(), getattr(resumed[k], "all", lambda: resumed[k])()) for k, v in full.items()}
            print(f"kind='minimal', crash at step 13, resumed from checkpoint-12: summary tensors equal to the uninterrupted run's: {same}")
    finally:
        hf.store.write = write
        shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(RESULTS, "hf_trainer"))
    parser.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json (and OUT.png) without running")
    parser.add_argument("--resume-cost", action="store_true", help="print what resumable recording costs (writes nothing)")
    parser.add_argument("--summary", action="store_true", help="with --resume-cost: check a resumed minimal run's Mini summary")
    opts = parser.parse_args()
    if opts.resume_cost:
        torch.set_num_threads(opts.threads)
        resume_cost(opts.summary)
        return
    if opts.report_only:
        with open(opts.out + ".json") as f:
            result = json.load(f)
        judge(result["rows"])
        with open(opts.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        plot = os.path.basename(opts.out + ".png") if os.path.exists(opts.out + ".png") else None
        with open(opts.out + ".md", "w") as f:
            f.write(report(result, plot))
        return
    torch.set_num_threads(opts.threads)
    import transformers
    from transformers.utils import logging as hf_logging

    from unlearn_fast.integrations import hf
    from unlearn_fast.methods import retrain

    hf_logging.set_verbosity_error()
    load_before = os.getloadavg()
    started, started_cpu = time.perf_counter(), time.process_time()
    corpus = make_corpus(seed=0, n_train=200, n_heldout=100, n_variant_people=4, variants_per_person=3, secret_digits=4)
    tok = train_bpe_tokenizer(corpus.train_texts + corpus.heldout_texts, vocab_size=512)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=len(tok),
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    initial = transformers.GPT2LMHeadModel(config)
    train_set = TextDataset(corpus.train_texts, tok, context=initial)
    heldout = TextDataset(corpus.heldout_texts, tok, context=initial)
    name, person = next(iter(corpus.variants.items()))  # a "variant" person: a biography with a secret + 2 other samples
    canary = next(c for c in corpus.train_canaries if c.sample in person)
    n = len(train_set)
    keep = [i for i in range(n) if i not in person]
    ctx = dict(forget_set=train_set.subset(person), retain_set=train_set.subset(keep), heldout=heldout, canary=canary, tok=tok)
    pad_id = train_set.tokenizer.pad_id

    with tempfile.TemporaryDirectory() as tmp:
        # the original model, trained by the Trainer and recorded
        model = copy.deepcopy(initial)
        trainer = trainer_for(model, Rows(train_set), pad_id, opts.epochs, os.path.join(tmp, "a"))
        cb = hf.record(trainer, uf.HistoryPolicy(kind="full"),
                       per_sample=uf.HistoryPolicy(kind="first_epoch", per_sample=True, params="embeddings", codec="int8", blocksize=4096))
        with Timer() as train_time:
            trainer.train()
        with Timer() as finish_time:
            history = cb.finish()
            per_sample = cb.per_sample_history()
        model = trainer.model
        # the true retrain: the same Trainer set-up from the same initial weights without the person's samples
        truth = copy.deepcopy(initial)
        with Timer() as truth_time:
            trainer_for(truth, Rows(train_set, keep), pad_id, opts.epochs, os.path.join(tmp, "b")).train()
        # the noise floor of "the same run": the same 16 samples per optimizer step, as 4 micro-batches of 4
        twin = copy.deepcopy(initial)
        trainer_for(twin, Rows(train_set), pad_id, opts.epochs, os.path.join(tmp, "c"), batch=4, accumulation=4).train()

    # retrain forgetting nothing replays the Trainer's run (what the recorded schedule must reproduce)
    with Timer() as replay_time:
        replayed, _ = retrain.run(copy.deepcopy(model), history, torch.tensor([], dtype=torch.int64), cb.replay_set, cb.replay_loss)
    replay = {"max_abs_dw": float((flat_params(replayed) - flat_params(model)).abs().max()),
              "noise_floor_max_abs_dw": float((flat_params(twin) - flat_params(model)).abs().max()),
              "total_movement": float((flat_params(model) - history.schedule["w0"]).abs().max()),
              "seconds": replay_time.wall, "cpu_seconds": replay_time.cpu}
    del replayed

    runs = {}
    with Timer() as t:
        res = uf.unlearn(model, history, person, cb.replay_set, cb.replay_loss, method="retrain")
    runs["retrain (full history)"] = (res.model, t, {"forgotten": person})
    with Timer() as t:
        res = uf.unlearn(model, None, name, train_set, None, method="gradient_ascent", heldout=heldout, **RECOMMENDED)
    runs["gradient_ascent (fresh gradients, RECOMMENDED)"] = (res.model, t, res.stats)
    with Timer() as t:  # what the 5 % retain budget holds back: the same with a 4x looser one
        res = uf.unlearn(model, None, name, train_set, None, method="gradient_ascent", heldout=heldout,
                         **dict(RECOMMENDED, retain_tolerance=0.2))
    runs["gradient_ascent (RECOMMENDED, retain_tolerance 0.2)"] = (res.model, t, res.stats)
    with Timer() as t:
        res = uf.unlearn(model, per_sample, name, train_set, None, method="first_epoch_ascent", heldout=heldout,
                         retain_guard="fisher", calibration="floor", statistic="min_k", min_k=0.2)
    runs["first_epoch_ascent (first-epoch history, fisher, floor Min-K%)"] = (res.model, t, res.stats)

    rows = {"original (Trainer)": dict(evaluate(model, ctx), seconds=train_time.wall, cpu_seconds=train_time.cpu),
            "true retrain (Trainer without the person)": dict(evaluate(truth, ctx), seconds=truth_time.wall, cpu_seconds=truth_time.cpu)}
    orig, true = rows["original (Trainer)"], rows["true retrain (Trainer without the person)"]
    for label, (unlearned, timer, stats) in runs.items():
        row = dict(evaluate(unlearned, ctx), seconds=timer.wall, cpu_seconds=timer.cpu)
        row.update(                   status=stats.get("status"), matches=[m["index"] for m in stats.get("matches", [])] or None,
                   max_abs_dw_to_true_retrain=float((flat_params(unlearned) - flat_params(truth)).abs().max()))
        rows[label] = row
    judge(rows)
    result = {
        "command": "python benchmarks/hf_trainer.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - started_cpu,
        "setup": {"n_train": n, "n_heldout": len(heldout), "epochs": opts.epochs, "optimizer_steps": len(history.schedule["batches"]),
                  "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok), "person": name, "person_samples": person,
                  "canary_secret_digits": len(canary.secret), "attention": model.config._attn_implementation,
                  "trainer": history.meta["hf_trainer"], "optimizer": history.meta["optimizer"]["class"],
                  "finish_seconds": finish_time.wall, "per_sample_bytes": per_sample.bytes_per_sample()},
        "replay_forgetting_nothing": replay,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot = make_plot(rows, opts.out + ".png")
    with open(opts.out + ".md", "w") as f:
        f.write(report(result, plot))
    print(report(result, plot))


def judge(rows):
    """The verdict of each unlearning row against the first two (original, true retrain): the share of the gap between
    them it closed on the person's mean loss and on the canary's exposure, the retain perplexity rise, and "unlearned"
    when both gaps are at least half closed and retain perplexity rose by at most 5 %; speed-ups (CPU and wall seconds
    of the true retrain over the method's) only then."""
    (orig, true), runs = list(rows.values())[:2], list(rows.values())[2:]
    for row in runs:
        row["gap_closed"] = (row["forget_loss"] - orig["forget_loss"]) / (true["forget_loss"] - orig["forget_loss"])
        row["exposure_gap_closed"] = (orig["exposure"] - row["exposure"]) / (orig["exposure"] - true["exposure"])
        row["retain_rise"] = row["retain_ppl"] / orig["retain_ppl"] - 1
        row["unlearned"] = bool(row["gap_closed"] >= 0.5 and row["exposure_gap_closed"] >= 0.5 and row["retain_rise"] <= 0.05)
        row["speedup"] = true["cpu_seconds"] / row["cpu_seconds"] if row["unlearned"] else None
        row["speedup_wall"] = true["seconds"] / row["seconds"] if row["unlearned"] else None


def make_plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [k.split(" (")[0] + (" 20 %" if "0.2" in k else "") for k in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, key, title in zip(axes, ("forget_loss", "exposure", "retain_ppl", "cpu_seconds"),
                              ("person's mean loss (nats)", "canary exposure (bits)", "retain perplexity", "CPU seconds (log)")):
        values = [rows[k][key] for k in rows]
        ax.bar(range(len(values)), values, color=["grey", "black", "tab:blue", "tab:orange", "tab:red", "tab:green"][: len(values)])
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if key == "cpu_seconds":
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return os.path.basename(path)


def report(r, plot):
    s, m = r["setup"], r["machine"]
    lines = [
        "# Hugging Face Trainer end to end: record, forget one person, compare with a true retrain", "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs shared with other users, torch {m['torch']} on {m['torch_threads']} "
        f"thread(s), transformers {m['transformers']}; load average before {tuple(round(x, 2) for x in r['load_average_before'])}, "
        f"after {tuple(round(x, 2) for x in r['load_average_after'])}; whole run {r['wall_seconds']:.0f} s wall, "
        f"{r['cpu_seconds']:.0f} s CPU.", "",
        f"Set-up: GPT2LMHeadModel ({s['params']:,} parameters, 2 layers, width 64, {s['attention']} attention, no dropout), "
        f"byte-level BPE tokenizer of {s['vocab']} tokens trained in memory on the corpus (digits one per token); "
        f"{s['n_train']} training samples ({s['n_heldout']} held out), `transformers.Trainer` with AdamW lr 3e-3, linear decay, "
        f"max_grad_norm {s['trainer']['max_grad_norm']}, batch 8 x gradient accumulation {s['trainer']['gradient_accumulation_steps']}, "
        f"{s['epochs']} epochs = {s['optimizer_steps']} optimizer steps. Recorded with `hf.record(trainer, HistoryPolicy(kind='full'), "
        f"per_sample=HistoryPolicy(kind='first_epoch', params='embeddings', codec='int8'))`; `cb.finish()` and the per-sample history "
        f"took {s['finish_seconds']:.1f} s; per-sample rows {s['per_sample_bytes']['stored']:,} bytes each "
        f"({s['per_sample_bytes']['fp32'] / s['per_sample_bytes']['stored']:.2f}x below fp32).", "",
        f"Forgotten: every sample of {s['person']!r} (indices {s['person_samples']}: a biography ending in a "
        f"{s['canary_secret_digits']}-digit secret and two other samples naming the person). The ascent methods get the "
        "name as a text request (fuzzy matching); retrain gets the indices. The true retrain is the same Trainer set-up "
        "from the same initial weights on the data set without the person (the Trainer draws another batch order).", "",
        "| model | person's loss | person's Min-K% loss | canary exposure (bits) | retain ppl | test ppl | gap closed: loss / exposure | CPU s (wall s) | speed-up vs true retrain, CPU (wall) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in r["rows"].items():
        if "gap_closed" in row:
            verdict = f"{row['speedup']:.1f}x ({row['speedup_wall']:.1f}x)" if row["unlearned"] else "not unlearned"
            closed = f"{100 * row['gap_closed']:.1f} % / {100 * row['exposure_gap_closed']:.1f} %"
        else:
            verdict, closed = "", ""
        lines.append(f"| {label} | {row['forget_loss']:.3f} | {row['forget_min_k']:.3f} | {row['exposure']:.2f} | {row['retain_ppl']:.3f} | "
                     f"{row['test_ppl']:.3f} | {closed} | {row['cpu_seconds']:.2f} ({row['seconds']:.2f}) | {verdict} |")
    rp = r["replay_forgetting_nothing"]
    lines += [
        "",
        "\"gap closed\": how much of the gap between the original's and the true retrain's values the method closed, on the "
        "person's mean loss and on the canary's exposure. A method counts as unlearned when both are >= 50 % and retain "
        "perplexity rose by at most 5 %; otherwise the last "
        "column says \"not unlearned\" instead of a speed-up. Seconds: CPU seconds of this process (one torch thread; the "
        "speed-up is their ratio) and wall seconds in parentheses (they include waiting for other users' processes); "
        "the Trainer's `train()` for the first two rows, "
        "`uf.unlearn` for the others (retrain replays every recorded step without the person's samples, with the Trainer's "
        "loss normalisation, and clips at the recorded max_grad_norm).", "",
        f"Replay check: `retrain` forgetting nothing lands {rp['max_abs_dw']:.2e} (max |dw|) from the Trainer's final weights, "
        f"which moved {rp['total_movement']:.3f} from their initial values ({rp['cpu_seconds']:.1f} CPU s). The noise floor: the "
        f"same Trainer run with the same 16 samples per optimizer step split into 4 micro-batches of 4 instead of 2 of 8 ends "
        f"{rp['noise_floor_max_abs_dw']:.2e} from it. AdamW divides by sqrt(v) + 1e-8, so float rounding in near-zero gradient "
        "coordinates becomes weight differences of a fraction of the learning rate, which later steps carry on; with SGD the "
        "same replay (accumulation 2, clipping 1.0) is exact to float rounding: 3.6e-7 after 180 steps of the tests' tiny GPT-2 "
        "(30 epochs; the same runs with AdamW: replay 1.1e-3, noise floor 9.8e-4 to 1.2e-3); tests/test_integrations.py checks "
        "1e-6 over 12 steps.", "",
    ]
    for label, row in r["rows"].items():
        if row.get("status") or row.get("matches"):
            lines.append(f"- {label}: status `{row['status']}`, matched samples {row['matches']}, retain perplexity "
                         f"{100 * row['retain_rise']:+.1f} %, max |dw| to the true retrain {row['max_abs_dw_to_true_retrain']:.3f}.")
        elif "gap_closed" in row:
            lines.append(f"- {label}: max |dw| to the true retrain {row['max_abs_dw_to_true_retrain']:.3f} (another batch order: "
                         "two retrains land apart by this much).")
    lines.append("")
    lines.append(f"![results]({plot})" if plot else "(No plot: matplotlib is not installed in .venv.)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
