"""Language-model unlearning benchmark: first-epoch stored-gradient ascent vs its variants and baselines,
each against retraining without the forget samples (the gold standard).

Tiny GPT-2 (transformers, trained from scratch on the package's canary corpus, CPU). Writes
benchmarks/results/lm_unlearning.{md,json,png}. `--quick` runs a smaller model and corpus in a few minutes.

    .venv/bin/python benchmarks/lm_unlearning.py [--quick] [--scenario ...] [--pool-seeds 1,2,3]

The exposure goal is judged on canaries pooled over several seeds (realistic scenario; see pooled_study):
18 canaries of one seed scatter by ~0.34 bits, three times the goal's 10% window.
"""
import argparse
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import unlearn_fast as uf  # noqa: E402
from unlearn_fast.history import HistoryPolicy  # noqa: E402
from unlearn_fast.lm import (RECOMMENDED, FirstEpochHistory, FirstEpochRecorder, TextDataset, build_gpt2,  # noqa: E402
                             make_corpus, train_lm)
from unlearn_fast.lm import metrics  # noqa: E402
from unlearn_fast.lm.ascent import calibration_statistic  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# trained and retrained models of the pooled seeds (git-ignored), see trained_pair
MODEL_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache", "lm_pooled")
BLOCKSIZE = 4096  # int8 store: one float32 scale per 4096 values (3.996x vs fp32; 256 gives 3.94x)
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
    if ctx.get("light"):  # the pooled-seed runs: no influence scores
        return light_metrics(model, ctx, exposures)
    influence = metrics.gradient_influence(model, forget_set, range(len(forget_set)), forget_set)
    return {
        "forget_loss": float(metrics.losses(model, forget_set).mean()),
        "retain_ppl": metrics.perplexity(model, retain_set),
        "heldout_ppl": metrics.perplexity(model, heldout),
        "exposure": sum(exposures) / len(exposures),
        "exposures": exposures,  # per canary, in ctx["forget_canaries"] order (the fuzzy person's last)
        "exposure_fuzzy_person": exposures[-1],
        "mia_auc": metrics.mia_auc(model, forget_set, heldout),
        "self_influence": float(influence.mean()),
        "activation_similarity": float(metrics.activation_similarity(model, forget_set, range(len(forget_set)), forget_set).mean()),
    }


def light_metrics(model, ctx, exposures):
    return {"forget_loss": float(metrics.losses(model, ctx["forget_set"]).mean()),
            "retain_ppl": metrics.perplexity(model, ctx["retain_set"]), "exposure": sum(exposures) / len(exposures),
            "exposures": exposures, "exposure_fuzzy_person": exposures[-1],
            "mia_auc": metrics.mia_auc(model, ctx["forget_set"], ctx["heldout"])}


