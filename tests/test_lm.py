"""Language-model unlearning (unlearn_fast.lm): tiny GPT-2 (2 layers, width 64) trained for seconds."""
import copy
import math
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rapidfuzz")

import unlearn_fast as uf  # noqa: E402
from unlearn_fast.history import HistoryPolicy  # noqa: E402
from unlearn_fast.lm import (  # noqa: E402
    ByteTokenizer, FirstEpochHistory, FirstEpochRecorder, TextDataset, build_gpt2, make_corpus,
    per_sample_gradients, sample_losses, select_params, train_lm,
)
from unlearn_fast.lm import metrics  # noqa: E402
from unlearn_fast.lm.ascent import fuzzy_matches, run_first_epoch_ascent  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
FORGET = [0, 1, 2, 3]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(one_thread):
    corpus = make_corpus(seed=1, n_train=40, n_heldout=30, n_variant_people=2, secret_digits=3)
    train = TextDataset(corpus.train_texts)
    heldout = TextDataset(corpus.heldout_texts)
    model = build_gpt2(n_layer=2, n_embd=64, n_head=4, seed=0)
    policies = {
        "embeddings": HistoryPolicy(kind="first_epoch", codec="int8", params="embeddings", per_sample=True),
        "fp32": HistoryPolicy(kind="all_epochs", codec="fp32", params="embeddings", per_sample=True, activations=True),
    }
    recorders = {k: FirstEpochRecorder(model, None, p) for k, p in policies.items()}
    initial = copy.deepcopy(model)
    train_lm(model, train, epochs=15, batch_size=16, lr=5e-3, recorders=list(recorders.values()))
    histories = {k: r.finish() for k, r in recorders.items()}
    return dict(corpus=corpus, train=train, heldout=heldout, model=model, initial=initial, histories=histories)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- data and tokenizer
def test_tokenizer_and_corpus():
    tok = ByteTokenizer()
    text = "Zoë's ID number is 042."
    assert tok.decode(tok.encode(text)) == text
    a, b = make_corpus(seed=3, n_train=10, n_heldout=5), make_corpus(seed=3, n_train=10, n_heldout=5)
    assert a.train_texts == b.train_texts and a.heldout_texts == b.heldout_texts
    assert make_corpus(seed=4, n_train=10, n_heldout=5).train_texts != a.train_texts
    for canary in a.train_canaries:
        assert a.train_texts[canary.sample].startswith(canary.prefix + canary.secret)
    train_names = {p.name for p in a.train_people}
    assert not train_names & {p.name for p in a.heldout_people}


def test_sequences_longer_than_context_are_refused():
    model = build_gpt2(n_layer=2, n_embd=64, n_positions=32)
    with pytest.raises(ValueError, match="context"):
        TextDataset(["x" * 40], context=32)
    long = TextDataset(["x" * 40])
    with pytest.raises(ValueError, match="context"):
        train_lm(model, long, epochs=1)
    with pytest.raises(ValueError, match="context"):
        per_sample_gradients(model, ["transformer.wpe.weight"], long.input_ids, long.labels)


# ----------------------------------------------------------------------------- recording
def test_select_params_presets(setup):
    model = setup["model"]
    assert select_params(model, "embeddings") == ["transformer.wte.weight", "transformer.wpe.weight"]
    last = select_params(model, "last_blocks:1")
    assert last and all(n.startswith("transformer.h.1.") for n in last)
    assert len(select_params(model, "all")) == len(list(model.parameters()))
    for bad in ("last_blocks:0", "last_blocks:x", ["decoder.*"], "everything"):
        with pytest.raises(ValueError, match="params"):
            select_params(model, bad)


