"""HistoryRecorder refuses misuse it cannot replay, binds the history to the trained model, and uf.data gives
the indices it needs from any sampler."""
import copy
import re

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.methods.trajectory import weights_at
from unlearn_fast.history import CheckpointGrid, flat_params
from unlearn_fast.recording import PYTHON_CHECKS_MAX, gradient_norm
from unlearn_fast.methods import mini, retrain

LOSS = torch.nn.functional.cross_entropy


def make_data(n=64, d=5, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    return torch.utils.data.TensorDataset(X, y)


def setup(kind="full", model=None, allow=()):
    torch.manual_seed(0)
    model = model or torch.nn.Linear(5, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"allow": allow} if allow else {}
    return model, opt, uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind=kind, rank=2), **options)


def backward(model, data, idx, loss_fn=LOSS):
    x, y = data[idx]
    loss_fn(model(x), y).backward()


def steps(model, opt, rec, data, n_steps=4, batch=16, loss_fn=LOSS):
    for t in range(n_steps):
        idx = torch.arange(t * batch, (t + 1) * batch) % len(data)
        opt.zero_grad()
        backward(model, data, idx, loss_fn)
        rec.record(idx)
        opt.step()


# ----------------------------------------------------------------------------- one record per optimizer step
def test_a_second_record_for_one_step_is_refused_and_the_history_keeps_one_row_per_step():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data, n_steps=2)
    opt.zero_grad()
    backward(model, data, torch.arange(16))
    rec.record(torch.arange(16))
    with pytest.raises(ValueError, match="record: called twice for step 2"):
        rec.record(torch.arange(16))
    opt.step()
    history = rec.finish(data, LOSS)
    assert history.num_steps == 3 and len(history.trajectory["g"]) == 3
    # forgetting nothing replays the 3 steps the optimizer took: the trained weights, bit for bit
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))


def test_an_optimizer_step_without_record_is_named_at_the_next_record_and_at_finish():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data, n_steps=2)
    opt.zero_grad()
    backward(model, data, torch.arange(16))
    opt.step()  # step 2, not recorded
    opt.zero_grad()
    backward(model, data, torch.arange(16))
    with pytest.raises(ValueError, match="optimizer step 2 ran without a record"):
        rec.record(torch.arange(16))
    with pytest.raises(ValueError, match="optimizer step 2 ran without a record"):
        rec.finish(data, LOSS)


def test_finish_after_a_record_without_its_step_is_refused():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data, n_steps=1)
    opt.zero_grad()
    backward(model, data, torch.arange(16))
    rec.record(torch.arange(16))
    with pytest.raises(ValueError, match="step 1 was recorded but optimizer.step"):
        rec.finish(data, LOSS)


def test_record_after_finish_is_refused_and_the_history_stays_closed():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data, n_steps=3)
    history = rec.finish(data, LOSS)
    opt.zero_grad()
    backward(model, data, torch.arange(16))
    with pytest.raises(ValueError, match="record: the recorder is finished"):
        rec.record(torch.arange(16))
    with pytest.raises(ValueError, match="finish: the recorder is finished"):
        rec.finish(data, LOSS)
    assert history.num_steps == 3


def test_record_without_a_backward_pass_is_refused():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data, n_steps=1)
    opt.zero_grad(set_to_none=False)  # zero gradients, not None: the old recorder stored them as the step's gradient
    with pytest.raises(ValueError, match="no backward pass"):
        rec.record(torch.arange(16))
    backward(model, data, torch.arange(16))
    opt.zero_grad()  # the gradients of that backward are gone before record()
    with pytest.raises(ValueError, match="gradients were set to None after backward"):
        rec.record(torch.arange(16))


def test_a_wrapped_optimizer_is_unwrapped_and_its_real_class_recorded():
    class Wrapper(torch.optim.Optimizer):  # what accelerate's AcceleratedOptimizer looks like: the real one in .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        def step(self, closure=None):
            return self.optimizer.step(closure)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none)

    data = make_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    opt = Wrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5))
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    steps(model, opt, rec, data, n_steps=4)
    history = rec.finish(data, LOSS)
    assert history.meta["optimizer"]["class"] == "torch.optim.sgd.SGD"
    assert history.meta["optimizer"]["groups"][0]["momentum"] == 0.5
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))


# ----------------------------------------------------------------------------- indices
@pytest.mark.parametrize(
    "indices, batch_size, message",
    [
        (torch.arange(16, dtype=torch.float32), None, "integer"),
        ([0.0, 1.5, 2.0], None, "integer"),
        (torch.ones(16, dtype=torch.bool), None, "integer"),
        (torch.arange(16).reshape(4, 4), None, "1-D"),
        (torch.tensor([0, 1, -2]), None, "negative"),
        (torch.tensor([0, 1, 2, 1, 0, 2]), None, "repeats"),  # labels of a 6-sample batch over 3 classes
        (torch.cat([torch.arange(3000), torch.tensor([-1])]), None, "negative"),  # (batches past PYTHON_CHECKS_MAX: numpy's checks)
        (torch.cat([torch.arange(3000), torch.tensor([2999])]), None, "repeats"),
        (torch.arange(5), 16, "5 indices for a batch of 16"),
        (torch.arange(16), 0, "batch_size must be a positive int"),
        ([], None, "empty"),
    ],
)
def test_bad_batch_indices_are_refused_and_leave_the_history_unchanged(indices, batch_size, message):
    data = make_data()
    model, opt, rec = setup()
    opt.zero_grad()
    backward(model, data, torch.arange(16))
    with pytest.raises(ValueError, match=message):
        rec.record(indices, batch_size=batch_size)
    assert rec.num_steps == 0
    rec.record(torch.arange(16), batch_size=16)  # the same step recorded right
    assert rec.num_steps == 1


def test_repeated_indices_are_found_in_batches_of_any_size_and_order():
    # record()'s scratch-table test against a set, over batches that grow the table, repeat earlier steps' indices
    # (allowed) and hide one repeat anywhere (refused), in integer dtypes and non-contiguous views
    data = make_data()
    model, opt, rec = setup(kind="minimal")
    gen = torch.Generator().manual_seed(5)
    recorded = refused = 0
    for trial in range(40):
        # (small batches are checked in Python, large ones with numpy: both kinds, sizes around the switch)
        n = int(torch.randint(1, 300, (1,), generator=gen)) if trial % 3 else PYTHON_CHECKS_MAX - 2 + trial // 3
        idx = torch.randperm(n + 50 * trial, generator=gen)[:n]
        if trial % 2 and n > 1:
            i, j = torch.randperm(n, generator=gen)[:2].tolist()
            idx[i] = idx[j]
        if trial % 5 == 0:
            idx = torch.stack([idx, idx]).t().reshape(-1)[::2]  # a strided view of the same values
        idx = idx.to((torch.int32, torch.int64, torch.int16)[trial % 3]) if int(idx.max()) < 2**15 else idx
        opt.zero_grad()
        backward(model, data, torch.arange(16))
        if len(set(idx.tolist())) != n:
            refused += 1
            with pytest.raises(ValueError, match="repeats"):
                rec.record(idx)
            assert rec.num_steps == recorded
            idx = torch.unique(idx)  # the same step, recorded right
        rec.record(idx)
        recorded += 1
        opt.step()
    assert refused == 20 and rec.num_steps == recorded == 40


def test_a_reused_index_buffer_does_not_change_what_was_recorded():
    # a loader may fill one index tensor in place batch after batch: the history keeps its own copy of each step's
    data = make_data()
    model, opt, rec = setup(kind="full")
    buffer = torch.empty(16, dtype=torch.int64)
    for t in range(3):
        buffer.copy_(torch.arange(t * 16, (t + 1) * 16))
        opt.zero_grad()
        backward(model, data, buffer.clone())
        rec.record(buffer)
        opt.step()
    buffer.fill_(0)
    history = rec.finish(data, LOSS)
    assert [b.tolist() for b in history.schedule["batches"]] == [list(range(t * 16, (t + 1) * 16)) for t in range(3)]


def test_indices_beyond_the_training_set_are_refused_at_finish():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data, n_steps=1)
    with pytest.raises(ValueError, match="recorded batch index 15 is out of range for train_set of 8"):
        rec.finish(torch.utils.data.Subset(data, range(8)), LOSS)


# ----------------------------------------------------------------------------- what the replay cannot reproduce
def test_gradient_accumulation_with_unequal_micro_batches_is_recorded_and_replayed(tmp_path):
    data = make_data(n=70)
    splits = [(10, 6), (9, 4, 3), (16,), (5, 11)]  # micro-batch sizes of four optimizer steps (one without accumulation)

    def train(model, opt, rec=None, keep=None):
        at = 0
        for sizes in splits:
            opt.zero_grad()
            idx = torch.arange(at, at + sum(sizes))
            for part in torch.split(idx, list(sizes)):
                part = part if keep is None else part[keep[part]]
                if part.numel():
                    x, y = data[part]
                    (LOSS(model(x), y) / len(sizes)).backward()  # the usual idiom: each micro-batch's mean / their number
            if rec is not None:
                rec.record(idx)
            opt.step()
            at += sum(sizes)

    model, opt, rec = setup()
    train(model, opt, rec)
    history = rec.finish(data, LOSS)
    assert history.meta["recording"]["accumulated_steps"] == 3
    assert history.schedule["micro_counts"].tolist() == [2, 3, 1, 2] and history.schedule["micro_sizes"].tolist() == [10, 6, 9, 4, 3, 5, 11]
    # forgetting nothing: the trained weights, bit for bit (one mean over each step's batch would not be)
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    # forgetting samples: the same loop on the retained samples of each micro-batch
    forget = torch.tensor([2, 12, 30, 52])
    keep = torch.ones(70, dtype=torch.bool)
    keep[forget] = False
    ref_model, ref_opt, _ = setup()
    train(ref_model, ref_opt, keep=keep)
    for h in (history, uf.GradientHistory.load(history.save(str(tmp_path / "h")))):  # also through storage
        out = uf.unlearn(model, h, forget, data, LOSS, method="retrain").model
        assert torch.equal(flat_params(out), flat_params(ref_model))
    with pytest.raises(ValueError, match="accumulated gradients over micro-batches"):
        uf.unlearn(model, history, forget, data, LOSS, method="deltagrad")