# Two training regimes of the same model and corpus generator:
#   memorising: 208 samples for 60 epochs; every training sample ends memorised (train loss 0.25, every
#               sample's MIA AUC ~1), the regime the first results were taken in;
#   realistic:  1012 samples for 20 epochs (more steps in all, fewer passes over each sample); the template
#               generalises (held-out loss ~ training loss) and only what is specific to a person is memorised,
#               closer to a language model that sees its data a few times.
SCENARIOS = {
    "memorising": dict(n_train=200, epochs=60),
    "realistic": dict(n_train=1000, epochs=20),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and corpus (a few minutes)")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-seeds", default=None,
                        help="extra seeds (comma-separated; 'none' for none) whose realistic-scenario canaries are pooled "
                             "with --seed's for the exposure goal (default 1,2,3; with --quick: none)")
    args = parser.parse_args()
    if args.pool_seeds is None:
        args.pool_seeds = "none" if args.quick else "1,2,3"
    pool_seeds = [] if args.pool_seeds == "none" else [int(x) for x in args.pool_seeds.split(",")]
    torch.set_num_threads(1)  # the CPU is shared; more threads stall more than they help at this size
    names = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    scenarios = {}
    for name in names:
        cfg = dict(n_layer=2, n_embd=64, n_heldout=100, n_forget=20, **SCENARIOS[name])
        if args.quick:
            cfg.update(n_train=cfg["n_train"] // 2, epochs=cfg["epochs"] // 2, n_heldout=60, n_forget=12)
        cfg.update(n_head=4, batch_size=16, lr=3e-3, seed=args.seed, quick=args.quick, scenario=name)
        print(f"== scenario {name}: {cfg}")
        scenarios[name] = run_scenario(cfg, args, full=name == names[0])
        if name == "realistic" and pool_seeds:
            scenarios[name]["pooled"] = pooled_study(cfg, scenarios[name], pool_seeds)
    write(scenarios)


def run_scenario(cfg, args, full):
    """Train, record, retrain, unlearn with every method; full=False skips the rows that only study the store
    (blocksizes, looser retain budgets)."""
    last_preset = f"last_blocks:{min(2, cfg['n_layer'] - 1)}"

    corpus = make_corpus(args.seed, cfg["n_train"], cfg["n_heldout"], n_variant_people=4)
    train = TextDataset(corpus.train_texts)
    heldout = TextDataset(corpus.heldout_texts)
    fuzzy_name, fuzzy_samples, forget, people = forget_split(corpus, cfg)  # the fuzzy person's canary last
    retain_idx = [i for i in range(len(train)) if i not in set(forget)]
    ctx = dict(forget_set=train.subset(forget), retain_set=train.subset(retain_idx), heldout=heldout,
               forget_canaries=[corpus.train_canaries[i] for i in people],
               heldout_canaries=corpus.heldout_canaries[: len(people)])

    # int8 rows with one float32 scale per BLOCKSIZE values (see the blocksize table in the results)
    policy = lambda kind, params, codec="int8", blocksize=BLOCKSIZE: HistoryPolicy(  # noqa: E731
        kind=kind, codec=codec, params=params, per_sample=True, blocksize=blocksize)
    model = build_gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], seed=args.seed)
    recorders = {
        "embeddings": FirstEpochRecorder(model, None, policy("all_epochs", "embeddings")),
        last_preset: FirstEpochRecorder(model, None, policy("first_epoch", last_preset)),
        "all": FirstEpochRecorder(model, None, policy("first_epoch", "all")),
    }
    if full:  # for the blocksize study only: the same first-epoch rows at fp32 and at the codecs' usual 256
        recorders["embeddings fp32"] = FirstEpochRecorder(model, None, policy("first_epoch", "embeddings", "fp32"))
        recorders["embeddings int8/256"] = FirstEpochRecorder(model, None, policy("first_epoch", "embeddings", blocksize=256))
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
    H_fp32, H_256 = histories.get("embeddings fp32"), histories.get("embeddings int8/256")
    fisher = dict(retain_guard="fisher", retain_batch=64)
    MINK = dict(statistic="min_k", min_k=0.2)
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
        # retain-preserving and per-sample variants (stored gradients only)
        ("first-epoch, embeddings, iterative, per-sample calibration", "first_epoch_ascent", H_emb, forget,
         dict(epochs=[0], calibration="per_sample")),
        ("first-epoch, embeddings, iterative, retain guard: difference", "first_epoch_ascent", H_emb, forget,
         dict(epochs=[0], retain_guard="difference")),
        ("first-epoch, embeddings, iterative, retain guard: project (rank 8)", "first_epoch_ascent", H_emb, forget,
         dict(epochs=[0], retain_guard="project", retain_rank=8)),
        ("first-epoch, embeddings, iterative, retain guard: project (rank 64)", "first_epoch_ascent", H_emb, forget,
         dict(epochs=[0], retain_guard="project", retain_rank=64)),
        ("first-epoch, embeddings, iterative, retain guard: fisher", "first_epoch_ascent", H_emb, forget,
         dict(epochs=[0], retain_guard="fisher")),
        ("first-epoch, all params, iterative, retain guard: project (rank 64)", "first_epoch_ascent", H_all, forget,
         dict(retain_guard="project", retain_rank=64)),
        ("first-epoch, embeddings, iterative, fp32 store", "first_epoch_ascent", H_fp32, forget, {}),
        ("first-epoch, embeddings, iterative, int8 blocksize 256 store", "first_epoch_ascent", H_256, forget, {}),
        # (rows with "retain tol" or "store" in the label run in the first scenario only)
        # the same budget of 5 steps: stored vs fresh gradients
        ("first-epoch, embeddings, iterative, 5 steps", "first_epoch_ascent", H_emb, forget, dict(epochs=[0], max_steps=5)),
        ("whole-model gradient ascent, iterative, 5 steps", "gradient_ascent", None, forget, dict(max_steps=5)),
        # fresh-gradient variants
        ("gradient ascent, per-sample calibration", "gradient_ascent", None, forget, dict(calibration="per_sample")),
        ("gradient ascent, retain guard: difference", "gradient_ascent", None, forget, dict(retain_guard="difference")),
        ("gradient ascent, retain guard: project", "gradient_ascent", None, forget, dict(retain_guard="project")),
        ("gradient ascent, retain guard: fisher", "gradient_ascent", None, forget, fisher),
        ("gradient ascent, retain guard: fisher, per-sample", "gradient_ascent", None, forget,
         dict(fisher, calibration="per_sample")),
        *[(f"gradient ascent, retain guard: fisher, retain tol {t:.0%}", "gradient_ascent", None, forget,
           dict(fisher, retain_tolerance=t)) for t in (0.2, 1.0)],
        ("gradient ascent, tokens below a retain-only 5-gram", "gradient_ascent", None, forget, dict(tokens="reference")),
        ("descent to a retain-only 5-gram's distributions (reference_kl)", "gradient_ascent", None, forget,
         dict(objective="reference_kl")),
        (f"fuzzy request {fuzzy_name!r} (one shift)", "first_epoch_ascent", H_emb, fuzzy_name, dict(epochs=[0])),
        (f"iterative on {fuzzy_name!r}'s samples", "first_epoch_ascent", H_emb, fuzzy_samples, dict(epochs=[0], mode="iterative")),
        # token-level calibration: Min-K% loss (20% lowest token log-probs) against the held-out samples' Min-K%
        ("first-epoch, embeddings, iterative, Min-K% calibration", "first_epoch_ascent", H_emb, forget,
         dict(epochs=[0], **MINK)),
        ("first-epoch, embeddings, iterative, retain guard: fisher, Min-K% calibration", "first_epoch_ascent", H_emb,
         forget, dict(epochs=[0], retain_guard="fisher", **MINK)),
        ("gradient ascent, Min-K% calibration", "gradient_ascent", None, forget, dict(MINK)),
        ("gradient ascent, retain guard: fisher, Min-K% calibration", "gradient_ascent", None, forget, dict(fisher, **MINK)),
        ("gradient ascent, retain guard: fisher, per-sample Min-K% calibration", "gradient_ascent", None, forget,
         dict(fisher, calibration="per_sample", **MINK)),
        ("gradient ascent on Min-K% tokens, retain guard: fisher, Min-K% calibration", "gradient_ascent", None, forget,
         dict(fisher, tokens="min_k", **MINK)),
        ("gradient ascent on Min-K% tokens, retain guard: fisher, per-sample Min-K% calibration", "gradient_ascent", None,
         forget, dict(fisher, tokens="min_k", calibration="per_sample", **MINK)),
        (f"fuzzy request {fuzzy_name!r} (one shift), Min-K% calibration", "first_epoch_ascent", H_emb, fuzzy_name,
         dict(epochs=[0], **MINK)),
        (f"fuzzy request {fuzzy_name!r}, gradient ascent, fisher, Min-K% calibration", "gradient_ascent", None, fuzzy_name,
         dict(fisher, mode="fuzzy", **MINK)),
        (f"fuzzy request {fuzzy_name!r}, gradient ascent, fisher, per-sample Min-K% (10%) calibration", "gradient_ascent",
         None, fuzzy_name, dict(fisher, mode="fuzzy", calibration="per_sample", statistic="min_k", min_k=0.1)),
        (f"iterative on {fuzzy_name!r}'s samples, gradient ascent on Min-K% tokens, fisher, Min-K% calibration",
         "gradient_ascent", None, fuzzy_samples, dict(fisher, tokens="min_k", **MINK)),
    ]
    runs += [r for r in pooled_runs(H_emb, forget, fuzzy_name) if r[0] not in {x[0] for x in runs}]
    if not full:
        runs = [r for r in runs if "retain tol" not in r[0] and "store" not in r[0]]
    results = {"config": cfg, "forget": forget, "fuzzy_request": fuzzy_name, "fuzzy_planted": fuzzy_samples,
               "n_train_samples": len(train)}
    print("evaluating original and retrained models ...")
    results["original"] = evaluate(model, ctx)
    results["retrain"] = {**evaluate(retrained, ctx), "seconds": retrain_stats["seconds"]}
    # canaries never trained on: the exposure of secrets a model cannot know (its spread is the metric's noise)
    for key, m in (("original", model), ("retrain", retrained)):
        values = [metrics.exposure(m, c.prefix, c.secret) for c in ctx["heldout_canaries"]]
        results[key]["heldout_exposure"] = sum(values) / len(values)
    results["methods"] = []
    # Held-out losses of the original model: computed once per model and shared by every request.
    start = time.perf_counter()
    heldout_losses = metrics.losses(model, heldout)
    results["heldout_loss_seconds"] = time.perf_counter() - start
    heldout_min_k = calibration_statistic(model, heldout, "min_k", 0.2)  # the same, for statistic="min_k" rows
    for label, method, history, what, options in tqdm(runs, desc="unlearning"):
        held = heldout_losses
        if options.get("statistic") == "min_k":
            held = heldout_min_k if options.get("min_k", 0.2) == 0.2 else calibration_statistic(model, heldout, "min_k", options["min_k"])
        out = uf.unlearn(model, history, what, train, None, method=method, heldout=held, **options)
        stats = {k: v for k, v in out.stats.items() if k not in ("trace", "params")}
        row = {"label": label, "method": method, "seconds": out.seconds, "stats": stats, **evaluate(out.model, ctx)}
        row["speedup_vs_retrain"] = retrain_stats["seconds"] / out.seconds
        results["methods"].append(row)

    results["gradient_alignment"] = gradient_alignment(model, train, forget, retain_idx, histories)
    if H_fp32 is not None:
        results["blocksizes"] = blocksize_study(H_fp32)
    storage = {k: {**h.bytes_per_sample(), "numel": h.numel} for k, h in histories.items() if k in ("embeddings", last_preset, "all")}
    storage["embeddings_over_all_fp32"] = storage["embeddings"]["fp32"] / storage["all"]["fp32"]
    storage["int8_compression"] = storage["embeddings"]["fp32"] / storage["embeddings"]["stored"]
    storage["gpt2_small"] = gpt2_small_storage()
    results["storage"] = storage
    results["recording"] = {"plain_train_seconds": plain_train_seconds, "record_seconds": record_seconds,
                            "epochs_recorded": {k: h.n_epochs for k, h in histories.items()}}
    return results