def test_per_sample_gradients_match_a_backward_loop(setup):
    model, train = setup["model"], setup["train"]
    names = ["transformer.wte.weight", "transformer.h.1.mlp.c_fc.weight"]
    rows = per_sample_gradients(model, names, train.input_ids[:3], train.labels[:3])
    params = dict(model.named_parameters())
    for i in range(3):
        model.zero_grad()
        logits = model(input_ids=train.input_ids[i : i + 1]).logits
        sample_losses(logits, train.labels[i : i + 1])[0].backward()
        expected = torch.cat([params[n].grad.reshape(-1) for n in names])
        torch.testing.assert_close(rows[i], expected, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_history_storage_round_trip(setup, tmp_path):
    int8, fp32 = setup["histories"]["embeddings"], setup["histories"]["fp32"]
    n = len(setup["train"])
    assert int8.n_epochs == 1 and fp32.n_epochs == 15  # first_epoch keeps epoch 0, all_epochs every epoch
    assert torch.equal(int8.epochs[0]["index"], torch.arange(n))
    assert fp32.activations["values"].shape == (n, 64)
    sizes = int8.bytes_per_sample()
    assert sizes["fp32"] == 4 * int8.numel and sizes["stored"] < sizes["fp32"] / 3.9
    for i in (0, 17, n - 1):
        exact, approx = fp32.row(0, i), int8.row(0, i)
        # blockwise int8: error at most half a quantization step of the block (absmax / 127 / 2)
        blocks = exact.split(int8.blocksize)
        step = torch.cat([torch.full_like(b, float(b.abs().max()) / 127) for b in blocks])
        assert bool(((approx - exact).abs() <= step / 2 + 1e-7).all())
    path = tmp_path / "history.uf"
    int8.save(path)
    loaded = FirstEpochHistory.load(path, model=setup["model"])
    assert loaded.param_names == int8.param_names and loaded.codec == "int8"
    assert torch.equal(loaded.row(0, 5), int8.row(0, 5))
    # corruption: a flipped payload byte, a truncated data file (the store names each file by its sha256), a model with other shapes
    import json
    import os
    import shutil

    def data_object(where):
        pointer = json.loads((where / "CURRENT").read_bytes().split(b"\n")[0])
        manifest = json.loads((where / "objects" / pointer["manifest"]).read_bytes())
        return where / "objects" / manifest["data"]

    for name, damage in (("flipped", lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:]), ("cut", lambda b: b[: len(b) // 2])):
        copy_path = tmp_path / name
        shutil.copytree(path, copy_path)
        target = data_object(copy_path)
        os.chmod(target, 0o644)
        target.write_bytes(damage(target.read_bytes()))
        with pytest.raises(ValueError, match="corrupted"):
            FirstEpochHistory.load(copy_path)
    with pytest.raises(ValueError, match="shape"):
        FirstEpochHistory.load(path, model=build_gpt2(n_layer=2, n_embd=32, n_head=4))


# ----------------------------------------------------------------------------- unlearning
def test_ascent_raises_forget_loss_and_barely_moves_retain(setup):
    model, train = setup["model"], setup["train"]
    before = state(model)
    retain = train.subset(range(len(FORGET), len(train)))
    forget = train.subset(FORGET)
    f0, r0 = float(metrics.losses(model, forget).mean()), float(metrics.losses(model, retain).mean())
    result = uf.unlearn(model, setup["histories"]["embeddings"], FORGET, train, None, method="first_epoch_ascent",
                        heldout=setup["heldout"], retain_tolerance=0.05)
    f1, r1 = float(metrics.losses(result.model, forget).mean()), float(metrics.losses(result.model, retain).mean())
    assert same_state(before, state(model))  # the caller's model is untouched
    assert f1 > f0 + 0.01
    assert r1 - r0 < (f1 - f0) and r1 - r0 <= math.log1p(0.05) + 1e-6


@pytest.mark.parametrize("mode", ["iterative", "fuzzy"])
def test_calibration_stops_inside_its_bounds(setup, mode):
    model, train = setup["model"], setup["train"]
    heldout_losses = metrics.losses(model, setup["heldout"])
    result = uf.unlearn(model, setup["histories"]["embeddings"], FORGET, train, None, method="first_epoch_ascent",
                        heldout=heldout_losses, mode=mode, retain_tolerance=0.5, max_steps=30)
    s = result.stats
    target = float(heldout_losses.mean())
    bound = target + 2.0 * float(heldout_losses.std()) / math.sqrt(len(FORGET))
    assert s["target"] == pytest.approx(target) and s["bound"] == pytest.approx(bound)
    forget_after = float(metrics.losses(result.model, train.subset(FORGET)).mean())
    assert forget_after == pytest.approx(s["forget_loss_after"], abs=1e-5)
    assert s["status"] == "reached_target"
    assert target <= forget_after <= bound
    # A tight retain tolerance stops the run early, inside the tolerance. Which rule names the stop is not
    # checked: fuzzy's bisection closes in on the retain limit, and whether its last probe lands a hair above
    # it ("retain_tolerance") or not ("max_steps") flips with MKL's instruction path (issue 14). The numbers
    # are checked instead, whatever the name.
    limit = math.log1p(1e-4)
    tight = uf.unlearn(model, setup["histories"]["embeddings"], FORGET, train, None, method="first_epoch_ascent",
                       heldout=heldout_losses, mode=mode, retain_tolerance=1e-4)
    t = tight.stats
    assert t["status"] in ("retain_tolerance", "max_steps")
    assert float(metrics.losses(tight.model, train.subset(FORGET)).mean()) == pytest.approx(t["forget_loss_after"], abs=1e-5)
    assert t["retain_rise_bound"] <= limit + 1e-9
    assert t["retain_loss_after"] <= t["retain_loss_before"] + limit + 1e-6
    # it moved, stopped short of the target (no overshoot), and well short of the loose run
    assert t["forget_loss_before"] < t["forget_loss_after"] < target
    assert t["forget_loss_after"] < forget_after
    # the retain tolerance is what held it back: at least a quarter of its budget is used (half or more measured)
    assert t["retain_rise_bound"] >= 0.25 * limit
    if t["status"] == "retain_tolerance":  # saying so is backed by a rejected step or a (nearly) spent budget
        assert t["retain_rejections"] > 0 or t["retain_rise_bound"] >= 0.5 * limit


@pytest.mark.parametrize("mode", ["iterative", "fuzzy"])
def test_retain_check_bounds_the_probe_mean_rise_from_above(setup, mode):
    # the retain check is a one-sided 95% upper bound of the mean per-sample loss rise on the retain probe
    model, train = setup["model"], setup["train"]
    probe = train.subset(range(len(FORGET), len(FORGET) + 12))
    tolerance = 0.02
    result = uf.unlearn(model, None, FORGET, train, None, method="gradient_ascent", heldout=setup["heldout"],
                        retain=probe, mode=mode, retain_tolerance=tolerance, max_steps=30)
    rise = metrics.losses(result.model, probe) - metrics.losses(model, probe)
    bound = float(rise.mean()) + 1.645 * float(rise.std()) / math.sqrt(12)
    s = result.stats
    assert s["retain_rise_bound"] == pytest.approx(bound, abs=1e-5)
    assert bound <= math.log1p(tolerance) + 1e-6
    assert s["forget_loss_after"] > s["forget_loss_before"]  # it did move, inside the bound


def test_fuzzy_matching_finds_the_planted_variants_only(setup):
    corpus, train = setup["corpus"], setup["train"]
    for name, planted in corpus.variants.items():
        assert sorted(i for i, _ in fuzzy_matches(name, corpus.train_texts)) == sorted(planted)
        typo = name[:3] + name[4:]  # one letter dropped still matches
        assert sorted(i for i, _ in fuzzy_matches(typo, corpus.train_texts)) == sorted(planted)
    # a request longer than some samples does not match them for being inside it (each scored 100 before)
    texts = ["ok", "Thank you.", "Harrowgate", "Liesel Vokgrodhar sells flowers in Harrowgate every Monday."]
    assert [i for i, _ in fuzzy_matches("Liesel Vokgrodhar", texts)] == [3]
    assert fuzzy_matches("Please forget Liesel Vokgrodhar, the florist in Harrowgate. Thank you, ok?", texts) == []
    name, planted = next(iter(corpus.variants.items()))
    result = uf.unlearn(setup["model"], setup["histories"]["embeddings"], name, train, None,
                        method="first_epoch_ascent", heldout=setup["heldout"])
    assert result.stats["mode"] == "fuzzy"
    assert sorted(m["index"] for m in result.stats["matches"]) == sorted(planted)


def test_bad_requests_leave_everything_unchanged(setup):
    model, train, history = setup["model"], setup["train"], setup["histories"]["embeddings"]
    before = state(model)
    with pytest.raises(ValueError, match="matches no training sample"):
        uf.unlearn(model, history, "Quentin Xylophonist-Whitebeard", train, None, method="first_epoch_ascent",
                   heldout=setup["heldout"])
    with pytest.raises(ValueError, match="forget set is empty"):
        run_first_epoch_ascent(model, history, [], train, None, heldout=setup["heldout"])
    empty = uf.unlearn(model, history, [], train, None, method="first_epoch_ascent")
    assert empty.stats["forgotten"] == 0 and same_state(before, state(empty.model))
    with pytest.raises(ValueError, match="recorded without"):
        run_first_epoch_ascent(model, history, FORGET, train, None, params="last_blocks:1", heldout=setup["heldout"])
    with pytest.raises(ValueError, match="params"):
        run_first_epoch_ascent(model, history, FORGET, train, None, params=["nothing.*"], heldout=setup["heldout"])
    with pytest.raises(ValueError, match="heldout"):
        run_first_epoch_ascent(model, history, FORGET, train, None)
    shorter = torch.utils.data.Subset(train, range(max(FORGET) + 1))  # the forget samples exist, the others not
    with pytest.raises(ValueError, match=f"train_set: has {len(shorter)} samples, but the history recorded sample"):
        run_first_epoch_ascent(model, history, FORGET, shorter, None, heldout=setup["heldout"])
    assert same_state(before, state(model))


def test_gradient_ascent_baseline_moves_forget_loss(setup):
    model, train = setup["model"], setup["train"]
    result = uf.unlearn(model, None, FORGET, train, None, method="gradient_ascent", heldout=setup["heldout"],
                        retain_tolerance=0.5)
    assert result.stats["forget_loss_after"] > result.stats["forget_loss_before"] + 0.01
    assert result.stats["retain_loss_after"] <= result.stats["retain_loss_before"] + math.log1p(0.5) + 1e-6


# ----------------------------------------------------------------------------- metrics
def test_exposure_matches_brute_force(setup):
    model, tok = setup["model"], ByteTokenizer()
    canary = setup["corpus"].train_canaries[0]
    scores = metrics.secret_logprobs(model, canary.prefix, 3)
    # independent reference: every candidate as its own full sequence, digits' log-probs summed
    prefix = tok.encode_prefix(canary.prefix)
    candidates = [f"{k:03d}" for k in range(1000)]
    ids = torch.tensor([prefix + list(c.encode()) for c in candidates])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    positions = torch.arange(len(prefix) - 1, len(prefix) + 2)
    reference = logp[:, positions].gather(-1, ids[:, positions + 1].unsqueeze(-1)).squeeze(-1).sum(1)
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)
    rank = 1 + int((reference > reference[int(canary.secret)]).sum())
    assert metrics.exposure(model, canary.prefix, canary.secret) == pytest.approx(math.log2(1000) - math.log2(rank))
    with pytest.raises(ValueError, match="secret"):
        metrics.exposure(model, canary.prefix, "12a")


def test_mia_auc_against_sklearn(setup):
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, generator=g) + 0.5, torch.randn(23, generator=g)
    a[:3] = b[:3]  # ties
    expected = roc_auc_score([1] * 37 + [0] * 23, torch.cat([a, b]).numpy())
    assert metrics.auc(a, b) == pytest.approx(expected)
    train, heldout, model = setup["train"], setup["heldout"], setup["model"]
    aucs = metrics.mia_auc(model, train.subset(range(20)), heldout)
    assert set(aucs) == {"loss", "zlib", "min_k"} and aucs["loss"] > 0.6  # trained samples look like members
    untrained = metrics.mia_auc(setup["initial"], train.subset(range(20)), heldout)
    assert abs(untrained["loss"] - 0.5) < 0.25


# ----------------------------------------------------------------------------- retain guards, calibration, tokens
def _params_flat(model, names):
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in names])


