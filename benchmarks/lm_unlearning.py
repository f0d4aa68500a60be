"""Language-model unlearning benchmark: first-epoch stored-gradient ascent vs its variants and baselines,
each against retraining without the forget samples (the gold standard).

Tiny GPT-2 (transformers, trained from scratch on the package's canary corpus, CPU). Writes
benchmarks/results/lm_unlearning.{md,json,png}. `--quick` runs a smaller model and corpus in a few minutes.

    .venv/bin/python benchmarks/lm_unlearning.py [--quick]
"""
import argparse
import json
import os
import sys
import time
import warnings

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import unlearn_fast as uf  # noqa: E402
from unlearn_fast.history import HistoryPolicy  # noqa: E402
from unlearn_fast.lm import FirstEpochRecorder, TextDataset, build_gpt2, make_corpus, train_lm  # noqa: E402
from unlearn_fast.lm import metrics  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
warnings.filterwarnings("ignore")


def gpt2_small_storage():
    """Embedding share of GPT-2 small (124M) parameters, counted on the meta device (no weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    total = sum(p.numel() for p in model.parameters())
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"all_params": total, "embedding_params": emb, "ratio": emb / total}


def evaluate(model, ctx):
    forget_set, retain_set, heldout = ctx["forget_set"], ctx["retain_set"], ctx["heldout"]
    exposures = [metrics.exposure(model, c.prefix, c.secret) for c in ctx["forget_canaries"]]
    influence = metrics.gradient_influence(model, forget_set, range(len(forget_set)), forget_set)
    return {
        "forget_loss": float(metrics.losses(model, forget_set).mean()),
        "retain_ppl": metrics.perplexity(model, retain_set),
        "heldout_ppl": metrics.perplexity(model, heldout),
        "exposure": sum(exposures) / len(exposures),
        "exposure_fuzzy_person": exposures[-1],
        "mia_auc": metrics.mia_auc(model, forget_set, heldout),
        "self_influence": float(influence.mean()),
        "activation_similarity": float(metrics.activation_similarity(model, forget_set, range(len(forget_set)), forget_set).mean()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and corpus (a few minutes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the CPU is shared; more threads stall more than they help at this size
    cfg = dict(n_layer=2, n_embd=64, n_train=80, n_heldout=60, epochs=30, n_forget=12) if args.quick else \
        dict(n_layer=2, n_embd=64, n_train=200, n_heldout=100, epochs=60, n_forget=20)
    cfg.update(n_head=4, batch_size=16, lr=3e-3, seed=args.seed, quick=args.quick)
    last_preset = f"last_blocks:{min(2, cfg['n_layer'] - 1)}"

    corpus = make_corpus(args.seed, cfg["n_train"], cfg["n_heldout"], n_variant_people=4)
    train = TextDataset(corpus.train_texts)
    heldout = TextDataset(corpus.heldout_texts)
    fuzzy_name, fuzzy_samples = next(iter(corpus.variants.items()))
    variant_samples = {i for v in corpus.variants.values() for i in v}
    plain = [i for i in range(cfg["n_train"]) if i not in variant_samples][: cfg["n_forget"] - len(fuzzy_samples)]
    forget = sorted(plain + fuzzy_samples)
    people = plain + [fuzzy_samples[0]]  # the fuzzy person's canary last
    retain_idx = [i for i in range(len(train)) if i not in set(forget)]
    ctx = dict(forget_set=train.subset(forget), retain_set=train.subset(retain_idx), heldout=heldout,
               forget_canaries=[corpus.train_canaries[i] for i in people])

    policy = lambda kind, params: HistoryPolicy(kind=kind, codec="int8", params=params, per_sample=True)  # noqa: E731
    model = build_gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], seed=args.seed)
    recorders = {
        "embeddings": FirstEpochRecorder(model, None, policy("all_epochs", "embeddings")),
        last_preset: FirstEpochRecorder(model, None, policy("first_epoch", last_preset)),
        "all": FirstEpochRecorder(model, None, policy("first_epoch", "all")),
    }
    print(f"training the original model ({cfg['epochs']} epochs, {len(train)} samples) with recorders ...")
    trained = train_lm(model, train, cfg["epochs"], cfg["batch_size"], cfg["lr"], args.seed,
                       recorders=list(recorders.values()), progress=True)
    record_seconds = {k: r.seconds for k, r in recorders.items()}
    plain_train_seconds = trained["seconds"] - sum(record_seconds.values())
    histories = {k: r.finish() for k, r in recorders.items()}

    print("retraining without the forget samples ...")
    retrained = build_gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], seed=args.seed)
    retrain_stats = train_lm(retrained, train, cfg["epochs"], cfg["batch_size"], cfg["lr"], args.seed,
                             exclude=forget, progress=True)

    lr = cfg["lr"]
    H_emb, H_last, H_all = histories["embeddings"], histories[last_preset], histories["all"]
    runs = [  # (label, method, history, forget, options)
        ("first-epoch, embeddings, iterative", "first_epoch_ascent", H_emb, forget, dict(epochs=[0])),
        ("first-epoch, embeddings, iterative, centered", "first_epoch_ascent", H_emb, forget, dict(epochs=[0], center=True)),
        ("multi-epoch, embeddings, iterative", "first_epoch_ascent", H_emb, forget, {}),
        (f"first-epoch, {last_preset}, iterative", "first_epoch_ascent", H_last, forget, {}),
        ("first-epoch, all params, iterative", "first_epoch_ascent", H_all, forget, {}),
        ("first-epoch, embeddings, fixed scale = lr", "first_epoch_ascent", H_emb, forget, dict(epochs=[0], calibrate=False, scale=lr)),
        ("first-epoch, embeddings, fixed scale = 30 lr", "first_epoch_ascent", H_emb, forget, dict(epochs=[0], calibrate=False, scale=30 * lr)),
        ("first-epoch, embeddings, fuzzy (one shift, whole forget set)", "first_epoch_ascent", H_emb, forget, dict(epochs=[0], mode="fuzzy")),
        ("whole-model gradient ascent (fresh gradients), iterative", "gradient_ascent", None, forget, {}),
        # the trade-off: how far each direction gets when the retain budget is looser than the 5% goal
        *[(f"first-epoch, embeddings, iterative, retain tol {t:.0%}", "first_epoch_ascent", H_emb, forget,
           dict(epochs=[0], retain_tolerance=t)) for t in (0.2, 1.0)],
        *[(f"multi-epoch, embeddings, iterative, retain tol {t:.0%}", "first_epoch_ascent", H_emb, forget,
           dict(retain_tolerance=t)) for t in (0.2, 1.0)],
        *[(f"whole-model gradient ascent, iterative, retain tol {t:.0%}", "gradient_ascent", None, forget,
           dict(retain_tolerance=t)) for t in (0.2, 1.0)],
        (f"fuzzy request {fuzzy_name!r} (one shift)", "first_epoch_ascent", H_emb, fuzzy_name, dict(epochs=[0])),
        (f"iterative on {fuzzy_name!r}'s samples", "first_epoch_ascent", H_emb, fuzzy_samples, dict(epochs=[0], mode="iterative")),
    ]
    results = {"config": cfg, "forget": forget, "fuzzy_request": fuzzy_name, "fuzzy_planted": fuzzy_samples}
    print("evaluating original and retrained models ...")
    results["original"] = evaluate(model, ctx)
    results["retrain"] = {**evaluate(retrained, ctx), "seconds": retrain_stats["seconds"]}
    results["methods"] = []
    # Held-out losses of the original model: computed once per model and shared by every request.
    start = time.perf_counter()
    heldout_losses = metrics.losses(model, heldout)
    results["heldout_loss_seconds"] = time.perf_counter() - start
    for label, method, history, what, options in tqdm(runs, desc="unlearning"):
        out = uf.unlearn(model, history, what, train, None, method=method, heldout=heldout_losses, **options)
        stats = {k: v for k, v in out.stats.items() if k not in ("trace", "params")}
        row = {"label": label, "method": method, "seconds": out.seconds, "stats": stats, **evaluate(out.model, ctx)}
        row["speedup_vs_retrain"] = retrain_stats["seconds"] / out.seconds
        results["methods"].append(row)

    storage = {k: {**h.bytes_per_sample(), "numel": h.numel} for k, h in histories.items()}
    storage["embeddings_over_all_fp32"] = storage["embeddings"]["fp32"] / storage["all"]["fp32"]
    storage["int8_compression"] = storage["embeddings"]["fp32"] / storage["embeddings"]["stored"]
    storage["gpt2_small"] = gpt2_small_storage()
    results["storage"] = storage
    results["recording"] = {"plain_train_seconds": plain_train_seconds, "record_seconds": record_seconds,
                            "epochs_recorded": {k: h.n_epochs for k, h in histories.items()}}
    write(results)


def goals(row, retrain, original):
    exp_ok = abs(row["exposure"] - retrain["exposure"]) <= 0.1 * retrain["exposure"]
    ppl_rise = row["retain_ppl"] / original["retain_ppl"] - 1
    mia_gap = abs(row["mia_auc"]["loss"] - retrain["mia_auc"]["loss"])
    return {"exposure_within_10pct": exp_ok, "retain_ppl_rise": ppl_rise, "retain_ppl_ok": ppl_rise <= 0.05,
            "mia_gap": mia_gap, "mia_ok": mia_gap <= 0.03, "speed_ok": row.get("speedup_vs_retrain", 0) >= 20}


def write(results):
    os.makedirs(RESULTS, exist_ok=True)
    original, retrain = results["original"], results["retrain"]
    for row in results["methods"]:
        row["goals"] = goals(row, retrain, original)
    with open(os.path.join(RESULTS, "lm_unlearning.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    cfg, st, rec = results["config"], results["storage"], results["recording"]
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    lines = [
        "# Language-model unlearning benchmark", "",
        f"Command: `{' '.join(['python'] + sys.argv)}`  ",
        f"Tiny GPT-2 ({cfg['n_layer']} layers, width {cfg['n_embd']}, byte tokenizer), {len(results['forget'])} forget samples "
        f"({len(results['forget']) - len(results['fuzzy_planted']) + 1} people with canaries of 4 digits, 10^4 candidates), "
        f"{cfg['epochs']} epochs, Adam lr {cfg['lr']}, seed {cfg['seed']}{', --quick' if cfg['quick'] else ''}. CPU, 1 thread.",
        "Calibrated runs: target = mean held-out loss, bound = target + 2 sd/sqrt(n), retain perplexity may rise 5%. "
        f"Held-out losses computed once per model ({results['heldout_loss_seconds']:.2f} s, not in the per-request times).", "",
        "| model / method | s | speed-up | status | forget loss | retain ppl (rise) | exposure (bits) | MIA AUC loss / zlib / min-k | self-influence | goals: exp / ppl / MIA / 20x |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def line(label, r, seconds, speed, status, g=None):
        m = r["mia_auc"]
        rise = r["retain_ppl"] / original["retain_ppl"] - 1
        goal = "" if g is None else " / ".join(yes(g[k]) for k in ("exposure_within_10pct", "retain_ppl_ok", "mia_ok", "speed_ok"))
        return (f"| {label} | {seconds:.2f} | {speed} | {status} | {r['forget_loss']:.3f} | {r['retain_ppl']:.3f} ({rise:+.1%}) | "
                f"{r['exposure']:.2f} | {m['loss']:.3f} / {m['zlib']:.3f} / {m['min_k']:.3f} | {r['self_influence']:.3g} | {goal} |")

    lines.append(line("original", original, 0, "", ""))
    lines.append(line("**retrain** (gold standard)", retrain, retrain["seconds"], "1x", ""))
    for row in results["methods"]:
        lines.append(line(row["label"], row, row["seconds"], f"{row['speedup_vs_retrain']:.0f}x", row["stats"].get("status", ""), row["goals"]))
    fuzzy = [r for r in results["methods"] if r["label"].startswith("fuzzy request")][0]
    lines += [
        "", f"Fuzzy request {results['fuzzy_request']!r}: matches "
        f"{[(m['index'], m['score']) for m in fuzzy['stats'].get('matches', [])]}, planted {results['fuzzy_planted']}. "
        f"Exposure of that person's canary: original {original['exposure_fuzzy_person']:.2f}, retrain {retrain['exposure_fuzzy_person']:.2f}, "
        + ", ".join(f"{r['label']} {r['exposure_fuzzy_person']:.2f}" for r in results["methods"] if results["fuzzy_request"] in r["label"]) + ".",
        "", "## Storage per sample and epoch", "",
        "| preset | parameters | fp32 bytes | int8 bytes (codes + scales) |", "|---|---|---|---|",
    ]
    for k in [k for k in st if isinstance(st[k], dict) and "fp32" in st[k]]:
        lines.append(f"| {k} | {st[k]['numel']} | {st[k]['fp32']} | {st[k]['stored']} |")
    g2 = st["gpt2_small"]
    lines += [
        "", f"Embeddings / all parameters before compression: {st['embeddings_over_all_fp32']:.3f} here "
        f"(goal <= 1/3: {yes(st['embeddings_over_all_fp32'] <= 1 / 3)}); GPT-2 small (124M): {g2['ratio']:.3f} "
        f"({g2['embedding_params']} of {g2['all_params']}). int8 vs fp32: {st['int8_compression']:.2f}x smaller "
        f"(goal >= 4x: {yes(st['int8_compression'] >= 4)}; the per-block float32 scale costs 4 bytes per 256 values).",
        "", "## Recording overhead", "",
        f"Plain training {rec['plain_train_seconds']:.1f} s; per-sample gradient recording "
        + ", ".join(f"{k} {v:.1f} s ({rec['epochs_recorded'][k]} epoch(s))" for k, v in rec["record_seconds"].items()) + ".",
    ]
    with open(os.path.join(RESULTS, "lm_unlearning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results)
    print("\n".join(lines))


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    labels = [r["label"][:64] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(18, 8), sharey=True)
    y = range(len(rows))
    panels = [("exposure (bits)", [r["exposure"] for r in rows], "exposure"),
              ("MIA AUC (loss attack)", [r["mia_auc"]["loss"] for r in rows], None),
              ("retain perplexity rise (%)", [100 * (r["retain_ppl"] / results["original"]["retain_ppl"] - 1) for r in rows], None)]
    for ax, (title, values, key) in zip(axes, panels):
        ax.barh(list(y), values, color="tab:blue")
        if title.startswith("exposure"):
            ax.axvline(results["retrain"]["exposure"], color="tab:green", ls="--", label="retrain")
            ax.axvline(results["original"]["exposure"], color="tab:red", ls=":", label="original")
        elif title.startswith("MIA"):
            ax.axvline(results["retrain"]["mia_auc"]["loss"], color="tab:green", ls="--", label="retrain")
            ax.axvline(results["original"]["mia_auc"]["loss"], color="tab:red", ls=":", label="original")
        else:
            ax.axvline(5, color="black", ls="--", label="5% budget")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_yticks(list(y))
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[2].set_xscale("symlog")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "lm_unlearning.png"), dpi=110)


if __name__ == "__main__":
    main()