# ----------------------------------------------------------------------------- pooled exposure study
FISHER = dict(retain_guard="fisher", retain_batch=64)
MINK = dict(statistic="min_k", min_k=0.2)
# Rows re-run on every pooled seed (label template, method, forget: "set" = the 20 forget samples or "person" =
# the fuzzy request for the first variant person, options). The same labels are rows of the main table.
POOLED_ROWS = [
    ("first-epoch, embeddings, iterative, retain guard: fisher, Min-K% calibration", "first_epoch_ascent", "set",
     dict(epochs=[0], retain_guard="fisher", **MINK)),
    ("gradient ascent, Min-K% calibration", "gradient_ascent", "set", dict(MINK)),
    ("gradient ascent, retain guard: fisher, Min-K% calibration", "gradient_ascent", "set", dict(FISHER, **MINK)),
    ("gradient ascent, retain guard: fisher, per-sample", "gradient_ascent", "set", dict(FISHER, calibration="per_sample")),
    ("gradient ascent, retain guard: fisher, per-sample Min-K% calibration", "gradient_ascent", "set",
     dict(FISHER, calibration="per_sample", **MINK)),
    ("gradient ascent on Min-K% tokens, retain guard: fisher, Min-K% calibration", "gradient_ascent", "set",
     dict(FISHER, tokens="min_k", **MINK)),
    ("gradient ascent, retain guard: fisher, floor Min-K% calibration (RECOMMENDED)", "gradient_ascent", "set",
     dict(RECOMMENDED)),
    ("gradient ascent, retain guard: fisher, floor Min-K% (5%) calibration", "gradient_ascent", "set",
     dict(FISHER, calibration="floor", statistic="min_k", min_k=0.05)),
    ("fuzzy request {name!r}, gradient ascent, fisher, floor Min-K% (10%) calibration", "gradient_ascent", "person",
     dict(FISHER, mode="fuzzy", calibration="floor", statistic="min_k", min_k=0.1)),
    ("fuzzy request {name!r} (one shift), floor Min-K% (10%) calibration", "first_epoch_ascent", "person",
     dict(epochs=[0], calibration="floor", statistic="min_k", min_k=0.1)),
]