@pytest.mark.parametrize("rule", ["batch_mean", "sum_of_means"])
def test_accumulation_weighted_by_micro_batch_size_is_replayed_and_other_weights_refused(rule, tmp_path):
    # a trainer that normalises by the items in the whole batch weighs each micro-batch's mean by its share; one that
    # forgets to divide sums the means (neither rule the replay has)
    data = make_data(n=70)
    splits = [(16,), (10, 6), (9, 4, 3), (5, 11)]

    def train(model, opt, rec=None, keep=None):
        at = 0
        for sizes in splits:
            opt.zero_grad()
            idx = torch.arange(at, at + sum(sizes))
            parts = [part if keep is None else part[keep[part]] for part in torch.split(idx, list(sizes))]
            for part in parts:
                if part.numel():
                    x, y = data[part]
                    loss = LOSS(model(x), y)
                    (loss * part.numel() / sum(q.numel() for q in parts) if rule == "batch_mean" else loss).backward()
            if rec is not None:
                rec.record(idx)
            opt.step()
            at += sum(sizes)

    model, opt, rec = setup()
    train(model, opt, rec)
    if rule == "sum_of_means":
        with pytest.raises(ValueError, match=r"step 1 accumulated gradients over micro-batches of \[10, 6\] samples that match neither"):
            rec.finish(data, LOSS)
        return
    history = rec.finish(data, LOSS)
    assert history.meta["recording"]["accumulation_weighting"] == "batch_mean"
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.allclose(flat_params(replay), flat_params(model), rtol=1e-13, atol=1e-15)
    forget = torch.tensor([2, 20, 30, 52])
    keep = torch.ones(70, dtype=torch.bool)
    keep[forget] = False
    ref_model, ref_opt, _ = setup()
    train(ref_model, ref_opt, keep=keep)
    for h in (history, uf.GradientHistory.load(history.save(str(tmp_path / "h")))):  # also through storage
        out = uf.unlearn(model, h, forget, data, LOSS, method="retrain").model
        assert torch.allclose(flat_params(out), flat_params(ref_model), rtol=1e-13, atol=1e-15)
    # the default rule would have replayed this run 1e-2 off (measured 3.7 % on a 4-step run)
    history.meta["recording"].pop("accumulation_weighting")
    wrong, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert float((flat_params(wrong) - flat_params(model)).norm()) > 1e-3 * float(flat_params(model).norm())


def test_accumulation_whose_micro_batches_cannot_be_told_is_refused_unless_allowed():
    data = make_data()
    model, opt, rec = setup()
    opt.zero_grad()
    x, y = data[torch.arange(16)]
    out = model(x)  # one forward, two backward passes: the micro-batches cannot be told
    (LOSS(out[:8], y[:8]) / 2).backward(retain_graph=True)
    (LOSS(out[8:], y[8:]) / 2).backward()
    with pytest.raises(ValueError, match="2 backward passes \\(gradient accumulation\\)"):
        rec.record(torch.arange(16))
    model, opt, rec = setup(allow=("accumulation",))
    for t in range(2):
        opt.zero_grad()
        for half in (torch.arange(8), torch.arange(8, 16)):  # two halves, each a mean / 2: the mean of the 16
            x, y = data[half + 16 * t]
            (LOSS(model(x), y) / 2).backward()
        rec.record(torch.arange(16) + 16 * t)
        opt.step()
    history = rec.finish(data, LOSS)
    assert history.meta["recording"] == {"allow": ["accumulation"], "accumulated_steps": 2, "clipped_steps": 0, "autocast_steps": 0,
                                         "eval_modules": []}


def clipped_run(clip, n_steps=12, kind="full", codec=None):
    """SGD with momentum on a small MLP, `clip(model)` between backward and record() every step."""
    data = make_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind=kind, rank=2, codec=codec))
    for t in range(n_steps):
        idx = torch.arange(t * 16, (t + 1) * 16) % len(data)
        opt.zero_grad()
        backward(model, data, idx)
        clip(model, t)
        rec.record(idx)
        opt.step()
    return data, model, rec


def test_norm_clipping_is_recorded_and_replayed_exactly():
    data, model, rec = clipped_run(lambda m, t: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05))
    history = rec.finish(data, LOSS)
    recording = history.meta["recording"]
    assert recording["clip_max_norm"] == 0.05 and recording["clipped_steps"] >= 6  # most steps clip at 0.05
    # forgetting nothing replays the clipped run: the trained weights, bit for bit
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    # forgetting samples equals a hand-written clipped retrain on the retained samples
    forget = torch.tensor([3, 20, 41])
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[forget] = False
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    for t in range(12):
        idx = torch.arange(t * 16, (t + 1) * 16) % len(data)
        idx = idx[keep[idx]]
        opt.zero_grad()
        backward(ref, data, idx)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
    out = uf.unlearn(model, history, forget, data, LOSS, method="retrain").model
    assert torch.equal(flat_params(out), flat_params(ref))
    # the methods that model an unclipped SGD step refuse the history, naming the clipping
    with pytest.raises(ValueError, match="clipped gradient norms at 0.05"):
        uf.unlearn(model, history, forget, data, LOSS, method="deltagrad")


def test_other_gradient_edits_are_refused_and_allow_leaves_clipping_to_the_loss():
    with pytest.raises(ValueError, match="different factors per parameter.*value clipping"):
        clipped_run(lambda m, t: torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3))
    with pytest.raises(ValueError, match="clipped the gradient norm to .* earlier steps to 0.05"):
        clipped_run(lambda m, t: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05 if t < 3 else 0.02))
    # an inactive clip multiplies by exactly 1: nothing is recorded
    data, model, rec = clipped_run(lambda m, t: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e6), n_steps=3)
    assert "clip_max_norm" not in rec.finish(data, LOSS).meta["recording"]
    # allow=("clipping",): the caller's replay loss reproduces it; the recorder only counts the steps
    data = make_data()
    model, opt, rec = setup(allow="clipping")
    opt.zero_grad()
    backward(model, data, torch.arange(16))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    rec.record(torch.arange(16))
    opt.step()
    recording = rec.finish(data, LOSS).meta["recording"]
    assert recording["clipped_steps"] == 1 and "clip_max_norm" not in recording



def test_edits_are_found_off_the_audit_grid_and_edits_the_version_counter_misses_on_it():
    # record() re-measures only gradients changed since backward, unless the step is an audit (recording.AUDIT_EVERY)
    from unlearn_fast.recording import AUDIT_EVERY

    off_grid = AUDIT_EVERY + 3
    with pytest.raises(ValueError, match=f"step {off_grid}'s gradients changed .* value clipping"):
        clipped_run(lambda m, t: t == off_grid and torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3), n_steps=off_grid + 1)
    # an edit through .data bumps no version counter: the audit at step 0 finds it
    with pytest.raises(ValueError, match="step 0's gradients changed .* value clipping"):
        clipped_run(lambda m, t: m[0].weight.grad.data.clamp_(-1e-3, 1e-3))

def test_a_minimal_recorder_reads_unedited_gradients_only_on_audit_steps(monkeypatch):
    import unlearn_fast.recording as recording

    calls = []
    monkeypatch.setattr(recording, "gradient_norm", lambda g, dtype=None: calls.append(1) or torch.linalg.vector_norm(g))
    n_steps = 2 * recording.AUDIT_EVERY + 3  # audits at steps 0, AUDIT_EVERY, 2 AUDIT_EVERY
    data, model, rec = clipped_run(lambda m, t: None, n_steps=n_steps, kind="minimal")
    # each audit: the hooks' norm of the 4 parameters at backward and record()'s again; no other step reads a gradient
    assert len(calls) == 3 * 2 * 4
    # a full fp32 recording measures every step (its rows would keep a non-finite gradient); an int8 one's encoder refuses those
    calls.clear()
    clipped_run(lambda m, t: None, n_steps=n_steps, kind="full")
    assert len(calls) == (n_steps + 3) * 4
    calls.clear()
    clipped_run(lambda m, t: None, n_steps=n_steps, kind="full", codec="int8")
    assert len(calls) == 3 * 2 * 4