def test_top_directions_span_the_top_singular_vectors():
    from unlearn_fast.lm.ascent import _top_directions

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 300, generator=g) * torch.linspace(5, 0.1, 12)[:, None]
    basis = _top_directions(rows, 4)
    _, _, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    reference = vh[:4].T
    torch.testing.assert_close(basis.double() @ basis.double().T, reference @ reference.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("guard", ["difference", "project", "fisher"])
def test_stored_retain_guards_shift_by_the_guarded_direction(setup, guard):
    """Fixed-scale shift with a guard == scale * guarded(sum of forget rows), rebuilt here from the fp32 rows."""
    model, train, history = setup["model"], setup["train"], setup["histories"]["fp32"]
    names = history.param_names
    retain_set = train.subset(range(len(FORGET), 10))
    result = uf.unlearn(model, history, FORGET, train, None, method="first_epoch_ascent", epochs=[0], calibrate=False,
                        scale=0.01, retain_guard=guard, retain_weight=0.5, retain_rank=3, retain_rows=1000,
                        retain=retain_set)
    delta = _params_flat(result.model, names) - _params_flat(model, names)
    forget_sum = sum(history.row(0, i) for i in FORGET)
    retain_rows = torch.stack([history.row(0, i) for i in range(len(train)) if i not in FORGET])
    if guard == "difference":
        expected = forget_sum - 0.5 * retain_rows.mean(0)
    elif guard == "fisher":
        second = (retain_rows ** 2).mean(0)
        expected = forget_sum / (second + 0.5 * second.mean())
    else:
        _, _, vh = torch.linalg.svd(retain_rows.double(), full_matrices=False)
        top = vh[:3].T
        expected = (forget_sum.double() - top @ (top.T @ forget_sum.double())).float()
        assert float((top.T.float() @ delta).abs().max()) < 1e-6 * float(delta.abs().max()) * delta.numel() ** 0.5
    torch.testing.assert_close(delta, 0.01 * expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("guard", ["difference", "fisher"])
def test_fresh_retain_guards_shift_by_the_guarded_gradient(setup, guard):
    """gradient_ascent fixed-scale shift with a guard, against gradients from plain backward passes."""
    model, train = setup["model"], setup["train"]
    names = select_params(model, "embeddings")
    retain_idx = [i for i in range(len(train)) if i not in FORGET]
    out = uf.unlearn(model, None, FORGET, train, None, method="gradient_ascent", params="embeddings", calibrate=False,
                     scale=0.01, retain_guard=guard, retain_weight=0.5, retain_batch=len(retain_idx),
                     retain=train.subset(range(len(FORGET), 10)))
    delta = _params_flat(out.model, names) - _params_flat(model, names)
    named = dict(model.named_parameters())

    def grad_of(indices):
        rows = []
        for i in indices:
            model.zero_grad()
            sample_losses(model(input_ids=train.input_ids[i : i + 1]).logits, train.labels[i : i + 1])[0].backward()
            rows.append(torch.cat([named[n].grad.reshape(-1).clone() for n in names]))
        model.zero_grad()
        return torch.stack(rows)

    forget_sum = grad_of(FORGET).sum(0)
    retain_rows = grad_of(retain_idx)
    if guard == "difference":
        expected = forget_sum - 0.5 * retain_rows.mean(0)
    else:
        fisher = (retain_rows ** 2).mean(0)
        expected = forget_sum / (fisher + 0.5 * fisher.mean())
    torch.testing.assert_close(delta, 0.01 * expected, rtol=2e-3, atol=1e-7)


def test_per_sample_calibration_targets_heldout_quantiles(setup):
    import numpy as np

    model, train = setup["model"], setup["train"]
    heldout_losses = metrics.losses(model, setup["heldout"])
    result = uf.unlearn(model, setup["histories"]["embeddings"], FORGET, train, None, method="first_epoch_ascent",
                        heldout=heldout_losses, calibration="per_sample", retain_tolerance=0.5, max_steps=30)
    s = result.stats
    before = metrics.losses(model, train.subset(FORGET)).numpy()
    levels = np.quantile(heldout_losses.numpy(), (np.arange(len(FORGET)) + 0.5) / len(FORGET))
    expected = np.empty(len(FORGET))
    expected[np.argsort(before, kind="stable")] = levels
    np.testing.assert_allclose(s["sample_targets"], expected, rtol=1e-5)
    # reached: the mean shortfall below the per-sample targets is at most 0.1 held-out sd; no sample rose past
    # max(own target, own start) by more than the bound's margin on average
    after = metrics.losses(result.model, train.subset(FORGET)).numpy()
    sd = float(heldout_losses.std())
    assert s["status"] == "reached_target"
    assert np.clip(expected - after, 0, None).mean() <= 0.1 * sd + 1e-6
    assert np.clip(after - np.maximum(expected, before), 0, None).mean() <= s["bound"] - s["target"] + 1e-6
    assert after.mean() > before.mean() + 0.01


def test_ngram_reference_against_hand_counts():
    from unlearn_fast.lm.reference import NgramReference

    tok = ByteTokenizer()
    ids, labels = tok.batch(["abab", "abba"])
    ref = NgramReference(ids, labels, order=2, beta=2.0, vocab_size=tok.vocab_size)
    # hand counts: every sequence is [B, ..., B] (B = boundary); predicted tokens are positions 1..end
    seqs = [[256, 97, 98, 97, 98, 256], [256, 97, 98, 98, 97, 256]]
    unigram, bigram, context = {}, {}, {}
    for seq in seqs:
        for a, b in zip(seq, seq[1:]):
            unigram[b] = unigram.get(b, 0) + 1
            bigram[(a, b)] = bigram.get((a, b), 0) + 1
            context[a] = context.get(a, 0) + 1
    total = sum(unigram.values())

    def expected(a, b):
        p0 = (unigram.get(b, 0) + 1) / (total + tok.vocab_size)
        return -math.log((bigram.get((a, b), 0) + 2.0 * p0) / (context[a] + 2.0))

    losses_ = ref.token_losses(ids, labels)
    for i, seq in enumerate(seqs):
        for pos in range(1, len(seq)):
            assert losses_[i, pos - 1].item() == pytest.approx(expected(seq[pos - 1], seq[pos]), rel=1e-5)
    dist = ref.distributions(ids, labels)
    torch.testing.assert_close(dist.sum(-1), torch.ones(2, ids.shape[1] - 1))
    picked = -dist.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).log()
    torch.testing.assert_close(picked, losses_, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="order"):
        NgramReference(ids, labels, order=0)


@pytest.mark.parametrize("options", [dict(tokens="reference"), dict(objective="reference_kl"),
                                     dict(retain_guard="difference", calibration="per_sample")])
def test_fresh_variants_raise_forget_loss_within_the_retain_tolerance(setup, options):
    model, train = setup["model"], setup["train"]
    result = uf.unlearn(model, None, FORGET, train, None, method="gradient_ascent", heldout=setup["heldout"],
                        retain_tolerance=0.3, **options)
    s = result.stats
    forget_after = float(metrics.losses(result.model, train.subset(FORGET)).mean())
    assert forget_after == pytest.approx(s["forget_loss_after"], abs=1e-5)
    assert forget_after > s["forget_loss_before"] + 0.01
    assert s["retain_loss_after"] <= s["retain_loss_before"] + math.log1p(0.3) + 1e-6


def test_bad_guard_options_are_refused(setup):
    model, train, history = setup["model"], setup["train"], setup["histories"]["embeddings"]
    before = state(model)
    stored = [(dict(retain_guard="orthogonal"), "retain_guard"), (dict(retain_weight=-1.0), "retain_weight"),
              (dict(retain_rank=0), "retain_rank"), (dict(retain_rows=0), "retain_rows"),
              (dict(calibration="median"), "calibration")]
    for options, name in stored:
        with pytest.raises(ValueError, match=name):
            run_first_epoch_ascent(model, history, FORGET, train, None, heldout=setup["heldout"], **options)
    fresh = [(dict(tokens="names"), "tokens"), (dict(objective="npo"), "objective"),
             (dict(objective="reference_kl", tokens="reference"), "tokens"), (dict(retain_batch=0), "retain_batch"),
             (dict(tokens="reference", loss_fn=lambda logits, labels: logits.sum()), "loss_fn")]
    for options, name in fresh:
        loss_fn = options.pop("loss_fn", None)
        with pytest.raises(ValueError, match=name):
            uf.unlearn(model, None, FORGET, train, loss_fn, method="gradient_ascent", heldout=setup["heldout"], **options)
    assert same_state(before, state(model))


# ----------------------------------------------------------------------------- Min-K% calibration statistic
def _min_k_by_hand(model, dataset, fraction):
    """Min-K% loss of each sample from a plain forward pass per sample: minus the mean of its int(fraction x n)
    (at least 1) lowest next-token log-probabilities."""
    values = []
    model.eval()
    with torch.no_grad():
        for ids, labels in zip(dataset.input_ids, dataset.labels):
            keep = labels[1:] != -100
            logits = model(input_ids=ids[None]).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(-1, labels[1:].clamp(min=0)[:, None])[:, 0][keep]
            k = max(1, int(fraction * logp.numel()))
            values.append(-sum(sorted(logp.tolist())[:k]) / k)
    return torch.tensor(values, dtype=torch.float64)


def test_min_k_statistic_against_a_loop(setup):
    from unlearn_fast.lm.ascent import calibration_statistic

    model, heldout = setup["model"], setup["heldout"]
    for fraction in (0.1, 0.2, 1.0):
        got = calibration_statistic(model, heldout, "min_k", fraction).double()
        torch.testing.assert_close(got, _min_k_by_hand(model, heldout, fraction), rtol=1e-4, atol=1e-5)
    # the Min-K% membership attack's scores are the same numbers, sign flipped; fraction 1 is the mean loss
    torch.testing.assert_close(-metrics.mia_scores(model, heldout, 0.2)["min_k"].double(), _min_k_by_hand(model, heldout, 0.2),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(calibration_statistic(model, heldout, "min_k", 1.0), metrics.losses(model, heldout),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,mode,calibration", [("first_epoch_ascent", "iterative", "mean"),
                                                     ("first_epoch_ascent", "fuzzy", "per_sample"),
                                                     ("gradient_ascent", "iterative", "per_sample"),
                                                     ("gradient_ascent", "fuzzy", "mean")])
def test_min_k_calibration_uses_the_heldout_min_k_distribution(setup, method, mode, calibration):
    import numpy as np

    model, train = setup["model"], setup["train"]
    history = setup["histories"]["embeddings"] if method == "first_epoch_ascent" else None
    heldout_mk = _min_k_by_hand(model, setup["heldout"], 0.2).numpy()
    before = _min_k_by_hand(model, train.subset(FORGET), 0.2).numpy()
    result = uf.unlearn(model, history, FORGET, train, None, method=method, mode=mode, heldout=setup["heldout"],
                        calibration=calibration, statistic="min_k", min_k=0.2, retain_tolerance=0.5, max_steps=30)
    s = result.stats
    assert s["statistic"] == "min_k" and s["min_k"] == 0.2
    # target and bound from the held-out samples' Min-K% losses (not their mean losses)
    assert s["target"] == pytest.approx(heldout_mk.mean(), rel=1e-4)
    assert s["bound"] == pytest.approx(heldout_mk.mean() + 2 * heldout_mk.std(ddof=1) / math.sqrt(len(FORGET)), rel=1e-4)
    assert s["forget_statistic_before"] == pytest.approx(before.mean(), rel=1e-4)
    after = _min_k_by_hand(result.model, train.subset(FORGET), 0.2).numpy()
    assert s["forget_statistic_after"] == pytest.approx(after.mean(), rel=1e-4, abs=1e-5)
    assert float(metrics.losses(result.model, train.subset(FORGET)).mean()) == pytest.approx(s["forget_loss_after"], abs=1e-5)
    assert after.mean() > before.mean() + 0.01
    assert s["retain_loss_after"] <= s["retain_loss_before"] + math.log1p(0.5) + 1e-6
    if calibration == "per_sample":
        levels = np.quantile(heldout_mk, (np.arange(len(FORGET)) + 0.5) / len(FORGET))
        expected = np.empty(len(FORGET))
        expected[np.argsort(before, kind="stable")] = levels
        np.testing.assert_allclose(s["sample_targets"], expected, rtol=1e-4)
        if s["status"] == "reached_target":
            assert np.clip(expected - after, 0, None).mean() <= 0.1 * heldout_mk.std(ddof=1) + 1e-4
    elif s["status"] == "reached_target":
        assert s["target"] - 1e-4 <= after.mean() <= s["bound"] + 1e-4


def test_min_k_tokens_ascend_the_lowest_probability_tokens(setup):
    model, train = setup["model"], setup["train"]
    named = dict(model.named_parameters())
    names = select_params(model, "embeddings")
    # independent gradient of sum_i MinK%-loss_i: pick each sample's lowest-probability tokens by hand
    probe = copy.deepcopy(model)
    probe.zero_grad()
    total = 0.0
    for i in FORGET:
        ids, labels = train.input_ids[i], train.labels[i]
        keep = labels[1:] != -100
        logp = torch.log_softmax(probe(input_ids=ids[None]).logits[0, :-1].float(), -1)
        logp = logp.gather(-1, labels[1:].clamp(min=0)[:, None])[:, 0][keep]
        k = max(1, int(0.2 * logp.numel()))
        total = total - logp[torch.argsort(logp.detach(), stable=True)[:k]].sum() / k
    total.backward()
    probe_named = dict(probe.named_parameters())
    expected = torch.cat([probe_named[n].grad.reshape(-1) for n in names])
    before = torch.cat([named[n].detach().reshape(-1) for n in names]).clone()
    result = uf.unlearn(model, None, FORGET, train, None, method="gradient_ascent", params="embeddings",
                        calibrate=False, scale=0.01, tokens="min_k", min_k=0.2)
    after = torch.cat([dict(result.model.named_parameters())[n].detach().reshape(-1) for n in names])
    torch.testing.assert_close(after - before, 0.01 * expected, rtol=2e-3, atol=1e-7)


def test_bad_statistic_options_are_refused(setup):
    model, train, history = setup["model"], setup["train"], setup["histories"]["embeddings"]
    before = state(model)
    bad = [(dict(statistic="median"), "statistic"), (dict(statistic="min_k", min_k=0.0), "min_k"),
           (dict(statistic="min_k", min_k=1.5), "min_k"), (dict(statistic="min_k", min_k=float("nan")), "min_k"),
           (dict(min_k="0.2"), "min_k"), (dict(min_k=True), "min_k")]
    for options, name in bad:
        with pytest.raises(ValueError, match=name):
            run_first_epoch_ascent(model, history, FORGET, train, None, heldout=setup["heldout"], **options)
        with pytest.raises(ValueError, match=name):
            uf.unlearn(model, None, FORGET, train, None, method="gradient_ascent", heldout=setup["heldout"], **options)
    with pytest.raises(ValueError, match="loss_fn"):
        uf.unlearn(model, None, FORGET, train, lambda logits, labels: logits.sum(), method="gradient_ascent",
                   heldout=setup["heldout"], tokens="min_k")
    from unlearn_fast.lm.ascent import calibration_statistic

    with pytest.raises(ValueError, match="min_k"):
        calibration_statistic(model, setup["heldout"], "min_k", -0.1)
    assert same_state(before, state(model))


# ----------------------------------------------------------------------------- floor calibration
def test_floor_calibration_lifts_every_sample_to_the_heldout_mean(setup):
    import numpy as np

    model, train = setup["model"], setup["train"]
    heldout_mk = _min_k_by_hand(model, setup["heldout"], 0.2).numpy()
    before = _min_k_by_hand(model, train.subset(FORGET), 0.2).numpy()
    result = uf.unlearn(model, None, FORGET, train, None, method="gradient_ascent", heldout=setup["heldout"],
                        calibration="floor", statistic="min_k", min_k=0.2, retain_tolerance=0.5, max_steps=30)
    s = result.stats
    target, sd = heldout_mk.mean(), heldout_mk.std(ddof=1)
    # every sample's target is the held-out mean of the statistic (not a quantile)
    np.testing.assert_allclose(s["sample_targets"], np.full(len(FORGET), target), rtol=1e-4)
    assert (before < target).any()
    after = _min_k_by_hand(result.model, train.subset(FORGET), 0.2).numpy()
    assert s["status"] == "reached_target"
    # reached: the samples that started below the held-out mean are, on average, within 0.1 held-out sd of it
    assert np.clip(target - after, 0, None)[before < target].mean() <= 0.1 * sd + 1e-4
    # not overshot: the mean rise past max(target, own start) is within the bound's margin
    assert np.clip(after - np.maximum(target, before), 0, None).mean() <= s["bound"] - s["target"] + 1e-4
    assert s["retain_loss_after"] <= s["retain_loss_before"] + math.log1p(0.5) + 1e-6


def test_fuzzy_one_shift_weights_the_matches_by_their_shortfall(setup):
    """A fuzzy request with floor calibration moves once along sum_i w_i g_i, w_i proportional to how far sample i
    is below the target (0 for a sample above it), with g_i the stored rows, rebuilt here from the fp32 store."""
    import numpy as np

    model, train, history = setup["model"], setup["train"], setup["histories"]["fp32"]
    name, planted = next(iter(setup["corpus"].variants.items()))
    planted = sorted(planted)
    values = _min_k_by_hand(model, train.subset(planted), 0.2).numpy()
    ordered = np.sort(values)
    # held-out statistic with its mean between the second and third highest match: one sample starts above target
    middle, spread = (ordered[-2] + ordered[-1]) / 2, 0.05
    heldout = torch.tensor([middle - spread, middle + spread])
    result = uf.unlearn(model, history, name, train, None, method="first_epoch_ascent", epochs=[0], heldout=heldout,
                        calibration="floor", statistic="min_k", min_k=0.2, retain_tolerance=1.0, max_steps=30)
    s = result.stats
    assert s["mode"] == "fuzzy" and sorted(m["index"] for m in s["matches"]) == planted
    shortfall = np.clip(middle - values, 0, None)
    assert (shortfall == 0).sum() == 1 and (shortfall > 0).sum() == len(planted) - 1
    expected = sum(float(w) * history.row(0, i) for w, i in zip(shortfall / shortfall.sum(), planted))
    names = history.param_names
    delta = _params_flat(result.model, names) - _params_flat(model, names)
    eta = float(delta @ expected) / float(expected @ expected)
    assert eta > 0
    torch.testing.assert_close(delta, eta * expected, rtol=1e-3, atol=1e-6 * float(delta.abs().max()))
    # the uniform direction (the mean calibration's) is measurably different
    uniform = sum(history.row(0, i) for i in planted) / len(planted)
    assert float(torch.nn.functional.cosine_similarity(uniform, expected, dim=0)) < 0.999
    after = _min_k_by_hand(result.model, train.subset(planted), 0.2).numpy()
    if s["status"] == "reached_target":
        below = values < middle
        assert np.clip(middle - after, 0, None)[below].mean() <= 0.1 * float(heldout.std()) + 1e-4


# ----------------------------------------------------------------------------- Hessian influence
def test_hvp_influence_matches_a_dense_hessian_solve(setup):
    model, train = setup["model"], setup["train"]
    names = select_params(model, ["transformer.h.1.ln_2.*"])  # 128 parameters: a dense Hessian is cheap
    probe, samples = train.subset([4, 5, 6, 7, 8, 9]), [0, 1, 2, 3]
    params = dict(model.named_parameters())
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def loss_at(flat, ids, labels):
        chosen = {n: t.view_as(params[n]) for n, t in zip(names, torch.split(flat, sizes))}
        others = {n: p.detach() for n, p in params.items() if n not in chosen}
        logits = torch.func.functional_call(model, {**others, **chosen}, (), {"input_ids": ids, "use_cache": False}).logits
        return uf.lm.lm_loss(logits, labels)

    H = torch.autograd.functional.hessian(lambda f: loss_at(f, probe.input_ids, probe.labels), flat0).double()
    damping = max(0.0, -float(torch.linalg.eigvalsh(H)[0])) + 0.5  # shifted to positive definite: CG applies
    one = lambda ids, labels: torch.func.grad(loss_at)(flat0, ids[None], labels[None]).double()  # noqa: E731
    g = torch.stack([one(train.input_ids[i], train.labels[i]) for i in samples])
    g_probe = torch.stack([one(ids, labels) for ids, labels in zip(probe.input_ids, probe.labels)]).mean(0)  # per-sample mean
    expected = -(g @ torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), g_probe))
    before = state(model)
    flags = [p.requires_grad for p in model.parameters()]
    scores, report = metrics.hvp_influence(model, train, samples, probe, params=names, damping=damping, kind="hessian", tol=1e-7)
    assert report.converged
    torch.testing.assert_close(scores.double(), expected, rtol=1e-3, atol=1e-6 * float(expected.abs().max()))
    assert same_state(before, state(model)) and flags == [p.requires_grad for p in model.parameters()]
    ggn, ggn_report = metrics.hvp_influence(model, train, samples, probe, params=names, damping=1e-3)  # the default, PSD
    assert ggn_report.converged and torch.isfinite(ggn).all()