def pooled_runs(history, forget, fuzzy_name):
    """(label, method, history, forget, options) of POOLED_ROWS for one seed."""
    return [(label.format(name=fuzzy_name), method, history if method == "first_epoch_ascent" else None,
             forget if what == "set" else fuzzy_name, dict(options)) for label, method, what, options in POOLED_ROWS]


def forget_split(corpus, cfg):
    """The forget set of a scenario: the first n_forget - 3 plain biographies + the 3 samples of the first variant
    person (a fuzzy request's target); people (canary owners) with the fuzzy person last."""
    fuzzy_name, fuzzy_samples = next(iter(corpus.variants.items()))
    variant_samples = {i for v in corpus.variants.values() for i in v}
    plain = [i for i in range(cfg["n_train"]) if i not in variant_samples][: cfg["n_forget"] - len(fuzzy_samples)]
    return fuzzy_name, fuzzy_samples, sorted(plain + fuzzy_samples), plain + [fuzzy_samples[0]]


TIMING_RUNS = 3  # each pooled row is run this many times per seed; its median time is the one reported


def trained_pair(cfg, seed, train, forget, cache_dir=None):
    """(original model, its first-epoch embedding history, model retrained without `forget`, retraining seconds)
    of one seed. With cache_dir, kept there (seed_N_<config digest>.pt and .history) and reused, so that the
    unlearning rows can be re-run without training again (training dominates a seed's time)."""
    shape = {k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "n_train", "n_heldout", "n_forget", "epochs",
                                 "batch_size", "lr")}
    digest = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"seed_{seed}_{digest}") if cache_dir else None  # another config: another file
    model = build_gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], seed=seed)
    retrained = build_gpt2(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], seed=seed)
    if path and os.path.exists(path + ".pt"):
        saved = torch.load(path + ".pt", weights_only=True)
        model.load_state_dict(saved["original"])
        retrained.load_state_dict(saved["retrained"])
        return model, FirstEpochHistory.load(path + ".history", model), retrained, saved["retrain_seconds"]
    recorder = FirstEpochRecorder(model, None, HistoryPolicy(kind="first_epoch", codec="int8", params="embeddings",
                                                             per_sample=True, blocksize=BLOCKSIZE))
    print(f"pooled seed {seed}: training and retraining ...")
    train_lm(model, train, cfg["epochs"], cfg["batch_size"], cfg["lr"], seed, recorders=[recorder])
    history = recorder.finish()
    retrain_seconds = train_lm(retrained, train, cfg["epochs"], cfg["batch_size"], cfg["lr"], seed, exclude=forget)["seconds"]
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        history.save(path + ".history")
        torch.save({"original": model.state_dict(), "retrained": retrained.state_dict(),
                    "retrain_seconds": retrain_seconds}, path + ".pt.tmp")
        os.replace(path + ".pt.tmp", path + ".pt")  # written last: a seed counts once both files are complete
    return model, history, retrained, retrain_seconds