def test_a_non_finite_gradient_off_the_audit_grid_is_refused_at_once_by_an_int8_recording():
    from unlearn_fast.recording import AUDIT_EVERY

    # an edit that writes NaN (seen through the version counter)
    with pytest.raises(ValueError, match=f"step {AUDIT_EVERY + 3} has non-finite"):
        clipped_run(lambda m, t: t == AUDIT_EVERY + 3 and m[0].weight.grad.fill_(float("nan")), n_steps=AUDIT_EVERY + 5,
                    kind="full", codec="int8")
    # backward's own inf / nan (an inf input): the encoder refuses the row
    seen = []
    with pytest.raises(ValueError, match=f"step {AUDIT_EVERY + 3} has non-finite .*NaN or Inf.*history not extended"):
        diverging_run(uf.HistoryPolicy(kind="full", codec="int8"), AUDIT_EVERY + 3, AUDIT_EVERY + 5, seen)
    assert seen[0].num_steps == AUDIT_EVERY + 3


def diverging_run(policy, diverge_at, n_steps, seen=None):
    """Logistic regression recorded under `policy`, an inf input at step `diverge_at` (inf / nan gradients, then nan
    weights); the recorder is appended to `seen` as it is made."""
    data = make_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, policy)
    if seen is not None:
        seen.append(rec)
    for t in range(n_steps):
        x, y = data[torch.arange(16)]
        if t == diverge_at:
            x = x.clone()
            x[0, 0] = float("inf")
        opt.zero_grad()
        LOSS(model(x), y).backward()
        rec.record(torch.arange(16))
        opt.step()


@pytest.mark.parametrize("summary_codec", ["int8", "fp32"])  # (int8's encoder refuses inf/nan; fp32 rows are checked)
@pytest.mark.parametrize("diverge_at", [5, 13])  # refused at the checkpoint of step 6, at the audit of step 16
def test_a_divergence_between_audits_is_refused_at_the_next_audit_or_checkpoint(diverge_at, summary_codec):
    from unlearn_fast.recording import AUDIT_EVERY

    grid = CheckpointGrid()  # the steps whose weights the recorder keeps (and checks)
    checkpoints = [t for t in range(AUDIT_EVERY + 1) if grid.offer(t)]
    checks = [t for t in range(diverge_at + 1, AUDIT_EVERY + 1) if t == AUDIT_EVERY or t in checkpoints]
    seen = []
    with pytest.raises(ValueError) as refused:
        diverging_run(uf.HistoryPolicy(kind="minimal", rank=2, summary_codec=summary_codec), diverge_at, AUDIT_EVERY + 1, seen)
    # refused at the first audit or checkpoint after the divergence, naming what it found; that step is not recorded
    assert seen[0].num_steps == checks[0]
    assert re.search(f"step {checks[0]} has non-finite .*may have begun up to {AUDIT_EVERY - 1} steps earlier|"
                     f"step {checks[0]}: the weights hold inf/nan \\(the run diverged", str(refused.value))


def test_an_edit_that_begins_between_audits_is_kept_and_checked_where_the_history_is_used():
    from unlearn_fast.methods._common import clip_max_norm
    from unlearn_fast.recording import AUDIT_EVERY

    start = AUDIT_EVERY + 3  # off the audit grid: the recorder took no norms at that step's backward
    # clipping switched on mid-run: later steps (all measured now) show its threshold, which explains the first
    data, model, rec = clipped_run(lambda m, t: t >= start and torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05),
                                   n_steps=start + 4, kind="minimal")
    history = rec.finish(data, LOSS)
    recording = history.meta["recording"]
    [(step, norm)] = recording["unmeasured_edits"]
    assert step == start and 0 < norm <= 0.05 * (1 + 1e-6) and recording["clip_max_norm"] == 0.05
    assert clip_max_norm(history) == 0.05
    with pytest.raises(ValueError, match="clipped gradient norms at 0.05"):
        uf.unlearn(model, history, [3], data, LOSS, method="mini")
    # a one-off edit no later step explains: recorded, and refused where a replay would need it
    data, model, rec = clipped_run(lambda m, t: t == start and torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3),
                                   n_steps=start + 4, kind="minimal")
    history = rec.finish(data, LOSS)
    with pytest.raises(ValueError, match=f"step {start}'s gradients were edited .* no step of the run showed norm clipping"):
        clip_max_norm(history)
    with pytest.raises(ValueError, match=f"step {start}'s gradients were edited"):
        uf.unlearn(model, history, [3], data, LOSS, method="retrain")
    # the same edit on every step from then on: the next step is measured, and refused as any value clipping
    with pytest.raises(ValueError, match=f"step {start + 1}'s gradients changed .* value clipping"):
        clipped_run(lambda m, t: t >= start and torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3), n_steps=start + 4, kind="minimal")
    # a history file's record of such edits is data: malformed entries are refused, naming it
    history.meta["recording"]["unmeasured_edits"] = [[start, "0.1"]]
    with pytest.raises(ValueError, match="unmeasured_edits'\\] is malformed"):
        clip_max_norm(history)


def autocast_run(under, n_steps=10):
    """float32 MLP, SGD + momentum; forward and loss under bfloat16 autocast on the steps `under(t)` says."""
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 5, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    for t in range(n_steps):
        idx = torch.arange(t * 16, (t + 1) * 16) % 64
        opt.zero_grad()
        x, y = data[idx]
        with torch.autocast("cpu", torch.bfloat16, enabled=under(t)):
            loss = LOSS(model(x), y)
        loss.backward()
        rec.record(idx)
        opt.step()
    return data, model, rec


def test_autocast_is_recorded_and_replayed():
    data, model, rec = autocast_run(lambda t: True)
    history = rec.finish(data, LOSS)
    assert history.meta["recording"]["autocast"] == "bfloat16" and history.meta["recording"]["autocast_steps"] == 10
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    moved = (flat_params(model) - history.schedule["w0"]).norm()
    # the same bf16 forward on the same inputs: the trained weights (measured: 0.0; a float32 replay lands 3e-2 of the movement away)
    assert (flat_params(replay) - flat_params(model)).norm() <= 1e-6 * moved
    with pytest.raises(ValueError, match="autocast \\(bfloat16\\)"):
        uf.unlearn(model, history, [1, 2], data, LOSS, method="deltagrad")
    with pytest.raises(ValueError, match="earlier steps without"):
        autocast_run(lambda t: t >= 3)
    with pytest.raises(ValueError, match="without autocast, earlier steps under bfloat16"):
        autocast_run(lambda t: t < 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_refused_at_construction_naming_the_dtype(dtype):
    model = torch.nn.Linear(5, 3).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"model parameter weight is {dtype}"):
        uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal"))


# ----------------------------------------------------------------------------- loss_fn
def sum_loss(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="sum")


def test_a_summing_loss_fn_is_refused_at_finish_and_at_unlearn():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data)
    with pytest.raises(ValueError, match="loss_fn: gives 16(\\.0*)? times the gradient"):  # the batch has 16 samples
        rec.finish(data, sum_loss)
    history = rec.finish(data, LOSS)  # a refused finish leaves the recorder open
    with pytest.raises(ValueError, match="loss_fn: gives 16(\\.0*)? times the gradient"):
        uf.unlearn(model, history, [0, 1], data, sum_loss, method="retrain")
    assert history.requests == []


def test_a_per_sample_loss_fn_is_refused_naming_loss_fn():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data)
    per_sample = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match="loss_fn: must return the batch's mean loss as a scalar tensor, got \\(16,\\)"):
        rec.finish(data, per_sample)
    history = rec.finish(data, LOSS)
    with pytest.raises(ValueError, match="loss_fn: must return"):
        uf.unlearn(model, history, [0, 1], data, per_sample, method="retrain")
    with pytest.raises(ValueError, match="loss_fn: must return"):  # what the methods compute through: _common.batch_loss
        retrain.run(copy.deepcopy(model), history, torch.tensor([0]), data, per_sample)


# ----------------------------------------------------------------------------- finish
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.drop, self.fc2 = torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def test_finish_right_after_training_a_model_with_dropout_and_batch_norm():
    data = make_data()
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal", rank=2))
    steps(model, opt, rec, data, n_steps=6)
    running = model.norm.running_mean.clone()
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    history = rec.finish(data, LOSS)  # still in training mode, as a training loop leaves it
    assert history.summary is not None and model.training and model.drop.training
    assert torch.equal(model.norm.running_mean, running)  # finish()'s passes leave the statistics alone
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)  # and the dropout RNG stream of the training run
    with pytest.raises(ValueError, match="model: has batch norm .* Use method='retrain'"):
        uf.unlearn(model, history, [0], data, LOSS, method="mini")


def test_deltagrad_refuses_batch_norm_and_retrain_replays_it():
    data = make_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    steps(model, opt, rec, data, n_steps=4)
    history = rec.finish(data, LOSS)
    with pytest.raises(ValueError, match="model: has batch norm"):
        uf.unlearn(model, history, [0], data, LOSS, method="deltagrad")
    assert uf.unlearn(model, history, [0], data, LOSS, method="retrain").stats["steps"] == 4