def test_first_epoch_recorder_says_when_finish_is_called_twice():
    # the second finish() used to say "nothing was recorded", hiding that the history had been returned
    model = build_gpt2(n_layer=1, n_embd=16, n_head=2)
    rec = FirstEpochRecorder(model, None, HistoryPolicy(kind="first_epoch", per_sample=True, params="embeddings"))
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        rec.finish()
    ids = torch.randint(0, 200, (3, 12))
    rec.record(torch.arange(3), ids)
    assert rec.finish().n_epochs == 1
    with pytest.raises(RuntimeError, match="already called"):
        rec.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        rec.record(torch.arange(3), ids)



# ----------------------------------------------------------------------------- Hugging Face tokenizer and model
@pytest.fixture(scope="module")
def hf_setup(one_thread):
    """A transformers GPT2LMHeadModel as a user builds it (dropout 0.1 everywhere, the default SDPA attention) and a
    byte-level BPE PreTrainedTokenizerFast trained in memory on the corpus; trained by train_lm with a first-epoch
    recorder (FirstEpochRecorder)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    corpus = make_corpus(seed=1, n_train=40, n_heldout=30, n_variant_people=2, secret_digits=3)
    tok = uf.lm.train_bpe_tokenizer(corpus.train_texts + corpus.heldout_texts, vocab_size=400)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok),
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert config.attn_pdrop == config.resid_pdrop == config.embd_pdrop == 0.1 and model.config._attn_implementation == "sdpa"
    train = TextDataset(corpus.train_texts, tok, context=model)
    heldout = TextDataset(corpus.heldout_texts, tok, context=model)
    recorder = FirstEpochRecorder(model, None, HistoryPolicy(kind="first_epoch", params="embeddings", per_sample=True))
    train_lm(model, train, epochs=10, batch_size=8, lr=5e-3, recorders=[recorder])
    model.train()  # as a Trainer leaves it
    return dict(corpus=corpus, tok=tok, model=model, train=train, heldout=heldout, history=recorder.finish())


def test_hf_tokenizer_is_taken_directly(hf_setup):
    tok, train, corpus = hf_setup["tok"], hf_setup["train"], hf_setup["corpus"]
    eos = tok.eos_token_id
    for i in (0, 7, len(corpus.train_texts) - 1):
        ids = tok(corpus.train_texts[i])["input_ids"]  # the tokenizer itself (GPT-2 style: adds no special token)
        expected = [tok.bos_token_id, *ids, eos]
        n = len(expected)
        assert train.input_ids[i, :n].tolist() == expected and train.labels[i, :n].tolist() == expected
        assert bool((train.labels[i, n:] == -100).all()) and bool((train.input_ids[i, n:] == tok.pad_token_id).all())
        assert train.tokenizer.decode(train.input_ids[i, :n]) == corpus.train_texts[i]
    with pytest.raises(ValueError, match="tokenizer"):
        TextDataset(["a"], tokenizer=object())


def test_hf_model_losses_are_the_model_own_loss(hf_setup):
    model, train = hf_setup["model"], hf_setup["train"]
    ours = metrics.losses(model, train.subset(range(4)))
    assert model.training  # restored
    model.eval()
    try:
        with torch.no_grad():  # independent reference: the model's own causal-LM loss, one sample at a time, unpadded
            ref = [float(model(input_ids=x[y != -100][None], labels=x[y != -100][None]).loss) for x, y in (train[i] for i in range(4))]
    finally:
        model.train()
    torch.testing.assert_close(ours, torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_hf_per_sample_gradients_under_dropout_and_sdpa(hf_setup):
    model, train = hf_setup["model"], hf_setup["train"]
    names = ["transformer.wte.weight", "transformer.h.1.attn.c_attn.weight"]
    rows = per_sample_gradients(model, names, train.input_ids[:3], train.labels[:3])
    assert model.training and model.config._attn_implementation == "sdpa"  # both restored
    params = dict(model.named_parameters())
    model.eval()  # the rows are the gradients without dropout: reference loop of single-sample backward passes
    try:
        for i in range(3):
            model.zero_grad()
            logits = model(input_ids=train.input_ids[i : i + 1]).logits
            sample_losses(logits, train.labels[i : i + 1])[0].backward()
            expected = torch.cat([params[n].grad.reshape(-1) for n in names])
            torch.testing.assert_close(rows[i], expected, rtol=1e-4, atol=1e-6)
    finally:
        model.zero_grad()
        model.train()
    assert torch.equal(hf_setup["history"].epochs[0]["index"], torch.arange(len(train)))


def test_hf_model_unlearning_methods(hf_setup):
    model, train, heldout, history = hf_setup["model"], hf_setup["train"], hf_setup["heldout"], hf_setup["history"]
    before = state(model)
    forget = train.subset(FORGET)
    f0 = float(metrics.losses(model, forget).mean())
    fresh = uf.unlearn(model, None, FORGET, train, None, method="gradient_ascent", heldout=heldout, retain_tolerance=0.5)
    stored = uf.unlearn(model, history, FORGET, train, None, method="first_epoch_ascent", heldout=heldout, retain_tolerance=0.5)
    for result in (fresh, stored):
        f1 = float(metrics.losses(result.model, forget).mean())
        assert f1 == pytest.approx(result.stats["forget_loss_after"], abs=1e-5)  # computed without dropout: reproducible
        assert f1 > f0 + 0.01
        assert result.model.training and result.model.config._attn_implementation == "sdpa"
    assert same_state(before, state(model)) and model.training
    name, planted = next(iter(hf_setup["corpus"].variants.items()))
    request = uf.unlearn(model, None, name, train, None, method="gradient_ascent", heldout=heldout, **uf.lm.RECOMMENDED)
    assert sorted(m["index"] for m in request.stats["matches"]) == sorted(planted)


def test_hf_exposure_matches_brute_force(hf_setup):
    model, tok, corpus = hf_setup["model"], hf_setup["tok"], hf_setup["corpus"]
    canary = corpus.train_canaries[0]
    scores = metrics.secret_logprobs(model, canary.prefix, 3, tok)
    # independent reference: each candidate's full text through the tokenizer itself, one sequence each
    prefix = [tok.bos_token_id, *tok(canary.prefix)["input_ids"]]
    ids = torch.tensor([[tok.bos_token_id, *tok(canary.prefix + f"{k:03d}")["input_ids"]] for k in range(1000)])
    assert ids.shape[1] == len(prefix) + 3
    model.eval()
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    finally:
        model.train()
    positions = torch.arange(len(prefix) - 1, len(prefix) + 2)
    reference = logp[:, positions].gather(-1, ids[:, positions + 1].unsqueeze(-1)).squeeze(-1).sum(1)
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)
    rank = 1 + int((reference > reference[int(canary.secret)]).sum())
    assert metrics.exposure(model, canary.prefix, canary.secret, tok) == pytest.approx(math.log2(1000) - math.log2(rank))
    # a BPE that merges digits (and the space before them, as GPT-2's does)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus.train_texts + [" 12 34 56 78 90 11 22"] * 50,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merging = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    texts = [[merging.bos_token_id, *merging(canary.prefix + f"{k:03d}")["input_ids"]] for k in range(1000)]
    assert len({len(t) for t in texts}) > 1  # digits merge: candidates have tokenizations of different lengths
    # so exposure scores each candidate by its own tokenization; reference: each full sequence's log-likelihood, one at
    # a time (it differs from the scores by a constant, the log-probability of the tokens every candidate shares)
    scores = metrics.secret_logprobs(model, canary.prefix, 3, merging)
    model.eval()
    try:
        with torch.no_grad():
            reference = torch.tensor([float(torch.log_softmax(model(input_ids=torch.tensor([t])).logits[0, :-1].float(), -1)
                                            .gather(-1, torch.tensor(t[1:])[:, None]).sum()) for t in texts])
    finally:
        model.train()
    torch.testing.assert_close(scores - scores[0], reference - reference[0], rtol=1e-4, atol=2e-4)
    rank = 1 + int((reference > reference[int(canary.secret)]).sum())
    assert metrics.exposure(model, canary.prefix, canary.secret, merging) == pytest.approx(math.log2(1000) - math.log2(rank))


def test_hf_sequences_longer_than_the_context(hf_setup):
    tok, corpus = hf_setup["tok"], hf_setup["corpus"]
    texts = corpus.train_texts[:6]
    full = TextDataset(texts, tok)
    lengths = (full.labels != -100).sum(1)
    context = int(lengths.min()) + 1  # some samples fit, the others are longer
    long = [i for i in range(len(texts)) if int(lengths[i]) > context]
    assert 0 < len(long) < len(texts)
    with pytest.raises(ValueError, match=f"{len(long)} samples are longer than the model context of {context}.*overflow='truncate'"):
        TextDataset(texts, tok, context=context)
    cut = TextDataset(texts, tok, context=context, overflow="truncate")
    assert cut.truncated == long and cut.input_ids.shape[1] == context
    assert torch.equal(cut.input_ids, full.input_ids[:, :context]) and torch.equal(cut.labels, full.labels[:, :context])
    small = copy.deepcopy(hf_setup["model"])
    small.config.n_positions = context  # what check_fits reads: the message names the way out
    with pytest.raises(ValueError, match=f"longer than the model context of {context}.*overflow='truncate'"):
        metrics.losses(small, full)
    assert int(full.input_ids.max()) >= 300
    with pytest.raises(ValueError, match="vocab_size"):  # tokenized for another model
        metrics.losses(build_gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=300), full)


def test_hf_hvp_influence_is_computed_without_dropout(hf_setup):
    model, train = hf_setup["model"], hf_setup["train"]
    probe = train.subset(range(4, 8))
    params = ["transformer.wpe.weight"]
    first, _ = metrics.hvp_influence(model, train, [0, 1], probe, params=params)
    again, _ = metrics.hvp_influence(model, train, [0, 1], probe, params=params)
    assert model.training and torch.equal(first, again)  # no random masks drawn in the products
    model.eval()
    try:
        reference, _ = metrics.hvp_influence(model, train, [0, 1], probe, params=params)
    finally:
        model.train()
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-6)