def pool_seed(cfg, seed, cache_dir=None):
    """One extra seed of a scenario: new corpus, initial weights and batch order; train (recording first-epoch
    embedding rows), retrain without the forget set (both cached in cache_dir, see trained_pair), run POOLED_ROWS;
    per-canary exposures of everything."""
    corpus = make_corpus(seed, cfg["n_train"], cfg["n_heldout"], n_variant_people=4)
    train, heldout = TextDataset(corpus.train_texts), TextDataset(corpus.heldout_texts)
    fuzzy_name, fuzzy_samples, forget, people = forget_split(corpus, cfg)
    retain_idx = [i for i in range(len(train)) if i not in set(forget)]
    ctx = dict(forget_set=train.subset(forget), retain_set=train.subset(retain_idx), heldout=heldout, light=True,
               forget_canaries=[corpus.train_canaries[i] for i in people])
    model, history, retrained, retrain_seconds = trained_pair(cfg, seed, train, forget, cache_dir)
    out = {"seed": seed, "fuzzy_request": fuzzy_name, "original": evaluate(model, ctx),
           "retrain": {**evaluate(retrained, ctx), "seconds": retrain_seconds}, "methods": []}
    held = {}  # the held-out samples' calibration statistic, once per (statistic, min_k)
    for label, method, hist, what, options in pooled_runs(history, forget, fuzzy_name):
        key = (options.get("statistic", "loss"), options.get("min_k", 0.2))
        held[key] = held[key] if key in held else calibration_statistic(model, heldout, *key)
        runs = [uf.unlearn(model, hist, what, train, None, method=method, heldout=held[key], **options)
                for _ in range(TIMING_RUNS)]  # deterministic: the same model each time; the median time counts
        res = runs[-1]
        seconds = float(np.median([r.seconds for r in runs]))
        row = {"label": label, "seconds": seconds, "status": res.stats.get("status"), **evaluate(res.model, ctx)}
        row["speedup_vs_retrain"] = retrain_seconds / seconds
        out["methods"].append(row)
    return out


def bootstrap_means(pairs, draws=10000, seed=0):
    """Bootstrap over canaries (pairs resampled together): (mean unlearned - mean retrained, and that over the
    mean retrained) for each draw."""
    pairs = np.asarray(pairs, dtype=np.float64)
    pick = np.random.default_rng(seed).integers(0, len(pairs), size=(draws, len(pairs)))
    a, b = pairs[pick, 0].mean(1), pairs[pick, 1].mean(1)
    return a - b, (a - b) / b


def pooled_study(cfg, main, seeds):
    """Pool the per-canary exposures of the main seed's POOLED_ROWS with those of `seeds`.

    Decision rule (the goal, not moved): met when the pooled mean exposure of the forgotten canaries is within 10%
    of the pooled mean under the retrained models. The bootstrap 95% interval of the relative difference says how
    sure that is: 'met (interval inside +-10%)', 'missed (interval outside)', else 'undecided'."""
    per_seed = [{"seed": cfg["seed"], "fuzzy_request": main["fuzzy_request"], "original": main["original"],
                 "retrain": main["retrain"],
                 "methods": [r for r in main["methods"] if r["label"] in
                             {x[0] for x in pooled_runs(None, None, main["fuzzy_request"])}]}]
    for seed in seeds:
        per_seed.append(pool_seed(cfg, seed, MODEL_CACHE))
    return pool(per_seed)