def test_a_full_history_computes_no_summary_and_a_minimal_one_does(monkeypatch):
    data = make_data()
    calls = []
    real = mini.final_summary
    monkeypatch.setattr(mini, "final_summary", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    model, opt, rec = setup("full")
    steps(model, opt, rec, data)
    history = rec.finish(data, LOSS)
    assert calls == [] and history.summary is None and history.trajectory is not None
    model, opt, rec = setup("minimal")
    steps(model, opt, rec, data)
    history = rec.finish(data, LOSS)
    assert calls == [4] and history.summary is not None and history.trajectory is None


def test_finish_binds_the_history_to_the_final_weights():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data)
    history = rec.finish(data, LOSS)
    assert history.meta["final_digest"] == uf.history.weights_digest(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.bias[0] += 1e-3
    assert uf.history.weights_digest(other) != history.meta["final_digest"]


# ----------------------------------------------------------------------------- forget
def test_forget_none_is_refused_and_a_set_is_taken_sorted():
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data)
    history = rec.finish(data, LOSS)
    with pytest.raises(ValueError, match="forget: must be a 1-D sequence of integer training-set indices, got None"):
        uf.unlearn(model, history, None, data, LOSS, method="retrain")
    with pytest.raises(ValueError, match="forget: must be"):
        uf.unlearn(model, history, {"a": 1}, data, LOSS, method="retrain")
    from_set = uf.unlearn(model, history, {5, 1, 3}, data, LOSS, method="retrain", allow_unrecorded_model=True)
    from_list = uf.unlearn(model, history, [1, 3, 5], data, LOSS, method="retrain", allow_unrecorded_model=True)
    assert torch.equal(flat_params(from_set.model), flat_params(from_list.model))


# ----------------------------------------------------------------------------- uf.data
def test_indexed_dataset_feeds_a_shuffled_loader_and_the_replay_is_exact():
    data = make_data()
    indexed = uf.IndexedDataset(data)
    assert len(indexed) == len(data)
    i, x, y = indexed[7]
    assert i == 7 and torch.equal(x, data[7][0]) and y == data[7][1]
    model, opt, rec = setup()
    loader = torch.utils.data.DataLoader(indexed, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(3))
    seen = []
    for epoch in range(2):
        for batch in loader:
            idx, x, y = uf.split_batch(batch)
            assert torch.equal(x, data.tensors[0][idx]) and torch.equal(y, data.tensors[1][idx])
            opt.zero_grad()
            LOSS(model(x), y).backward()
            rec.record(idx, batch_size=len(x))
            opt.step()
            seen.append(idx)
    assert sorted(torch.cat(seen[:6]).tolist()) == list(range(len(data)))  # one epoch: every sample once, shuffled
    history = rec.finish(data, LOSS)
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))


def test_indexed_dataset_with_a_distributed_sampler_yields_dataset_positions():
    data = make_data(n=20)
    parts = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(uf.IndexedDataset(data), num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = torch.utils.data.DataLoader(uf.IndexedDataset(data), batch_size=4, sampler=sampler)
        for batch in loader:
            idx, x, _ = uf.split_batch(batch)
            assert torch.equal(x, data.tensors[0][idx])
            parts.append(idx)
    assert sorted(torch.cat(parts).tolist()) == list(range(20))


def test_data_helpers_refuse_what_they_cannot_index():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(ValueError, match="dataset: must be a map-style data set"):
        uf.IndexedDataset(Stream())
    with pytest.raises(ValueError, match="batch: expected a collated IndexedDataset batch"):
        uf.split_batch(make_data().tensors)
    with pytest.raises(ValueError, match="batch: its first field must be the int64 indices"):
        uf.split_batch([torch.zeros(3), torch.zeros(3), torch.zeros(3)])


@pytest.mark.parametrize("kind", ["first_epoch", "all_epochs"])
def test_per_sample_kinds_are_refused_naming_the_language_model_recorder(kind):
    model = torch.nn.Linear(5, 3)
    with pytest.raises(ValueError, match="FirstEpochRecorder"):
        uf.HistoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), uf.HistoryPolicy(kind=kind, per_sample=True))


# ----------------------------------------------------------------------------- GradScaler (mixed-precision loss scaling)
def scaler_model():
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 5, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        model[2].weight.mul_(20)  # large logits: gradients above 2, which times 2^127 overflow float32
    return data, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def scaler_run(record_before_unscale=False, clip=None, inject_inf_at=(), n_steps=12, autocast=None, init_scale=2.0**127):
    """float32 MLP, SGD + momentum, the torch.amp loop: scale(loss).backward(), unscale_, [clip], record, step, update.
    The scale starts at 2^127, where some gradients overflow (the scaler skips those steps and backs off), and an inf
    input is injected at the steps `inject_inf_at`. Returns (data, model, recorder, skipped steps)."""
    data, model, opt = scaler_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), grad_scaler=scaler)
    skipped = []
    for t in range(n_steps):
        idx = torch.arange(t * 16, (t + 1) * 16) % 64
        opt.zero_grad()
        x, y = data[idx]
        if t in inject_inf_at:
            x = x.clone()
            x[0, 0] = float("inf")
        with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
            loss = LOSS(model(x), y)
        scaler.scale(loss).backward()
        if record_before_unscale:
            rec.record(idx)
        scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if not rec.record(idx):
            skipped.append(t)
        scaler.step(opt)
        scaler.update()
    return data, model, rec, skipped


@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_grad_scaler_run_records_unscaled_gradients_leaves_out_skipped_steps_and_replays_exactly(clip):
    data, model, rec, skipped = scaler_run(clip=clip, inject_inf_at=(7,))
    assert skipped[-1] == 7 and 1 <= len(skipped) <= 3  # the overflow of the 2^127 scale (measured: step 1) and the injected inf
    history = rec.finish(data, LOSS)
    recording = history.meta["recording"]
    assert recording["grad_scaler"]["skipped_steps"] == len(skipped) and history.num_steps == 12 - len(skipped)
    if clip is not None:  # clipping after unscale_ is recovered from the unscaled gradients
        assert recording["clip_max_norm"] == clip and recording["clipped_steps"] >= 5
    else:
        assert "clip_max_norm" not in recording and recording["clipped_steps"] == 0
    # the recorded gradients are the unscaled ones: the gradient of loss_fn at w0 on step 0's batch (clipped: times the clip factor)
    g0 = uf.methods._common.batch_gradient(model, LOSS, data[torch.arange(16)], history.schedule["w0"])
    if clip is None:
        assert torch.equal(history.trajectory["g"].row(0), g0)
    else:
        assert torch.allclose(history.trajectory["g"].row(0), g0 * (clip / (g0.norm() + 1e-6)), rtol=1e-5, atol=0)
    # forgetting nothing: the trained weights, bit for bit (power-of-two scaling is exact; skipped steps are not replayed)
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    # forgetting 3 samples equals a hand-written retrain without the scaler: the same loop on the steps that ran
    forget = torch.tensor([3, 20, 41])
    out = uf.unlearn(model, history, forget, data, LOSS, method="retrain").model
    assert torch.equal(flat_params(out), flat_params(_retrain_skipping(skipped, clip, forget)))
    # (the overflow steps matter: a retrain that runs them differs)
    assert not torch.equal(flat_params(out), flat_params(_retrain_skipping([7], clip, forget)))