def pool(per_seed):
    """The pooled rows (see pooled_study) of a list of per-seed results (pool_seed's form)."""
    rows = []
    for k, (template, method, what, _) in enumerate(POOLED_ROWS):
        pairs, person, mia, mia_retrain, rises, speed, statuses = [], [], [], [], [], [], []
        for run in per_seed:
            label = template.format(name=run["fuzzy_request"])
            row = next(r for r in run["methods"] if r["label"] == label)
            pairs += list(zip(row["exposures"], run["retrain"]["exposures"]))
            person.append((run["original"]["exposure_fuzzy_person"], run["retrain"]["exposure_fuzzy_person"],
                           row["exposure_fuzzy_person"]))
            mia.append(row["mia_auc"]["loss"])
            mia_retrain.append(run["retrain"]["mia_auc"]["loss"])
            rises.append(row["retain_ppl"] / run["original"]["retain_ppl"] - 1)
            speed.append(row["speedup_vs_retrain"])
            statuses.append(row.get("status") or row.get("stats", {}).get("status"))
        diff, rel = bootstrap_means(pairs)
        un, re_ = float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))
        lo, hi = np.percentile(rel, [2.5, 97.5])
        verdict = "met" if -0.1 <= lo and hi <= 0.1 else "missed" if hi < -0.1 or lo > 0.1 else "undecided"
        rows.append({
            "label": template.format(name="<first variant person>"), "target": what, "canaries": len(pairs),
            "exposure": un, "retrain_exposure": re_, "paired_diff": un - re_,
            "paired_diff_ci": [float(x) for x in np.percentile(diff, [2.5, 97.5])],
            "relative_diff": (un - re_) / re_, "relative_diff_ci": [float(lo), float(hi)],
            "goal_met": abs(un - re_) <= 0.1 * re_, "interval_verdict": verdict,
            "person_exposure": person, "mia_auc": mia, "mia_auc_retrain": mia_retrain,
            "mia_gap_mean": float(np.mean(np.abs(np.subtract(mia, mia_retrain)))),
            "mia_pooled_gap": float(abs(np.mean(mia) - np.mean(mia_retrain))),
            "retain_rise": rises, "speedup": speed, "statuses": statuses,
        })
    original = [e for run in per_seed for e in run["original"]["exposures"]]
    retrain = [e for run in per_seed for e in run["retrain"]["exposures"]]
    return {"seeds": [run["seed"] for run in per_seed], "rows": rows, "original_exposure": float(np.mean(original)),
            "retrain_exposure": float(np.mean(retrain)), "per_seed": per_seed}


def gradient_alignment(model, train, forget, retain_idx, histories):
    """Cosine of the stored first-epoch directions with fresh gradients at the trained model, per preset:
    how much of today's loss gradient the stored rows still point along."""
    from unlearn_fast.lm import per_sample_gradients

    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    out = {}
    f = torch.tensor(forget)
    r = torch.tensor(retain_idx[:64])
    for key in ("embeddings", "all"):
        h = histories[key]
        fresh = per_sample_gradients(model, h.param_names, train.input_ids[f], train.labels[f])
        fresh_r = per_sample_gradients(model, h.param_names, train.input_ids[r], train.labels[r]).mean(0)
        stored = torch.stack([h.row(0, int(i)) for i in f])
        stored_r = torch.stack([h.row(0, int(i)) for i in r]).mean(0)
        out[key] = {
            "per_sample_stored_vs_fresh": float(torch.nn.functional.cosine_similarity(stored, fresh).mean()),
            "forget_mean_stored_vs_fresh": cos(stored.mean(0), fresh.mean(0)),
            "stored_forget_vs_stored_retain": cos(stored.mean(0), stored_r),
            "fresh_forget_vs_fresh_retain": cos(fresh.mean(0), fresh_r),
        }
    return out


def blocksize_study(history_fp32):
    """int8 storage and round-trip error of the first-epoch embedding rows for several blocksizes."""
    from unlearn_fast import ops

    rows = torch.stack([history_fp32.row(0, i) for i in history_fp32.epochs[0]["index"].tolist()])
    out = {}
    for blocksize in (256, 1024, 4096):
        codes, scales = ops.quantize_rows(rows, blocksize, 8)
        back = torch.stack([ops.dequantize_blockwise(c, sc, blocksize, 8, rows.shape[1]) for c, sc in zip(codes, scales)])
        stored = codes[0].numel() * codes.element_size() + scales[0].numel() * scales.element_size()
        out[blocksize] = {
            "bytes": stored, "ratio": 4 * rows.shape[1] / stored,
            "relative_l2_error": float(((back - rows).norm(dim=1) / rows.norm(dim=1)).mean()),
            "nonzero_to_zero": float(((back == 0) & (rows != 0)).float().mean()),
        }
    return out


def goals(row, retrain, original):
    exp_ok = abs(row["exposure"] - retrain["exposure"]) <= 0.1 * retrain["exposure"]
    ppl_rise = row["retain_ppl"] / original["retain_ppl"] - 1
    mia_gap = abs(row["mia_auc"]["loss"] - retrain["mia_auc"]["loss"])
    return {"exposure_within_10pct": exp_ok, "retain_ppl_rise": ppl_rise, "retain_ppl_ok": ppl_rise <= 0.05,
            "mia_gap": mia_gap, "mia_ok": mia_gap <= 0.03, "speed_ok": row.get("speedup_vs_retrain", 0) >= 20}