def _retrain_skipping(skipped, clip, forget):
    """scaler_run's loop written out without a scaler, without the steps in `skipped`, on the retained samples."""
    data, model, opt = scaler_model()
    for t in range(12):
        if t in skipped:
            continue
        idx = torch.arange(t * 16, (t + 1) * 16) % 64
        idx = idx[~torch.isin(idx, forget)]
        opt.zero_grad()
        x, y = data[idx]
        LOSS(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_grad_scaler_under_autocast_is_replayed_at_the_recorded_scales(dtype):
    data, model, rec, _ = scaler_run(autocast=dtype, init_scale=2.0**16, inject_inf_at=(3,))
    history = rec.finish(data, LOSS)
    scales = history.meta["recording"]["grad_scaler"]["scales"]
    # a run-length log that backs off by half after each skipped step (the injected inf, and overflows of the 2^16 scale)
    assert scales[0][0] == 0 and len(scales) >= 2 and all(b[1] < a[1] and b[0] > a[0] for a, b in zip(scales, scales[1:]))
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    if dtype == torch.float16:  # an unscaled fp16 backward underflows where training's did not: the scales are needed
        unscaled = copy.deepcopy(history)
        del unscaled.meta["recording"]["grad_scaler"]["scales"]
        replay, _ = retrain.run(copy.deepcopy(model), unscaled, torch.empty(0, dtype=torch.int64), data, LOSS)
        assert not torch.equal(flat_params(replay), flat_params(model))


def test_a_skipped_step_leaves_the_next_record_and_the_step_counting_intact():
    data, model, rec, skipped = scaler_run(inject_inf_at=(2, 3), n_steps=5)
    assert 2 in skipped and 3 in skipped  # two skipped in a row: neither is "recorded twice" nor a step without record()
    history = rec.finish(data, LOSS)
    assert history.num_steps == 5 - len(skipped)
    # the batches of the recorded steps, in order (a skipped step's batch is not replayed)
    assert [int(b[0]) for b in history.schedule["batches"]] == [16 * t % 64 for t in range(5) if t not in skipped]


def test_after_a_skipped_step_an_unrecorded_optimizer_step_is_named_by_the_steps_the_optimizer_took():
    data, model, rec, skipped = scaler_run(inject_inf_at=(1,), n_steps=3, init_scale=2.0**16)
    assert skipped == [1]  # optimizer steps 0 (training step 0) and 1 (training step 2) ran
    x, y = data[torch.arange(16)]
    rec.optimizer.zero_grad()
    LOSS(model(x), y).backward()
    rec.optimizer.step()  # optimizer step 2, not recorded
    with pytest.raises(ValueError, match="optimizer step 2 ran without a record"):
        rec.finish(data, LOSS)


def test_recording_scaled_gradients_is_refused():
    with pytest.raises(ValueError, match="still multiplied by the GradScaler's scale .*call scaler.unscale_\\(optimizer\\) before record"):
        scaler_run(record_before_unscale=True)
    # without grad_scaler=, unscale_ before record() divides every gradient by the scale: named, not taken for clipping
    data = make_data()
    model, opt, rec = setup(model=torch.nn.Linear(5, 3))
    scaler = torch.amp.GradScaler("cpu")
    x, y = data[torch.arange(16)]
    scaler.scale(LOSS(model(x.float()), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(ValueError, match="divided by 2\\^16 .*as a GradScaler's unscale_ does; pass the scaler"):
        rec.record(torch.arange(16))
    # and record() before unscale_ without grad_scaler= records gradients 2^16 too large: finish() names the scale
    data32 = torch.utils.data.TensorDataset(data.tensors[0].float(), data.tensors[1])
    model, opt, rec = setup(model=torch.nn.Linear(5, 3))
    scaler = torch.amp.GradScaler("cpu")
    for t in range(2):
        opt.zero_grad()
        x, y = data32[torch.arange(16) + 16 * t]
        scaler.scale(LOSS(model(x), y)).backward()
        rec.record(torch.arange(16) + 16 * t)
        scaler.step(opt)
        scaler.update()
    with pytest.raises(ValueError, match="recorded gradients are 2\\^16 times loss_fn's.*recorded scaled"):
        rec.finish(data32, LOSS)


def test_non_finite_gradients_without_a_grad_scaler_name_the_cause():
    data = make_data()
    model, opt, rec = setup()
    x, y = data[torch.arange(16)]
    x = x.clone()
    x[0, 0] = float("nan")
    LOSS(model(x), y).backward()
    with pytest.raises(ValueError, match="step 0 has non-finite \\(inf/nan\\) gradients \\(parameter weight: norm nan\\).*grad_scaler=scaler"):
        rec.record(torch.arange(16))
    assert rec.num_steps == 0
    with pytest.raises(ValueError, match="grad_scaler: must be a torch.amp.GradScaler"):
        uf.HistoryRecorder(model, opt, grad_scaler=object())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(0,), (1,), (1_000_003,), (37, 41)])
def test_gradient_norm_matches_a_float64_reference_and_survives_a_sum_of_squares_past_float32(dtype, shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    want = torch.linalg.vector_norm(g.double())
    for t in (g, g.t() if g.dim() == 2 else g):  # (a transposed view takes vector_norm's path)
        got = gradient_norm(t)
        assert got.dtype == dtype and got.dim() == 0
        # float32 sums of 1M squares: 2e-7 relative on MKL's native path, 3e-6 under MKL_CBWR=COMPATIBLE; the bound
        # holds for any summation order of random data (about sqrt(n) eps)
        assert abs(float(got) - float(want)) <= (1e-4 if dtype == torch.float32 else 1e-12) * float(want) + 1e-30
    big = torch.full((64,), 1e20, dtype=torch.float32)  # finite elements whose squares overflow float32
    assert float(gradient_norm(big)) == pytest.approx(8e20, rel=1e-6)
    bad = big.clone()
    bad[3] = float("nan")
    assert torch.isnan(gradient_norm(bad))
    bad[3] = float("inf")
    assert not torch.isfinite(gradient_norm(bad))


def test_norms_are_taken_as_clip_grad_norm_takes_them_only_while_a_clipping_threshold_is_unknown(monkeypatch):
    import unlearn_fast.recording as recording

    fast = []
    monkeypatch.setattr(recording, "gradient_norm", lambda g, dtype=None: fast.append(1) or torch.linalg.vector_norm(g.double()).to(g.dtype))
    torch.manual_seed(0)
    # a million float32 weights: vector_norm's float32 sums and a dot product's differ in the 6th digit here, which a
    # threshold recovered from the faster norm would carry into the replay
    model = torch.nn.Linear(1000, 1000)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="fp32"))
    x, y = torch.randn(8, 1000), torch.randint(0, 1000, (8,))
    for step in range(4):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        if step >= 1:  # clipping from step 1 on, at a threshold below every step's norm
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.0123)
        rec.record(torch.arange(step * 8, step * 8 + 8))
        opt.step()
    assert rec._seen_features["clip_max_norm"] == 0.0123 and rec._seen_features["clipped_steps"] == 3
    # step 1's raw norms came from the faster norm (step 0 had no edit), and the threshold they gave (0.0123025 here)
    # was replaced by step 2's, taken as clip_grad_norm_ takes them; after a step without edits the faster norm runs
    assert len(fast) > 0
    calls = len(fast)
    for step in range(4, 6):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        rec.record(torch.arange(step * 8, step * 8 + 8))
        opt.step()
    assert len(fast) - calls == 2 * 2  # step 5's hooks: weight and bias (step 4 followed an edited step)