def write(scenarios):
    os.makedirs(RESULTS, exist_ok=True)
    lines = ["# Language-model unlearning benchmark", "", f"Command: `{' '.join(['python'] + sys.argv)}`  ",
             "Goals (issue 4), per row: exposure within 10% of retrain's / retain perplexity rise <= 5% / MIA AUC (loss) "
             "within 0.03 of retrain's / at least 20x faster than retraining.", ""]
    for results in scenarios.values():
        for row in results["methods"]:
            row["goals"] = goals(row, results["retrain"], results["original"])
    with open(os.path.join(RESULTS, "lm_unlearning.json"), "w") as f:
        json.dump(scenarios, f, indent=1, default=str)
    for name, results in scenarios.items():
        lines += [f"## Scenario: {name}", ""] + render(results) + [""]
    with open(os.path.join(RESULTS, "lm_unlearning.md"), "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    plot(scenarios)
    print("\n".join(lines))


def render(results):
    original, retrain = results["original"], results["retrain"]
    cfg, st, rec = results["config"], results["storage"], results["recording"]
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    lines = [
        f"Tiny GPT-2 ({cfg['n_layer']} layers, width {cfg['n_embd']}, byte tokenizer), {len(results['forget'])} forget samples "
        f"({len(results['forget']) - len(results['fuzzy_planted']) + 1} people with canaries of 4 digits, 10^4 candidates), "
        f"{results['n_train_samples']} training samples, {cfg['epochs']} epochs, Adam lr {cfg['lr']}, seed {cfg['seed']}"
        f"{', --quick' if cfg['quick'] else ''}. CPU, 1 thread.",
        "Calibrated runs: target = mean held-out loss, bound = target + 2 sd/sqrt(n), retain perplexity may rise 5%; "
        "rows with 'Min-K% calibration' take target, bound and per-sample gaps on the Min-K% loss (minus the mean of "
        "the 20% lowest token log-probs) of the forget vs the held-out samples instead of the mean loss. "
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
        "", f"Exposure of {len(results['forget']) - len(results['fuzzy_planted']) + 1} held-out canaries (never trained on): "
        f"original {original['heldout_exposure']:.2f}, retrain {retrain['heldout_exposure']:.2f} bits. A secret at a "
        "uniformly random rank has exposure 1.44 bits on average with a standard deviation of 1.44, so a mean over "
        f"{len(results['forget']) - len(results['fuzzy_planted']) + 1} canaries has a sampling spread of about "
        f"{1.4427 / (len(results['forget']) - len(results['fuzzy_planted']) + 1) ** 0.5:.2f} bits.",
    ]
    if "pooled" in results:
        lines += render_pooled(results["pooled"])
    lines += [
        "", "### Storage per sample and epoch", "",
        "| preset | parameters | fp32 bytes | int8 bytes (codes + scales) |", "|---|---|---|---|",
    ]
    for k in [k for k in st if isinstance(st[k], dict) and "fp32" in st[k]]:
        lines.append(f"| {k} | {st[k]['numel']} | {st[k]['fp32']} | {st[k]['stored']} |")
    g2 = st["gpt2_small"]
    lines += [
        "", f"Embeddings / all parameters before compression: {st['embeddings_over_all_fp32']:.3f} here "
        f"(goal <= 1/3: {yes(st['embeddings_over_all_fp32'] <= 1 / 3)}); GPT-2 small (124M): {g2['ratio']:.3f} "
        f"({g2['embedding_params']} of {g2['all_params']}). int8 vs fp32: {st['int8_compression']:.3f}x smaller "
        f"(goal 4x: the int8 codes are exactly 4x smaller; one float32 scale per block of {BLOCKSIZE} values costs the "
        f"other {100 * (1 - st['int8_compression'] / 4):.1f}%, and no blockwise store with scales reaches 4.00x).",
    ]
    if "blocksizes" in results:
        lines += [
            "", "### int8 blocksize (first-epoch embedding rows)", "",
            "| blocksize | bytes per sample | fp32 / int8 | relative L2 error | nonzero values stored as 0 |", "|---|---|---|---|---|",
            *[f"| {b} | {v['bytes']} | {v['ratio']:.3f}x | {v['relative_l2_error']:.4f} | {v['nonzero_to_zero']:.3f} |"
              for b, v in results["blocksizes"].items()],
            "", f"Unlearning from the fp32, int8/256 and int8/{BLOCKSIZE} stores: compare the rows 'fp32 store' and "
            f"'int8 blocksize 256 store' with 'first-epoch, embeddings, iterative' (int8/{BLOCKSIZE}).",
        ]
    lines += [
        "", "### Stored first-epoch gradients vs fresh gradients at the trained model", "",
        "| preset | cos(stored, fresh) per forget sample | cos of forget means | cos(stored forget, stored retain) | cos(fresh forget, fresh retain) |",
        "|---|---|---|---|---|",
        *[f"| {k} | {v['per_sample_stored_vs_fresh']:.3f} | {v['forget_mean_stored_vs_fresh']:.3f} | "
          f"{v['stored_forget_vs_stored_retain']:.3f} | {v['fresh_forget_vs_fresh_retain']:.3f} |"
          for k, v in results["gradient_alignment"].items()],
        "", "### Recording overhead", "",
        f"Plain training {rec['plain_train_seconds']:.1f} s; per-sample gradient recording "
        + ", ".join(f"{k} {v:.1f} s ({rec['epochs_recorded'][k]} epoch(s))" for k, v in rec["record_seconds"].items()) + ".",
    ]
    return lines


def render_pooled(pooled):
    n_seeds = len(pooled["seeds"])
    rows = pooled["rows"]
    lines = [
        "", f"### Exposure goal over {n_seeds} seeds (seeds {', '.join(map(str, pooled['seeds']))}; canaries pooled)", "",
        "Each seed draws a new corpus, initial weights and batch order; the original model is trained and the retrained "
        "model retrained from them as above, and the rows below re-run. Decision rule (the goal unchanged): the exposure "
        "goal is met when the pooled mean exposure of the forgotten canaries is within 10% of the pooled mean under the "
        "retrained models (same canaries). Paired difference: unlearned minus retrained exposure of the same canary; "
        "95% intervals from 10,000 bootstrap resamples of the canaries. Interval verdict: 'met' if the whole interval of "
        "the relative difference lies inside +-10%, 'missed' if outside, else 'undecided'. "
        f"Pooled exposure of the original models {pooled['original_exposure']:.2f} bits, of the retrained models "
        f"{pooled['retrain_exposure']:.2f} bits. MIA AUC (loss), retain rise and speed-up: mean over seeds "
        "(min-max); the MIA goal per seed is a gap <= 0.03.", "",
        "| row | canaries | exposure: unlearned / retrain | paired diff (95% CI) | relative (95% CI) | exposure goal | interval | MIA AUC, mean over seeds (retrain) | MIA goal on the means | mean per-seed MIA gap | seeds with MIA gap <= 0.03 | retain rise | seeds with rise <= 5% | speed-up | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in rows if r["target"] == "set"]:  # a single-person request: its own list below
        d, rel = r["paired_diff_ci"], r["relative_diff_ci"]
        gaps = [abs(a - b) for a, b in zip(r["mia_auc"], r["mia_auc_retrain"])]
        status_text = ", ".join(f"{st} x{r['statuses'].count(st)}" for st in sorted(set(r["statuses"])))
        lines.append(
            f"| {r['label']} | {r['canaries']} | {r['exposure']:.2f} / {r['retrain_exposure']:.2f} | "
            f"{r['paired_diff']:+.2f} ({d[0]:+.2f}, {d[1]:+.2f}) | {r['relative_diff']:+.0%} ({rel[0]:+.0%}, {rel[1]:+.0%}) | "
            f"{'met' if r['goal_met'] else 'missed'} | {r['interval_verdict']} | "
            f"{np.mean(r['mia_auc']):.3f} ({np.mean(r['mia_auc_retrain']):.3f}) | "
            f"{'met' if r['mia_pooled_gap'] <= 0.03 else 'missed'} ({r['mia_pooled_gap']:.3f}) | {r['mia_gap_mean']:.3f} | "
            f"{sum(g <= 0.03 for g in gaps)}/{len(gaps)} | {np.mean(r['retain_rise']):+.1%} ({min(r['retain_rise']):+.1%} to "
            f"{max(r['retain_rise']):+.1%}) | {sum(x <= 0.05 for x in r['retain_rise'])}/{len(gaps)} | {np.mean(r['speedup']):.0f}x ({min(r['speedup']):.0f}-{max(r['speedup']):.0f}) | "
            f"{status_text} |")
    lines += ["", "Fuzzy request for one person (the first variant person of each seed: a biography with the canary + 2 other "
              "samples naming them), exposure of that person's canary, original / retrain / unlearned, per seed:", ""]
    for r in rows:
        if r["target"] == "person":
            lines.append(f"- {r['label']}: " + "; ".join(
                f"seed {seed}: {o:.2f} / {t:.2f} / {u:.2f}" for seed, (o, t, u) in zip(pooled["seeds"], r["person_exposure"]))
                + f" (mean {np.mean([u for _, _, u in r['person_exposure']]):.2f}, retrain "
                f"{np.mean([t for _, t, _ in r['person_exposure']]):.2f}, original {np.mean([o for o, _, _ in r['person_exposure']]):.2f}); "
                f"retain rise {', '.join(f'{x:+.1%}' for x in r['retain_rise'])}; speed-up "
                f"{', '.join(f'{x:.0f}x' for x in r['speedup'])}; status {', '.join(r['statuses'])}")
    return lines


def plot(scenarios):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(scenarios), 3, figsize=(18, 10 * len(scenarios)), squeeze=False)
    for axes, (name, results) in zip(grid, scenarios.items()):
        plot_scenario(axes, name, results)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "lm_unlearning.png"), dpi=90)


def plot_scenario(axes, name, results):
    rows = results["methods"]
    labels = [r["label"][:64] for r in rows]
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
        ax.set_title(f"{name}: {title}")
        ax.legend(fontsize=8)
        ax.set_yticks(list(y))
        ax.invert_yaxis()
    axes[0].set_yticklabels(labels, fontsize=7)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    axes[2].set_xscale("symlog")


if __name__ == "__main__":
    main()