# ----------------------------------------------------------------------------- the encoding record() writes
class Awkward(torch.nn.Module):
    """Parameters whose flat ranges straddle codec blocks: tiny ones, odd sizes, one non-contiguous (a transposed view)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 37)  # 259 + 37: across the first 256-block
        self.b = torch.nn.Linear(37, 301)  # long enough to be quantized in place with MIN_DIRECT lowered
        self.c = torch.nn.Parameter(torch.randn(13, 29).t())  # non-contiguous
        self.d = torch.nn.Linear(13, 3)  # ends on an odd total: the int4 last byte holds one code

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.d(h[:, :29] @ self.c) + h[:, :3]


@pytest.mark.parametrize("codec", ["int8", "int4", "bf16", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direct", [1 << 16, 64])
def test_recorded_rows_are_byte_for_byte_the_reference_codec_of_the_flat_vectors(codec, dtype, direct, monkeypatch, tmp_path):
    """record() encodes each parameter where it lies (RowEncoder); the bytes must be the reference's:
    EncodedRows.encode of the flat weights and gradients, as the recorder wrote them before."""
    from unlearn_fast import recording
    from unlearn_fast.history import EncodedRows, flat_grads

    monkeypatch.setattr(recording, "MIN_DIRECT", direct)  # 64: the blocks of b (and c) are quantized in place
    torch.manual_seed(0)
    model = Awkward().to(dtype)
    assert sum(p.numel() for p in model.parameters()) % 2 == 1 and not model.c.is_contiguous()
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40, 7, generator=gen, dtype=dtype), torch.randint(0, 3, (40,), generator=gen))
    histories, expected, weights = [], {"g": []}, []
    for path in (None, str(tmp_path / "h")):
        torch.manual_seed(0)
        model = Awkward().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec=codec, blocksize=64), path=path)
        rec.chunk_steps = 2  # chunks of 2 rows, the last one sealed short
        for t in range(5):
            idx = torch.arange(t * 8, (t + 1) * 8)
            opt.zero_grad()
            backward(model, data, idx)
            if path is None:
                weights.append(flat_params(model).clone())
                expected["g"].append(EncodedRows.encode(flat_grads(model)[None], codec, 64))
            rec.record(idx)
            opt.step()
        history = rec.finish(data, LOSS)
        histories.append(history if path is None else uf.GradientHistory.load(path))
    if direct == 64 and codec in ("int8", "int4"):
        assert any(len(pieces) == 1 and e - s >= 64 for s, e, pieces in rec._encoder.ranges)  # (the in-place path ran)
    for history in histories:
        assert set(history.trajectory) == {"g"}
        if codec == "fp32":  # w_t rebuilt by momentum SGD from w0 and the rows: the run's, bit for bit
            rebuilt = weights_at(history, range(5))
            assert all(torch.equal(rebuilt[t], weights[t]) for t in range(5))
        for key in ("g",):
            rows = history.trajectory[key]
            got = EncodedRows.cat([rows._part(j) for j in range(len(rows.parts))])
            want = EncodedRows.cat(expected[key])
            assert got.tensors.keys() == want.tensors.keys()
            for name in want.tensors:
                assert got.tensors[name].dtype == want.tensors[name].dtype
                assert torch.equal(got.tensors[name].view(torch.uint8), want.tensors[name].view(torch.uint8)), (key, name)


def test_a_disabled_grad_scaler_is_no_scaler_and_resume_refuses_one(tmp_path):
    data, model, opt = scaler_model()
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # scale() and unscale_ do nothing: record() reads no scaler state
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=str(tmp_path / "h"), grad_scaler=scaler)
    assert rec.grad_scaler is None
    x, y = data[torch.arange(16)]
    scaler.scale(LOSS(model(x), y)).backward()
    assert rec.record(torch.arange(16)) is True
    scaler.step(opt)
    scaler.update()
    rec.flush()
    rec.close()
    with pytest.raises(ValueError, match="grad_scaler: a recording with loss scaling cannot be resumed"):
        uf.HistoryRecorder.resume(str(tmp_path / "h"), model, opt, grad_scaler=torch.amp.GradScaler("cpu"))
    rec = uf.HistoryRecorder.resume(str(tmp_path / "h"), model, opt)  # without one it continues
    assert rec.num_steps == 1
    rec.close()


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_a_nan_gradient_is_refused_by_name_and_the_recorded_steps_stay(codec):
    model = torch.nn.Sequential(torch.nn.Linear(300, 20), torch.nn.Linear(20, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec=codec))
    x, y = torch.randn(8, 300), torch.randint(0, 3, (8,))
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == 2:
            model[0].weight.grad[5, 250] = float("nan")  # flat element 5 * 300 + 250 = 1750
        if step < 2:
            rec.record(torch.arange(8))
            opt.step()
    with pytest.raises(ValueError, match=r"step 2 has non-finite .* 0\.weight"):
        rec.record(torch.arange(8))
    assert rec.num_steps == 2
    # the encoder's own check (a gradient changed after the norm hooks read it) names the elements
    with pytest.raises(ValueError, match=r"NaN or Inf \(in elements 1536\.\.1791"):
        rec._encoder.encode_into([p.grad for p in model.parameters()], rec._encoder.buffers(1), 0)


# ----------------------------------------------------------------------------- torch.compile
def test_a_compiled_model_records_and_unlearns_as_its_eager_module():
    data = make_data(n=96)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    init = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")  # (AOTAutograd's backward, no C++ toolchain needed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rec = uf.HistoryRecorder(compiled, opt, uf.HistoryPolicy(kind="full"))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randperm(96, generator=gen)[:16] for _ in range(8)]
    for t, idx in enumerate(batches):
        opt.zero_grad()
        x, y = data[idx]
        if t % 3 == 2:  # gradient accumulation: two micro-batches through the compiled module
            for half in (slice(0, 10), slice(10, 16)):
                (LOSS(compiled(x[half]), y[half]) / 2).backward()
        else:
            LOSS(compiled(x), y).backward()
        rec.record(idx, batch_size=16)
        opt.step()
    history = rec.finish(data, LOSS)
    assert [name for name, _, _ in history.meta["param_spec"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    forget = torch.unique(torch.cat(batches))[::7]
    assert history.meta["recording"]["accumulated_steps"] == 2  # (steps 2 and 5: micro-batches seen through the compiled call)
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.allclose(flat_params(replay), flat_params(model), rtol=1e-12, atol=1e-14)  # (compiled and eager kernels may round apart)
    results = [uf.unlearn(m, history, forget, data, LOSS, method="retrain").model for m in (compiled, model)]
    assert all(isinstance(r, torch.nn.Sequential) for r in results)  # the eager module, unlearned
    assert torch.equal(flat_params(results[0]), flat_params(results[1]))
    # against a hand-written retrain of the eager module on the retained samples of each (micro-)batch
    keep = torch.ones(96, dtype=torch.bool)
    keep[forget] = False
    ref = copy.deepcopy(init)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    for t, idx in enumerate(batches):
        opt.zero_grad()
        parts = [idx[:10], idx[10:]] if t % 3 == 2 else [idx]
        for part in parts:
            part = part[keep[part]]
            if part.numel():
                x, y = data[part]
                (LOSS(ref(x), y) / len(parts)).backward()
        opt.step()
    assert torch.allclose(flat_params(results[0]), flat_params(ref), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(flat_params(ref), flat_params(model), atol=1e-3)  # the request moved the model


# ----------------------------------------------------------------------------- schedules of settings other than lr
def one_cycle_run(optimizer, forget=(), cycle_momentum=True, policy=None, path=None, n_steps=8):
    """Train a linear model with OneCycleLR (recorded unless `forget` is given: then a hand-written retrain leaving the
    `forget` samples out of every batch, the scheduler stepping as in training)."""
    data = make_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    opt = optimizer(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=n_steps, cycle_momentum=cycle_momentum)
    rec = None if forget else uf.HistoryRecorder(model, opt, policy or uf.HistoryPolicy(kind="full"), path=path)
    for t in range(n_steps):
        idx = torch.arange(t * 8, t * 8 + 8)
        idx = idx[~torch.isin(idx, torch.as_tensor(forget, dtype=torch.int64))]
        opt.zero_grad()
        backward(model, data, idx)
        if rec is not None:
            rec.record(idx)
        opt.step()
        sched.step()
    return data, model, rec


SGD_MOMENTUM = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)  # noqa: E731
ADAMW = lambda params: torch.optim.AdamW(params, lr=0.1)  # noqa: E731


@pytest.mark.parametrize("optimizer", [SGD_MOMENTUM, ADAMW], ids=["sgd_momentum", "adamw_beta1"])
@pytest.mark.parametrize("where", ["memory", "saved", "streamed"])
def test_a_scheduler_cycling_momentum_is_replayed_by_retrain_rewind_and_deltagrad(optimizer, where, tmp_path):
    # before 2026-12-05 the replay kept the momentum recorded at the start: 14 % off the trained weights (measured),
    # then record() refused such a run; OneCycleLR and CyclicLR cycle it by default
    data, model, rec = one_cycle_run(optimizer, path=str(tmp_path / "stream") if where == "streamed" else None)
    history = rec.finish(data, LOSS)
    if where == "saved":
        history = uf.GradientHistory.load(history.save(str(tmp_path / "saved")))
    momenta = history.schedule["momenta"]
    assert momenta.shape == (8, 1) and len(set(momenta[:, 0].tolist())) >= 4  # (beta1 for AdamW) it changed every step
    nothing = torch.empty(0, dtype=torch.int64)
    replay, _ = retrain.run(copy.deepcopy(model), history, nothing, data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    rewound = uf.unlearn(model, history, nothing, data, LOSS, method="rewind", steps=5).model  # from step 3, with the run's momentum state
    assert torch.equal(flat_params(rewound), flat_params(model))
    forget = [1, 9, 10, 30]
    _, truth, _ = one_cycle_run(optimizer, forget=forget)
    result = uf.unlearn(model, history, forget, data, LOSS, method="retrain").model
    torch.testing.assert_close(flat_params(result), flat_params(truth), rtol=1e-12, atol=1e-12)
    if optimizer is SGD_MOMENTUM:  # deltagrad keeps its own velocity at the recorded momentum of every step
        every_step = uf.unlearn(model, history, forget, data, LOSS, method="deltagrad", T0=1, j0=0).model
        torch.testing.assert_close(flat_params(every_step), flat_params(truth), rtol=1e-10, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="deltagrad: needs torch.optim.SGD"):
            uf.unlearn(model, history, forget, data, LOSS, method="deltagrad")
        with pytest.raises(ValueError, match="mini: models SGD training"):
            uf.unlearn(model, history, forget, data, LOSS, method="mini")


def test_a_momentum_that_stays_is_not_stored_and_other_settings_that_change_are_refused():
    data, model, rec = one_cycle_run(SGD_MOMENTUM, cycle_momentum=False)
    history = rec.finish(data, LOSS)
    assert "momenta" not in history.schedule and len(set(history.schedule["lrs"][:, 0].tolist())) == 8
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    model, opt, rec = setup()
    steps(model, opt, rec, data, n_steps=2)
    opt.param_groups[0]["weight_decay"] = 0.01
    with pytest.raises(ValueError, match=r"step 2: optimizer parameter group 0's weight_decay is 0\.01, 0 when recording began"):
        steps(model, opt, rec, data, n_steps=1)
    assert rec.num_steps == 2


def test_a_stored_momentum_schedule_is_checked_as_data_from_a_file():
    data, model, rec = one_cycle_run(SGD_MOMENTUM)
    history = rec.finish(data, LOSS)
    meta, sched = history.meta, history.schedule
    arrays = {"schedule.w0": sched["w0"], "schedule.lrs": sched["lrs"], "schedule.batch_sizes": sched["batch_sizes"],
              "schedule.batch_indices": torch.cat(sched["batches"])}
    good = uf.GradientHistory._from_arrays(meta, {}, dict(arrays, **{"schedule.momenta": sched["momenta"]}), "'h'")
    assert torch.equal(good.schedule["momenta"], sched["momenta"])
    for bad in (sched["momenta"][:5], -sched["momenta"], sched["momenta"] * float("nan"), sched["momenta"].float()):
        with pytest.raises(ValueError, match="schedule.momenta"):
            uf.GradientHistory._from_arrays(meta, {}, dict(arrays, **{"schedule.momenta": bad}), "'h'")


def test_mini_refuses_parameter_groups_whose_learning_rates_change_apart():
    # one ratio between the groups' rates is modelled (tests/test_mini.py); until 2026-12-05 Mini read the first group's
    # rate for every group, and until 2026-12-06 it refused any groups at different rates
    data = make_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters()}], lr=0.02)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal"))
    steps(model, opt, rec, data, n_steps=4)
    opt.param_groups[0]["lr"] = 0.1  # the first group's rate halved, the second's kept
    steps(model, opt, rec, data, n_steps=4)
    history = rec.finish(data, LOSS)
    with pytest.raises(ValueError, match=r"mini: models parameter groups whose learning rates keep one ratio to the first group's; "
                                         r"the recorded groups trained at \[0\.2, 0\.02\] at step 0 and \[0\.1, 0\.02\] at step 4"):
        uf.unlearn(model, history, torch.tensor([1, 2]), data, LOSS, method="mini")


class TwoHeads(torch.nn.Module):
    """A linear model with a second head that some batches do not use (a routing of the batch's own): a parameter
    without gradient on a step is not a frozen one."""

    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(5, 3).double(), torch.nn.Linear(5, 3).double()

    def forward(self, x):
        return self.body(x) + self.head(x) if float(x[0, 0]) > 0 else self.body(x)


@pytest.mark.parametrize("change", ["freeze", "thaw", "freeze_after"])
def test_a_parameter_frozen_or_thawed_mid_run_is_refused_by_name_and_an_unused_one_is_not(change):
    data = make_data()
    torch.manual_seed(0)
    model = TwoHeads()
    if change == "thaw":
        model.head.bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    unused = 0
    for t in range(6):
        if change == "freeze" and t == 3:
            model.head.weight.requires_grad_(False)
        if change == "thaw" and t == 3:
            model.head.bias.requires_grad_(True)
        idx = torch.arange(t * 8, t * 8 + 8)
        opt.zero_grad()
        backward(model, data, idx)
        if change in ("freeze", "thaw") and t == 3:
            who = "'head.weight' was trainable when recording began" if change == "freeze" else "'head.bias' was frozen when recording began"
            with pytest.raises(ValueError, match=f"record: step 3: parameter {who}"):
                rec.record(idx)
            assert rec.num_steps == 3
            return
        unused += model.head.weight.grad is None
        rec.record(idx)
        opt.step()
    assert 0 < unused < 6  # the head had no gradient on some steps (accepted)
    model.head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="finish: recorded parameter 'head.weight' is frozen in model"):
        rec.finish(data, LOSS)
    model.head.weight.requires_grad_(True)
    history = rec.finish(data, LOSS)
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))  # the unused head's steps replayed as trained
    model.head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="history: recorded parameter 'head.weight' is frozen in model"):
        uf.unlearn(model, history, [0], data, LOSS, method="retrain")


def test_a_minimal_history_keeps_a_cycled_momentum_through_save(tmp_path):
    data, model, rec = one_cycle_run(SGD_MOMENTUM, policy=uf.HistoryPolicy(kind="minimal", rank=2))
    history = rec.finish(data, LOSS)
    loaded = uf.GradientHistory.load(history.save(str(tmp_path / "h")))
    assert torch.equal(loaded.schedule["momenta"], history.schedule["momenta"]) and history.schedule["momenta"].shape == (8, 1)
    # what Mini reads from it (each step's momentum, tests/test_mini.py) survives the round trip
    assert torch.equal(mini.sgd_settings(loaded.meta, "mini", loaded.schedule["lrs"], loaded.schedule["momenta"])[1].beta,
                       mini.sgd_settings(history.meta, "mini", history.schedule["lrs"], history.schedule["momenta"])[1].beta)


class Middle(torch.nn.Module):
    """5 -> 16 -> 3 with a layer between: Dropout(0.3) as .drop, or BatchNorm1d as .norm."""

    def __init__(self, layer="dropout"):
        super().__init__()
        self.hidden = torch.nn.Linear(5, 16)
        self.layer = "drop" if layer == "dropout" else "norm"
        setattr(self, self.layer, torch.nn.Dropout(0.3) if layer == "dropout" else torch.nn.BatchNorm1d(16))
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.tanh(getattr(self, self.layer)(self.hidden(x))))


def dropout_run(kind="full", path=None, micro=1, n_steps=8):
    data = make_data()
    torch.manual_seed(0)
    model = Middle("dropout").double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind=kind, rank=2), path=path)
    for t in range(n_steps):
        idx = torch.arange(t * 8, t * 8 + 8)
        opt.zero_grad()
        torch.rand(3)  # the loop draws other random numbers between steps (a sampler, augmentation): not replayed
        for part in torch.chunk(idx, micro):
            x, y = data[part]
            (LOSS(model(x), y) / micro).backward()
        rec.record(idx)
        opt.step()
    return data, model, rec


@pytest.mark.parametrize("where", ["memory", "saved", "streamed", "accumulated"])
def test_dropout_masks_are_replayed_from_each_steps_recorded_generator_state(where, tmp_path):
    # retrain forgetting nothing drew other masks until 2026-12-05: 6-7 % off the trained weights, silently
    data, model, rec = dropout_run(path=str(tmp_path / "s") if where == "streamed" else None, micro=2 if where == "accumulated" else 1)
    history = rec.finish(data, LOSS)
    if where == "saved":
        history = uf.GradientHistory.load(history.save(str(tmp_path / "h")))
    assert history.schedule["rng_states"].shape == (8, torch.get_rng_state().numel())
    caller = torch.get_rng_state()
    nothing = torch.empty(0, dtype=torch.int64)
    replay, _ = retrain.run(copy.deepcopy(model), history, nothing, data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    rewound = uf.unlearn(model, history, nothing, data, LOSS, method="rewind", steps=5).model
    assert torch.equal(flat_params(rewound), flat_params(model))
    assert torch.equal(torch.get_rng_state(), caller)  # the caller's random stream is left as it was
    # without the states the replay is another dropout draw: far from the trained weights by comparison
    history.schedule.pop("rng_states")
    other, _ = retrain.run(copy.deepcopy(model), history, nothing, data, LOSS)
    assert float(torch.linalg.vector_norm(flat_params(other) - flat_params(model))) > 1e-3 * float(torch.linalg.vector_norm(flat_params(model)))


def test_recorded_generator_states_are_checked_as_data_from_a_file_and_minimal_histories_keep_none():
    data, model, rec = dropout_run()
    history = rec.finish(data, LOSS)
    sched = history.schedule
    arrays = {"schedule.w0": sched["w0"], "schedule.lrs": sched["lrs"], "schedule.batch_sizes": sched["batch_sizes"],
              "schedule.batch_indices": torch.cat(sched["batches"])}
    for bad in (sched["rng_states"][:3], sched["rng_states"].to(torch.int16), sched["rng_states"][0]):
        with pytest.raises(ValueError, match="schedule.rng_states"):
            uf.GradientHistory._from_arrays(history.meta, {}, dict(arrays, **{"schedule.rng_states": bad}), "'h'")
    crafted = sched["rng_states"].clone()
    crafted[2, 8:12] = 255  # the generator's position field out of range: torch refuses the state
    history.schedule["rng_states"] = crafted
    with pytest.raises(ValueError, match="schedule.rng_states row 2 is not a cpu generator state"):
        retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    data, model, rec = dropout_run(kind="minimal")
    assert "rng_states" not in rec.finish(data, LOSS).schedule  # (its replay draws batches of its own)


SMOOTHED = lambda out, y: LOSS(out, y, label_smoothing=0.01)  # noqa: E731
WEIGHTED = lambda out, y: LOSS(out, y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=out.dtype))  # noqa: E731


@pytest.mark.parametrize("training", ["label smoothing 0.01", "class weights", "inputs scaled by 1.01", "an L2 term 1e-4 |w|^2", "augmentation"])
def test_a_loss_fn_or_train_set_that_does_not_reproduce_training_is_refused_at_finish(training):
    # each was accepted until 2026-12-05 (the check compared the total gradient norm within a factor 1.5) and replayed
    # 0.5-20 % off the trained weights, silently
    data = make_data()
    X, y = data.tensors
    loss_fn = {"label smoothing 0.01": SMOOTHED, "class weights": WEIGHTED}.get(training, LOSS)

    def train(allow=()):
        model, opt, rec = setup(kind="minimal" if training == "augmentation" else "full", allow=allow)
        gen = torch.Generator().manual_seed(1)
        for t in range(4):
            idx = torch.arange(t * 16, t * 16 + 16)
            x = X[idx] * (1.01 if training == "inputs scaled by 1.01" else 1.0)
            if training == "augmentation":
                x = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
            opt.zero_grad()
            loss = loss_fn(model(x), y[idx])
            if training.startswith("an L2 term"):
                loss = loss + 1e-4 * sum((p ** 2).sum() for p in model.parameters())
            loss.backward()
            rec.record(idx)
            opt.step()
        return model, rec

    model, rec = train()
    with pytest.raises(ValueError, match=r"finish: loss_fn on train_set does not reproduce step 0's gradient: parameter (weight|bias)'s"):
        rec.finish(data, LOSS)
    if loss_fn is not LOSS:  # the recorder is still open: finish with the loss training minimised
        history = rec.finish(data, loss_fn)
        replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, loss_fn)
        assert torch.equal(flat_params(replay), flat_params(model))
    if training == "augmentation":  # declared: recorded (the replay draws augmentations of its own)
        assert train(allow=("augmentation",))[1].finish(data, LOSS).num_steps == 4


@pytest.mark.parametrize("edit", ["clamp_ under no_grad", "renorm through .data", "a new .data", "init after the recorder"])
def test_parameters_changed_outside_the_optimizers_steps_are_refused_by_name(edit):
    # weight constraints applied after step() were accepted until 2026-12-05 and replayed 18-24 % off, silently
    data = make_data()
    model, opt, rec = setup()
    if edit == "init after the recorder":
        torch.nn.init.zeros_(model.bias)
    for t in range(3):
        idx = torch.arange(t * 16, t * 16 + 16)
        opt.zero_grad()
        backward(model, data, idx)
        if edit == "init after the recorder" or t == 1:
            when = "between HistoryRecorder\\(\\) and the first step" if edit == "init after the recorder" else "after optimizer step 0"
            with pytest.raises(ValueError, match=f"record: parameter '(weight|bias)' changed {when}"):
                rec.record(idx)
            assert rec.num_steps == t
            return
        rec.record(idx)
        opt.step()
        if edit == "clamp_ under no_grad":
            with torch.no_grad():
                model.weight.clamp_(-0.1, 0.1)
        elif edit == "renorm through .data":  # (bumps no version counter: found by the norms taken before steps 1, 2, 4, ...)
            model.weight.data.copy_(torch.renorm(model.weight.data, 2, 0, 0.1))
        elif edit == "a new .data":
            model.weight.data = model.weight.data * 0.5


def test_an_optimizer_whose_step_needs_a_closure_is_refused():
    model = torch.nn.Linear(5, 3).double()
    with pytest.raises(ValueError, match="HistoryRecorder: LBFGS.step needs a closure"):
        uf.HistoryRecorder(model, torch.optim.LBFGS(model.parameters()))


def test_a_sampler_with_replacement_is_recorded_when_declared_and_its_replay_trains_on_every_copy():
    data = make_data()
    weights = torch.linspace(0.2, 1.0, len(data), dtype=torch.float64)  # class-balancing style: repeats within a batch
    sampler = list(torch.utils.data.WeightedRandomSampler(weights, 64, replacement=True, generator=torch.Generator().manual_seed(0)))
    batches = [torch.tensor(sampler[t * 16 : t * 16 + 16]) for t in range(4)]
    assert any(len(set(b.tolist())) < 16 for b in batches)
    model, opt, rec = setup()
    opt.zero_grad()
    backward(model, data, batches[0])
    with pytest.raises(ValueError, match=r"repeats .* allow=\('repeated_samples',\)"):
        rec.record(batches[0])
    model, opt, rec = setup(allow=("repeated_samples",))
    for idx in batches:
        opt.zero_grad()
        backward(model, data, idx)
        rec.record(idx)
        opt.step()
    history = rec.finish(data, LOSS)
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    # forgetting a repeated sample removes every copy, as a retrain without it would
    twice = next(int(v) for b in batches for v, c in zip(*torch.unique(b, return_counts=True)) if c > 1)
    torch.manual_seed(0)  # (setup's initial weights)
    reference = torch.nn.Linear(5, 3).double()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for idx in batches:
        kept = idx[idx != twice]
        ref_opt.zero_grad()
        backward(reference, data, kept)
        ref_opt.step()
    result = uf.unlearn(model, history, [twice], data, LOSS, method="retrain").model
    torch.testing.assert_close(flat_params(result), flat_params(reference), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("given", ["a permuted train_set", "inputs scaled by 1.01", "label smoothing 0.01"])
def test_uf_unlearn_refuses_a_train_set_or_loss_fn_other_than_finishes(given, tmp_path):
    # accepted until 2026-12-05 (a norm ratio within 1.5): retrain then landed 0.6-2.0 gaps from the true retrain, silently
    data = make_data()
    model, opt, rec = setup()
    steps(model, opt, rec, data, n_steps=4)
    history = uf.GradientHistory.load(rec.finish(data, LOSS).save(str(tmp_path / "h")))
    X, y = data.tensors
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    other, loss_fn = {"a permuted train_set": (torch.utils.data.TensorDataset(X[perm], y[perm]), LOSS),
                      "inputs scaled by 1.01": (torch.utils.data.TensorDataset(X * 1.01, y), LOSS),
                      "label smoothing 0.01": (data, SMOOTHED)}[given]
    with pytest.raises(ValueError, match=r"loss_fn / train_set: on the batch of recorded step 3 at the trained weights, parameter (weight|bias)'s"):
        uf.unlearn(model, history, [1, 2], other, loss_fn, method="retrain")
    assert uf.unlearn(model, history, [1, 2], data, LOSS, method="retrain").stats["forgotten_total"] == 2


def test_the_loss_check_draws_the_same_dropout_masks_at_finish_and_at_unlearn():
    data, model, rec = dropout_run(kind="minimal")
    history = rec.finish(data, LOSS)
    for _ in range(3):  # whatever the caller's random state, the check's masks are the same
        torch.rand(7)
        assert uf.unlearn(model, history, [1], data, LOSS, method="retrain").stats["forgotten_total"] == 1


def test_deltagrad_refuses_a_model_with_dropout_and_retrain_replays_it():
    data, model, rec = dropout_run()
    history = rec.finish(data, LOSS)
    with pytest.raises(ValueError, match=r"model: has dropout \(drop: p=0.3\); deltagrad compares"):
        uf.unlearn(model, history, [1], data, LOSS, method="deltagrad")
    assert uf.unlearn(model, history, [1], data, LOSS, method="retrain").stats["forgotten_total"] == 1


def test_a_scheduler_stepped_between_record_and_the_optimizer_step_is_refused():
    # accepted until 2026-12-05: the history held the lr record() read, the step ran at the next one (replay 0.8 % off)
    data = make_data()
    model, opt, rec = setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    opt.zero_grad()
    backward(model, data, torch.arange(16))
    rec.record(torch.arange(16))
    sched.step()
    with pytest.raises(ValueError, match=r"optimizer.step\(\): the learning rates \[0.05\] .* not those record\(\) read for step 0: \[0.1\]"):
        opt.step()


@pytest.mark.parametrize("where", ["memory", "saved", "streamed"])
def test_a_replay_starts_from_the_recorded_buffers_not_the_trained_models(where, tmp_path):
    # until 2026-12-05 retrain began from the trained model's running statistics: they went on from there (32 batches
    # tracked for 16 steps, eval outputs 0.056 off) and carried the forgotten samples into the unlearned model
    data = make_data()
    torch.manual_seed(0)
    model = Middle("batch norm").double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=str(tmp_path / "s") if where == "streamed" else None)
    steps(model, opt, rec, data, n_steps=6)
    history = rec.finish(data, LOSS)
    if where == "saved":
        history = uf.GradientHistory.load(history.save(str(tmp_path / "h")))
    assert set(history.schedule["buffers0"]) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert all(torch.equal(a, b) for a, b in zip(replay.state_dict().values(), model.state_dict().values()))
    forget = torch.tensor([0, 17, 40])
    torch.manual_seed(0)
    truth = Middle("batch norm").double()  # a hand-written retrain from the same start without the forgotten samples
    truth_opt = torch.optim.SGD(truth.parameters(), lr=0.1)
    for t in range(6):
        idx = torch.arange(t * 16, t * 16 + 16) % len(data)
        idx = idx[~torch.isin(idx, forget)]
        truth_opt.zero_grad()
        backward(truth, data, idx)
        truth_opt.step()
    for method, options in (("retrain", {}), ("rewind", {"steps": 6})):
        result = uf.unlearn(model, history, forget, data, LOSS, method=method, **options).model
        for (name, a), b in zip(result.state_dict().items(), truth.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("layer", ["batch norm", "dropout"])
@pytest.mark.parametrize("modes", ["trained in train mode, unlearned from eval mode", "trained in eval mode", "its norm frozen in eval mode"])
def test_the_replay_runs_each_module_in_the_mode_training_ran_it_in(layer, modes):
    # until 2026-12-05 the replay ran in the modes of the model it was given: a model.eval() before uf.unlearn replayed
    # a train-mode run in eval mode (2-5 % off, silently), and finish() refused eval-mode training with batch norm
    data = make_data()
    torch.manual_seed(0)
    model = Middle(layer).double()
    frozen = model.norm if layer == "batch norm" else model.drop
    if modes == "trained in eval mode":
        model.eval()
    elif modes.startswith("its norm frozen"):
        frozen.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    steps(model, opt, rec, data, n_steps=6)
    history = rec.finish(data, LOSS)
    expected = {"trained in eval mode": [name for name, _ in model.named_modules()], "its norm frozen in eval mode": ["norm" if layer == "batch norm" else "drop"]}
    assert history.meta["recording"]["eval_modules"] == expected.get(modes, [])
    given = copy.deepcopy(model).eval() if modes.startswith("trained in train mode") else copy.deepcopy(model)
    caller_modes = [m.training for m in given.modules()]
    replay, _ = retrain.run(given, history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
    assert [m.training for m in replay.modules()] == caller_modes  # the caller's modes, restored


def test_a_mode_that_changes_between_steps_is_refused():
    data = make_data()
    torch.manual_seed(0)
    model = Middle("batch norm").double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    steps(model, opt, rec, data, n_steps=2)
    model.norm.eval()  # freezing batch norm's statistics mid-run
    with pytest.raises(ValueError, match="record: step 2: module 'norm' is in eval mode, train mode on the steps before"):
        steps(model, opt, rec, data, n_steps=1)
    assert rec.num_steps == 2


class Checkpointed(torch.nn.Module):
    """Middle's dropout layer inside an activation-checkpointed segment (recomputed during backward)."""

    def __init__(self):
        super().__init__()
        self.inner = Middle("dropout")

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def test_an_activation_checkpointed_model_with_dropout_is_checked_and_replayed_exactly():
    # finish()'s recomputation of step 0 ran through torch.func.functional_call until 2026-12-05, whose weights were put
    # back before the checkpoint's recompute: 7.6e-4 off, refused although the replay is exact
    data = make_data()
    torch.manual_seed(0)
    model = Checkpointed().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    steps(model, opt, rec, data, n_steps=5)
    history = rec.finish(data, LOSS)
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))
