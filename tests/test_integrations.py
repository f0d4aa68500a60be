"""transformers.Trainer integration: a real Trainer trains a tiny GPT-2 on CPU; method="retrain" forgetting
nothing must land on the Trainer's weights, and forgetting samples on a hand-written Trainer-style loop."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import unlearn_fast as uf  # noqa: E402
from unlearn_fast.history import GradientHistory, flat_params, set_flat_params  # noqa: E402
from unlearn_fast.integrations import distributed, hf  # noqa: E402
from unlearn_fast.methods import retrain, trajectory  # noqa: E402
from dist_setup import spawn_as_torchrun  # noqa: E402  (tests/ is on sys.path)

N, BATCH = 48, 4
BF16_TIGHT = 5e-6  # a replay under bfloat16 autocast of a DDP run in one process (host-dependent rounding: see its test)
TIGHT = 1e-6  # SGD: the replay differs from the Trainer by float rounding only (other padding and summation order)


def _texts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 256, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g) for _ in range(N)]


class _Texts(torch.utils.data.Dataset):
    def __init__(self):
        self.texts = _texts()

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"input_ids": self.texts[i]}


def _collate(features):
    """Right-padded causal-LM batches: labels are the inputs, -100 on padding."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = f["input_ids"], 1, f["input_ids"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _model(dropout=0.0):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config)


def _trainer(tmp, model=None, **args):
    options = dict(output_dir=str(tmp), per_device_train_batch_size=BATCH, num_train_epochs=1, use_cpu=True, report_to=[],
                   remove_unused_columns=False, save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True)
    options.update(args)
    return transformers.Trainer(model=model if model is not None else _model(), args=transformers.TrainingArguments(**options),
                                train_dataset=_Texts(), data_collator=_collate)


CONFIGS = {  # name -> TrainingArguments (SGD: no optimizer amplification of rounding, see test_adamw_defaults)
    "plain": dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0),
    "accumulation 2": dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0, gradient_accumulation_steps=2),
    "accumulation 2 + max_grad_norm 0.2": dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.2, gradient_accumulation_steps=2),
}
_RUNS = {}


def _run(name, tmp_path_factory):
    """One recorded Trainer run per configuration, shared by the tests of this module."""
    if name not in _RUNS:
        trainer = _trainer(tmp_path_factory.mktemp("run"), **CONFIGS[name])
        cb = hf.record(trainer, uf.HistoryPolicy(kind="full"))
        trainer.train()
        _RUNS[name] = (name, trainer, cb, cb.finish())
    return _RUNS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def trained(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory)


def _replay(model, history, train_set, loss_fn, forget=()):
    replayed, _ = retrain.run(copy.deepcopy(model), history, torch.tensor(forget, dtype=torch.int64), train_set, loss_fn)
    return replayed


def _max_dw(a, b):
    return float((flat_params(a) - flat_params(b)).abs().max())


def test_retrain_forgetting_nothing_reproduces_the_trainer(trained):
    name, trainer, cb, history = trained
    model = trainer.model
    dw = _max_dw(_replay(model, history, cb.replay_set, cb.replay_loss), model)
    moved = float((flat_params(model) - history.schedule["w0"]).abs().max())
    assert dw < TIGHT < moved / 1000, (name, dw, moved)
    # the two things that made the replay miss before (tests/test_integrations.py measures them; docs/integrations.md):
    # dividing by the predicted positions instead of the Trainer's label count, and not clipping
    if cb.max_grad_norm > 0:
        assert history.meta["recording"]["clip_max_norm"] == cb.max_grad_norm
        unclipped = GradientHistory(dict(history.meta, recording={}), history.schedule, history.trajectory, history.summary)
        assert _max_dw(_replay(model, unclipped, cb.replay_set, cb.replay_loss), model) > 100 * TIGHT
    else:  # (a clipped step does not depend on the loss's scale: every step clips here)
        other = "shifted" if cb.count == "all" else "all"
        assert _max_dw(_replay(model, history, cb.replay_set, hf.TrainerLoss(other)), model) > 100 * TIGHT


def test_steps_hold_every_micro_batch(trained):
    name, trainer, cb, history = trained
    batches = history.schedule["batches"]
    per_step = BATCH * trainer.args.gradient_accumulation_steps
    assert len(batches) == N // per_step and all(len(b) == per_step for b in batches), name
    assert sorted(torch.cat(batches).tolist()) == list(range(N))  # one epoch: every sample once
    import accelerate.optimizer

    assert isinstance(trainer.optimizer, accelerate.optimizer.AcceleratedOptimizer)  # what callbacks are handed
    assert history.meta["optimizer"]["class"] == "torch.optim.sgd.SGD"  # the torch optimizer inside it
    assert history.meta["hf_trainer"]["gradient_accumulation_steps"] == trainer.args.gradient_accumulation_steps


def _trainer_style_retrain(history, forget, max_grad_norm):
    """Independent reference: the Trainer's own step on the recorded batches without `forget`: the model's loss
    with num_items_in_batch (the Trainer's count of labels), torch's clip_grad_norm_, a plain SGD step."""
    model, data = _model(), _Texts()
    set_flat_params(model, history.schedule["w0"])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    keep = torch.ones(N, dtype=torch.bool)
    keep[list(forget)] = False
    for batch, lr in zip(history.schedule["batches"], history.schedule["lrs"][:, 0].tolist()):
        rem = batch[keep[batch]]
        if rem.numel() == 0:
            continue
        inputs = _collate([data[int(i)] for i in rem])
        count = (inputs["labels"] != -100).sum()  # transformers 5.24 counts GPT-2's labels unshifted (hf.TrainerLoss)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        model(**inputs, num_items_in_batch=count).loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
    return model


def test_forgetting_matches_a_trainer_style_retrain(tmp_path_factory):
    name, trainer, cb, history = _run("accumulation 2 + max_grad_norm 0.2", tmp_path_factory)  # every replayed feature
    forget = [1, 7, 20, 33, 46]
    result = uf.unlearn(trainer.model, history, forget, cb.replay_set, cb.replay_loss, method="retrain")
    reference = _trainer_style_retrain(history, forget, cb.max_grad_norm)
    dw, moved = _max_dw(result.model, reference), _max_dw(reference, trainer.model)
    assert dw < TIGHT < moved / 1000, (dw, moved)
    with pytest.raises(ValueError, match="clipped gradient norms at 0.2"):  # its model of a step has no clipping
        uf.unlearn(trainer.model, history, forget, cb.replay_set, cb.replay_loss, method="deltagrad")


def test_adamw_defaults(tmp_path):
    """The Trainer's defaults (AdamW, linear decay, max_grad_norm=1.0). AdamW divides by sqrt(v) + 1e-8, so float
    rounding in near-zero gradient coordinates moves weights by up to a fraction of lr: the reference for "float
    tolerance" is the Trainer itself on the same batches split into other micro-batches."""
    a = _trainer(tmp_path / "a", learning_rate=5e-3)  # the default 5e-5 moves the weights too little to tell anything apart
    cb = hf.record(a, uf.HistoryPolicy(kind="full"))
    a.train()
    history = cb.finish()
    b = _trainer(tmp_path / "b", learning_rate=5e-3, per_device_train_batch_size=BATCH // 2, gradient_accumulation_steps=2)
    b.train()
    noise = _max_dw(a.model, b.model)  # same samples per step, same math
    dw = _max_dw(_replay(a.model, history, cb.replay_set, cb.replay_loss), a.model)
    wrong = _max_dw(_replay(a.model, history, cb.replay_set, hf.TrainerLoss("shifted")), a.model)
    assert history.meta["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert dw < 5 * noise < wrong, (dw, noise, wrong)  # measured: 3.75e-5, 2.65e-5, 8.7e-4 (docs/integrations.md)


def test_history_saved_with_each_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, optim="sgd", learning_rate=0.5, save_strategy="steps", save_steps=4)
    cb = hf.record(trainer)
    trainer.train()
    final = cb.finish(summary=False)
    path = tmp_path / "checkpoint-8" / hf.HISTORY_DIR
    saved = GradientHistory.load(str(path))
    assert len(saved.schedule["batches"]) == 8
    assert all(torch.equal(a, b) for a, b in zip(saved.schedule["batches"], final.schedule["batches"]))
    # the checkpoint's model is what the saved history replays to
    at_8 = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "checkpoint-8"))
    assert saved.meta["checkpoint"] == {"global_step": 8, "weights_digest": uf.history.weights_digest(at_8)}
    assert _max_dw(_replay(at_8, saved, cb.replay_set, cb.replay_loss), at_8) < TIGHT
    # a recording in memory cannot be continued: a resume is refused, not silently restarted
    again = _trainer(tmp_path, optim="sgd", learning_rate=0.5)
    hf.record(again, resumable=False)
    with pytest.raises(ValueError, match="resumable=False"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def test_per_sample_first_epoch_history_from_the_trainer(tmp_path):
    """hf.record(per_sample=...) records each sample's first-epoch gradient (for first_epoch_ascent) beside the step
    history; the rows of the first optimizer step's samples are their gradients at the initial weights."""
    policy = uf.HistoryPolicy(kind="first_epoch", per_sample=True, params="embeddings", codec="fp32")
    trainer = _trainer(tmp_path, optim="sgd", learning_rate=0.5, gradient_accumulation_steps=2, num_train_epochs=2)
    cb = hf.record(trainer, uf.HistoryPolicy(kind="full"), per_sample=policy)
    trainer.train()
    rows, history = cb.per_sample_history(), cb.finish(summary=False)
    assert rows is cb.per_sample_history() and rows.n_epochs == 1  # epoch 1 ran, "first_epoch" keeps epoch 0
    assert torch.equal(rows.epochs[0]["index"], torch.arange(N)) and len(history.schedule["batches"]) == 2 * N // (2 * BATCH)
    assert rows.param_names == ["transformer.wte.weight", "transformer.wpe.weight"]
    reference = _model()  # independent: the model's own loss, one unpadded sample at a time, at the initial weights
    set_flat_params(reference, history.schedule["w0"])
    params = dict(reference.named_parameters())
    data = _Texts()
    for i in history.schedule["batches"][0].tolist():
        reference.zero_grad()
        ids = data[i]["input_ids"][None]
        reference(input_ids=ids, labels=ids).loss.backward()
        expected = torch.cat([params[n].grad.reshape(-1) for n in rows.param_names])
        torch.testing.assert_close(rows.row(0, i), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="per_sample"):
        hf.record(_trainer(tmp_path), per_sample=uf.HistoryPolicy(kind="full"))
    with pytest.raises(ValueError, match="per_sample=True"):  # refused when attached, not when training starts
        hf.record(_trainer(tmp_path), per_sample=uf.HistoryPolicy(kind="first_epoch", per_sample=False))


def test_unreplayable_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dropout.*attn_pdrop=0.1.*kind='minimal' recording keeps no random generator states"):
        hf.record(_trainer(tmp_path, model=_model(dropout=0.1)), policy=uf.HistoryPolicy(kind="minimal"))
    with pytest.raises(ValueError, match="remove_unused_columns"):
        hf.record(_trainer(tmp_path, remove_unused_columns=True))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        hf.record(_trainer(tmp_path, label_smoothing_factor=0.1))

    class Custom(transformers.Trainer):
        def compute_loss(self, model, inputs, **kw):
            return super().compute_loss(model, inputs, **kw) * 2

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, remove_unused_columns=False, report_to=[])
    with pytest.raises(ValueError, match="compute_loss is overridden"):
        hf.record(Custom(model=_model(), args=args, train_dataset=_Texts(), data_collator=_collate))


def test_left_padding_and_lost_indices_are_refused(tmp_path):
    def left_pad(features):
        batch = _collate(features)
        return {k: torch.flip(v, dims=[1]) for k, v in batch.items()}  # padding first (reversed texts: fine for the check)

    trainer = _trainer(tmp_path, optim="sgd", max_steps=1)
    trainer.data_collator = left_pad
    hf.record(trainer)
    with pytest.raises(ValueError, match="not right-padded"):
        trainer.train()

    trainer = _trainer(tmp_path, optim="sgd", max_steps=1)
    hf.record(trainer)
    trainer.data_collator = _collate  # replaced after record(): the batches carry no indices
    with pytest.raises(ValueError, match="without 'uf_index'"):
        trainer.train()

    class Augmented(_Texts):  # a random transform: the replay cannot feed what the Trainer saw
        def __getitem__(self, i):
            ids = self.texts[i]
            return {"input_ids": ids[torch.randperm(len(ids))]}

    trainer = _trainer(tmp_path, optim="sgd", max_steps=1)
    trainer.train_dataset = Augmented()
    hf.record(trainer)
    with pytest.raises(ValueError, match="differs from the same example collated alone"):
        trainer.train()


@pytest.mark.parametrize("config", ["plain", "accumulation 2", "accumulation 2 + max_grad_norm 0.2"])
def test_dropout_is_replayed_with_the_trainers_masks(config, tmp_path):
    # GPT-2's default dropout (0.1 in embeddings, attention and residuals) was refused until 2026-12-05: the replay drew
    # other masks (6e-2 off). The recording keeps each step's generator state and the replay pads batches as the collator did;
    # with accumulation it replays the micro-batches one by one, each weighted by its share of the step's label tokens
    trainer = _trainer(tmp_path, model=_model(dropout=0.1), **CONFIGS[config])
    cb = hf.record(trainer)
    trainer.train()
    history = cb.finish(summary=False)
    assert ["config.attn_pdrop", 0.1] in history.meta["hf_trainer"]["dropout"]
    model = trainer.model
    assert model.training
    moved = float((flat_params(model) - history.schedule["w0"]).abs().max())
    assert _max_dw(_replay(model, history, cb.replay_set, cb.replay_loss), model) < TIGHT < moved / 1000
    # the batches' shape matters: padded to the whole set's longest example, the replay draws other masks
    padded = torch.utils.data.TensorDataset(*cb.replay_set.tensors)
    assert _max_dw(_replay(model, history, padded, cb.replay_loss), model) > 100 * TIGHT


def test_import_unlearn_fast_imports_no_trainer_framework():
    code = "import sys, unlearn_fast; print(sorted(m for m in ('transformers', 'accelerate', 'unlearn_fast.integrations.hf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- accelerate
def _accelerate_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g)
    y = (x @ torch.randn(5, 3, generator=g)).argmax(1)
    return torch.utils.data.TensorDataset(x, y)


def _mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


ACC_LR, ACC_DECAY = 0.3, 3  # SGD lr 0.3, halved every 3 optimizer steps (StepLR behind accelerate's AcceleratedScheduler)


@pytest.fixture(scope="module")
def accelerated():
    """An MLP trained by accelerate (Accelerator(cpu=True), gradient accumulation 2 micro-batches of 4, prepared
    model, AcceleratedOptimizer, AcceleratedScheduler, prepared DataLoader(shuffle=True) over uf.IndexedDataset),
    recorded once per optimizer step (accelerate skips optimizer.step() and scheduler.step() on the other
    micro-batches, and divides each micro-batch loss by 2: the step's gradient is the mean over its 8 samples)."""
    import accelerate

    train = _accelerate_data()
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=ACC_LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, ACC_DECAY, 0.5)
    loader = torch.utils.data.DataLoader(uf.IndexedDataset(train), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), allow=("accumulation",))
    for _ in range(2):
        queue = []
        for batch in loader:
            indices, x, y = uf.split_batch(batch)
            with acc.accumulate(model):
                acc.backward(torch.nn.functional.cross_entropy(model(x), y))
                queue.append(indices)
                if acc.sync_gradients:
                    rec.record(torch.cat(queue))
                    queue = []
                opt.step()
                sched.step()
                opt.zero_grad()
    history = rec.finish(train, torch.nn.functional.cross_entropy)
    return model, history, train


def _plain_sgd(history, train, forget=(), record=False):
    """Independent reference: the recorded optimizer steps as a plain loop (one mean cross-entropy over each step's
    samples minus `forget`, SGD with the StepLR schedule computed here), optionally recorded with a plain recorder."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=ACC_LR)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full")) if record else None
    x, y = train.tensors
    for step, batch in enumerate(history.schedule["batches"]):
        keep = batch[~torch.isin(batch, torch.tensor(list(forget), dtype=torch.int64))]
        for g in opt.param_groups:
            g["lr"] = ACC_LR * 0.5 ** (step // ACC_DECAY)
        if keep.numel() == 0:
            continue
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[keep]), y[keep]).backward()
        if rec is not None:
            rec.record(keep)
        opt.step()
    return model, (rec.finish(train, torch.nn.functional.cross_entropy) if record else None)


def test_accelerate_history_replays_and_forgets_exactly(accelerated):
    model, history, train = accelerated
    assert history.meta["optimizer"]["class"] == "torch.optim.sgd.SGD"
    assert len(history.schedule["batches"]) == 2 * N // 8 and all(len(b) == 8 for b in history.schedule["batches"])
    lrs = history.schedule["lrs"][:, 0].tolist()
    assert lrs == [ACC_LR * 0.5 ** (s // ACC_DECAY) for s in range(len(lrs))]  # the scheduler stepped once per optimizer step
    reference, _ = _plain_sgd(history, train)
    moved = float((flat_params(model) - history.schedule["w0"]).abs().max())
    assert _max_dw(model, reference) < TIGHT < moved / 1000
    assert _max_dw(uf.unlearn(model, history, [], train, torch.nn.functional.cross_entropy, method="retrain").model, model) == 0
    forget = [0, 5, 9, 30]
    result = uf.unlearn(model, history, forget, train, torch.nn.functional.cross_entropy, method="retrain")
    truth, _ = _plain_sgd(history, train, forget)
    assert _max_dw(result.model, truth) < TIGHT < _max_dw(truth, model) / 1000


@pytest.mark.parametrize("method", ["deltagrad", "finetune", "rewind"])
def test_methods_on_an_accelerate_model_match_the_plain_loop(accelerated, method):
    """The same method on the accelerate run and on the same steps recorded from a plain loop: the same model (the
    two trainings differ by float rounding only)."""
    model, history, train = accelerated
    plain_model, plain_history = _plain_sgd(history, train, record=True)
    forget = [0, 5, 9, 30]
    loss = torch.nn.functional.cross_entropy
    a = uf.unlearn(model, history, forget, train, loss, method=method).model
    b = uf.unlearn(plain_model, plain_history, forget, train, loss, method=method).model
    truth, _ = _plain_sgd(history, train, forget)
    assert _max_dw(a, b) < 1e-5 < _max_dw(truth, model) / 100, (_max_dw(a, b), _max_dw(truth, model))


def _bf16_run():
    """6 SGD steps of a model prepared by accelerate with mixed_precision="bf16": accelerate patches the model's
    forward to run under CPU autocast (bfloat16) and return float32 outputs."""
    import accelerate
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state: the runs before (the Trainer's) fixed mixed_precision="no"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        return _bf16_steps(acc)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _bf16_steps(acc):
    model = acc.prepare(_mlp())
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=ACC_LR))
    train = _accelerate_data()
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    x, y = train.tensors
    for step in range(6):
        batch = torch.arange(8 * step, 8 * step + 8)
        opt.zero_grad()
        acc.backward(torch.nn.functional.cross_entropy(model(x[batch]), y[batch]))
        rec.record(batch)
        opt.step()
    return acc, model, rec.finish(train, torch.nn.functional.cross_entropy), train


def test_accelerate_mixed_precision_replays_on_the_prepared_model():
    """The methods get a deep copy of the prepared model, patched forward included: the replay runs under the same
    autocast and lands on the trained weights."""
    acc, model, history, train = _bf16_run()
    replayed = _replay(model, history, train, torch.nn.functional.cross_entropy)
    moved = float((flat_params(model) - history.schedule["w0"]).abs().max())
    assert _max_dw(replayed, model) < TIGHT < moved / 1000, (_max_dw(replayed, model), moved)


def test_accelerate_mixed_precision_is_recorded():
    # accelerate enters autocast inside the model's patched forward: the recorder sees it in its submodules' pre-hooks
    acc, model, history, train = _bf16_run()
    assert history.meta["recording"].get("autocast") == "bfloat16", history.meta["recording"]
    # so a replay on the unwrapped model (no autocast of its own) runs under it too: the trained weights
    plain = acc.unwrap_model(model, keep_fp32_wrapper=False)
    replayed, _ = retrain.run(copy.deepcopy(plain), history, torch.empty(0, dtype=torch.int64), train, torch.nn.functional.cross_entropy)
    assert _max_dw(replayed, model) < TIGHT


# ----------------------------------------------------------------------------- resume_from_checkpoint
# 2 epochs of 6 optimizer steps (accumulation 2 x batch 4, clipping at 0.2: every replayed feature), a checkpoint every
# 4 steps. The interrupted run crashes at step 7 (checkpoint-4 saved), resumes from checkpoint-4 inside epoch 0,
# crashes again at step 10 (checkpoint-8 saved, in epoch 1), resumes with resume_from_checkpoint=True and finishes.
RESUME_ARGS = dict(optim="sgd", learning_rate=0.5, num_train_epochs=2, gradient_accumulation_steps=2, max_grad_norm=0.2,
                   save_strategy="steps", save_steps=4)
RESUME_POLICIES = {"full": uf.HistoryPolicy(kind="full"), "minimal": uf.HistoryPolicy(kind="minimal", rank=2)}


class _Crash(transformers.TrainerCallback):
    """Raises at the end of global step `at`, like a killed process: no on_train_end, no finish()."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise RuntimeError(f"simulated crash at step {self.at}")


def _content(path):
    """The stored version of a history directory (store's content digest) and its files: what 'unchanged' means."""
    import os

    from unlearn_fast import store

    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs if f != "LOCK")
    return store.read(str(path), "GradientHistory").content, files


def _resumed_run(kind, tmp_path_factory):
    key = ("resume", kind)
    if key not in _RUNS:
        policy = RESUME_POLICIES[kind]
        a = _trainer(tmp_path_factory.mktemp("uninterrupted"), **RESUME_ARGS)
        cba = hf.record(a, policy)
        a.train()
        out = tmp_path_factory.mktemp("interrupted")
        b = _trainer(out, **RESUME_ARGS)
        hf.record(b, policy)
        b.add_callback(_Crash(7))
        with pytest.raises(RuntimeError, match="simulated crash at step 7"):
            b.train()
        before = _content(out / "checkpoint-4" / hf.HISTORY_DIR)
        c = _trainer(out, **RESUME_ARGS)
        hf.record(c, policy)
        c.add_callback(_Crash(10))
        with pytest.raises(RuntimeError, match="simulated crash at step 10"):
            c.train(resume_from_checkpoint=str(out / "checkpoint-4"))
        assert _content(out / "checkpoint-4" / hf.HISTORY_DIR) == before  # a resume only reads its checkpoint
        d = _trainer(out, **RESUME_ARGS)
        cbd = hf.record(d, policy)
        d.train(resume_from_checkpoint=True)  # the Trainer's last checkpoint: checkpoint-8
        # minimal: the checkpoints Mini's summary is computed from, before finish() consumes them
        kept = [[(s, w.tensors) for s, w in cb.recorder.checkpoints] for cb in (cba, cbd)]
        _RUNS[key] = (a, cba, cba.finish(summary=kind == "full"), d, cbd, cbd.finish(summary=kind == "full"), out, kept)
    return _RUNS[key]


@pytest.fixture(scope="module")
def resume_source(tmp_path_factory):
    """The interrupted run's output directory (checkpoint-4, -8, -12, each with its history)."""
    return _resumed_run("full", tmp_path_factory)[6]


@pytest.mark.parametrize("kind", ["full", "minimal"])
def test_resumed_recording_equals_the_uninterrupted_one(kind, tmp_path_factory):
    a, cba, full_run, d, cbd, resumed, out, kept = _resumed_run(kind, tmp_path_factory)
    assert [r["global_step"] for r in resumed.meta["hf_trainer"]["resumed_from"]] == [4, 8]
    assert resumed.num_steps == full_run.num_steps == 12
    # the Trainer itself resumes exactly (same data order, RNG, optimizer state): the same weights, bit for bit
    assert _max_dw(d.model, a.model) == 0
    for key, value in full_run.schedule.items():  # w0, lrs, batch_sizes, micro_counts/sizes, batches (full) or seen (minimal)
        got = resumed.schedule[key]
        if isinstance(value, dict):  # buffers0
            got, value = list(got.values()), list(value.values())
        assert (len(got) == len(value) and all(torch.equal(x, y) for x, y in zip(got, value))) if isinstance(value, list) \
            else torch.equal(got, value), key
    if kind == "full":
        # every step's gradients, the resumed ones read back from the copied chunks
        assert torch.equal(resumed.trajectory["g"].all(), full_run.trajectory["g"].all())
    else:  # Mini's summary is computed from these (and the final weights, lrs and steps, equal above)
        assert [s for s, _ in kept[1]] == [s for s, _ in kept[0]] and len(kept[0]) >= 3
        assert all(torch.equal(x[n], y[n]) for (_, x), (_, y) in zip(kept[0], kept[1]) for n in x)
    strip = lambda meta: {k: (v if k != "hf_trainer" else {**v, "resumed_from": None}) for k, v in meta.items()}  # noqa: E731
    assert strip(resumed.meta) == strip(full_run.meta)  # optimizer, policy, clipping and accumulation counts, n_train, ...
    assert resumed.meta["recording"]["clipped_steps"] == 12 and resumed.meta["recording"]["accumulated_steps"] == 12
    if kind == "full":
        # independent reference: the Trainer's step written out by hand over the recorded batches (no retrain code)
        reference = _trainer_style_retrain(resumed, [], cbd.max_grad_norm)
        moved = float((flat_params(d.model) - resumed.schedule["w0"]).abs().max())
        assert _max_dw(reference, d.model) < TIGHT < moved / 1000
        saved = GradientHistory.load(cbd.recording_path)  # the finished history stays where the run streamed it
        assert saved.complete and _max_dw(_replay(d.model, saved, cbd.replay_set, cbd.replay_loss), d.model) < TIGHT
        forget = [2, 9, 31]
        result = uf.unlearn(d.model, resumed, forget, cbd.replay_set, cbd.replay_loss, method="retrain")
        truth = _trainer_style_retrain(resumed, forget, cbd.max_grad_norm)
        assert _max_dw(result.model, truth) < TIGHT < _max_dw(truth, d.model) / 1000


def test_resume_where_a_chunk_ended_at_the_checkpoint(tmp_path, tmp_path_factory, monkeypatch):
    """Chunks of 2 steps: every checkpoint (every 4 steps) and the end fall on a chunk boundary, where flush() has no
    step left to mark (hf._Recorder writes no empty chunk; on_save marks the checkpoint's copy itself)."""
    import unlearn_fast.recording

    a, cba, full_run = _resumed_run("full", tmp_path_factory)[:3]
    monkeypatch.setattr(unlearn_fast.recording, "CHUNK_STEPS", 2)
    b = _trainer(tmp_path, **RESUME_ARGS)
    hf.record(b, RESUME_POLICIES["full"])
    b.add_callback(_Crash(7))
    with pytest.raises(RuntimeError, match="simulated crash"):
        b.train()
    saved = GradientHistory.load(str(tmp_path / "checkpoint-4" / hf.HISTORY_DIR))
    assert saved.chunk_steps == [2, 2] and list(saved.chunk_marks) == [1]
    c = _trainer(tmp_path, **RESUME_ARGS)
    cbc = hf.record(c, RESUME_POLICIES["full"])
    c.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    resumed = cbc.finish()
    assert GradientHistory.load(cbc.recording_path).chunk_steps == [2] * 6
    assert _max_dw(c.model, a.model) == 0
    assert all(torch.equal(x, y) for x, y in zip(resumed.schedule["batches"], full_run.schedule["batches"]))
    assert torch.equal(resumed.trajectory["g"].all(), full_run.trajectory["g"].all())


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _resume(out, checkpoint, policy=None, train_dataset=None, resumable=None, model=None, **args):
    trainer = _trainer(out, model=model, **dict(RESUME_ARGS, **args))
    if train_dataset is not None:
        trainer.train_dataset = train_dataset
    hf.record(trainer, policy or RESUME_POLICIES["full"], resumable=resumable)
    trainer.train(resume_from_checkpoint=str(checkpoint))


def _refused(out, checkpoint, match, **kwargs):
    """The resume raises `match`, leaves the checkpoint's history as it was and creates no recording."""
    before = _content(checkpoint / hf.HISTORY_DIR) if (checkpoint / hf.HISTORY_DIR).exists() else None
    with pytest.raises(ValueError, match=match):
        _resume(out, checkpoint, **kwargs)
    if before is not None:
        assert _content(checkpoint / hf.HISTORY_DIR) == before
    assert not (out / hf.RECORDING_DIR).exists()


def test_resume_refuses_a_checkpoint_without_history(resume_source, tmp_path):
    import shutil

    ckpt = _copy_checkpoint(resume_source / "checkpoint-4", tmp_path / "checkpoint-4")
    shutil.rmtree(ckpt / hf.HISTORY_DIR)  # as written by a run without hf.record or with save_history=False
    _refused(tmp_path, ckpt, "holds no 'unlearn_history'.*cannot continue")


def test_resume_refuses_modified_weights(resume_source, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy_checkpoint(resume_source / "checkpoint-4", tmp_path / "checkpoint-4")
    weights = load_file(str(ckpt / "model.safetensors"))
    name = next(n for n in weights if n.endswith("wpe.weight"))
    weights[name][0, 0] += 1e-3
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    _refused(tmp_path, ckpt, r"restored weights' digest .* modified or replaced")


def test_resume_refuses_a_history_of_another_run(resume_source, tmp_path, tmp_path_factory):
    import shutil

    other = tmp_path_factory.mktemp("other")  # the same model and settings from another initialisation, 4 steps
    torch.manual_seed(1)
    trainer = _trainer(other, model=transformers.GPT2LMHeadModel(_model().config), **dict(RESUME_ARGS, max_steps=4))
    hf.record(trainer, RESUME_POLICIES["full"])
    trainer.train()
    ckpt = _copy_checkpoint(resume_source / "checkpoint-4", tmp_path / "checkpoint-4")
    shutil.rmtree(ckpt / hf.HISTORY_DIR)
    shutil.copytree(other / "checkpoint-4" / hf.HISTORY_DIR, ckpt / hf.HISTORY_DIR)
    _refused(tmp_path, ckpt, "digest .* history belongs to another run")
    # the history of checkpoint-8 put into checkpoint-4: the steps do not match either
    shutil.rmtree(ckpt / hf.HISTORY_DIR)
    shutil.copytree(resume_source / "checkpoint-8" / hf.HISTORY_DIR, ckpt / hf.HISTORY_DIR)
    _refused(tmp_path, ckpt, "resumes at global step 4, the history was saved at step 8 with 8 recorded steps")


def test_resume_refuses_a_history_of_another_model(resume_source, tmp_path, tmp_path_factory):
    import shutil

    other = tmp_path_factory.mktemp("other_model")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    trainer = _trainer(other, model=transformers.GPT2LMHeadModel(config), **dict(RESUME_ARGS, max_steps=4))
    hf.record(trainer, RESUME_POLICIES["full"])
    trainer.train()
    ckpt = _copy_checkpoint(resume_source / "checkpoint-4", tmp_path / "checkpoint-4")
    shutil.rmtree(ckpt / hf.HISTORY_DIR)
    shutil.copytree(other / "checkpoint-4" / hf.HISTORY_DIR, ckpt / hf.HISTORY_DIR)
    _refused(tmp_path, ckpt, "recorded for another model")


def test_resume_refuses_other_data_settings_or_step(resume_source, tmp_path):
    import json

    ckpt = _copy_checkpoint(resume_source / "checkpoint-4", tmp_path / "checkpoint-4")
    _refused(tmp_path, ckpt, "training set has 44 samples, the history was recorded on 48",
             train_dataset=torch.utils.data.Subset(_Texts(), range(N - 4)))
    class Other(_Texts):  # as many examples, other tokens
        def __getitem__(self, i):
            return {"input_ids": (self.texts[i] % 255) + 1}

    _refused(tmp_path, ckpt, "training set's examples .* are not those the history was recorded on", train_dataset=Other())
    _refused(tmp_path, ckpt, "policy differs .*'kind': \\('full', 'minimal'\\)", policy=uf.HistoryPolicy(kind="minimal"))
    _refused(tmp_path, ckpt, "settings changed .*max_grad_norm", max_grad_norm=0.5)
    # (dropout switched on at the resume: the steps before kept no generator states, and the Trainer died at its next save)
    _refused(tmp_path, ckpt, r"settings changed .*'dropout': \(\[\], \[\['config.resid_pdrop', 0.1\]", model=_model(dropout=0.1))
    _refused(tmp_path, ckpt, "resumable=False", resumable=False)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["global_step"] = 3  # the Trainer resumes at step 3 with checkpoint-4's weights
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    _refused(tmp_path, ckpt, "resumes at global step 3, the history was saved at step 4")


# ----------------------------------------------------------------------------- DDP through the Trainer
# 2 CPU processes (gloo), launched as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): 4 samples per
# rank and step, 2 epochs = 12 steps of 8-sample world batches, SGD, clipping at 0.2 (after DDP's all-reduce)
DDP_ARGS = dict(optim="sgd", learning_rate=0.5, num_train_epochs=2, max_grad_norm=0.2, ddp_backend="gloo")


def _hf_ddp_run(rank, out):
    trainer = _trainer(out, **DDP_ARGS)
    cb = hf.record(trainer, uf.HistoryPolicy(kind="full"))
    trainer.train()
    history = cb.finish()
    if rank == 0:
        history.save(os.path.join(out, "history"))
    else:
        assert history is None
    torch.save(trainer.model.state_dict(), os.path.join(out, f"final_{rank}.pt"))
    try:  # each rank dividing by its own label count: refused when attached
        hf.record(_trainer(out, **dict(DDP_ARGS, average_tokens_across_devices=False)))
    except ValueError as err:
        open(os.path.join(out, f"refused_{rank}.txt"), "w").write(str(err))
    # the same run streamed (checkpoints every 4 steps), killed at step 7 (a raise on every rank at the same step)
    crashed = _trainer(os.path.join(out, "crash"), **DDP_ARGS, save_strategy="steps", save_steps=4)
    hf.record(crashed, uf.HistoryPolicy(kind="full"))
    crashed.add_callback(_Crash(7))
    try:
        crashed.train()
    except RuntimeError as err:
        assert "simulated crash" in str(err), err


def _hf_ddp_replay(rank, out, dropout=0.0):
    """The DDP replay (distributed.run, every rank) of the history _hf_ddp_run saved, forgetting nothing."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    history = GradientHistory.load(os.path.join(out, "history"))
    replayed, _ = distributed.run(_model(dropout=dropout), history, torch.zeros(0, dtype=torch.int64), hf.replay_set(_Texts(), _collate),
                                  hf.TrainerLoss("all"))
    torch.save(replayed.state_dict(), os.path.join(out, f"ddp_replay_{rank}.pt"))


def _record_ddp_training(rank, out, trainer):
    """hf.record, train, the history saved by rank 0 and every rank's final weights; then the DDP replay of it."""
    cb = hf.record(trainer, uf.HistoryPolicy(kind="full"))
    trainer.train()
    history = cb.finish()
    if rank == 0:
        history.save(os.path.join(out, "history"))
    torch.save(trainer.model.state_dict(), os.path.join(out, f"final_{rank}.pt"))
    torch.distributed.barrier()
    _hf_ddp_replay(rank, out, dropout=trainer.model.config.resid_pdrop)


class _SeedPerRank(transformers.TrainerCallback):
    """Each rank's generator seeded apart once training begins (the Trainer seeds every rank alike)."""

    def on_train_begin(self, args, state, control, **kwargs):
        torch.manual_seed(100 + args.process_index)


def _hf_ddp_dropout(rank, out):
    """A Trainer DDP run of a GPT-2 with dropout 0.1 (refused until 2026-12-05) and 2 micro-batches a step (refused until
    2026-12-06), then its DDP replay forgetting nothing."""
    trainer = _trainer(out, model=_model(dropout=0.1), **DDP_ARGS, gradient_accumulation_steps=2)
    trainer.add_callback(_SeedPerRank())
    _record_ddp_training(rank, out, trainer)


def _assert_ddp_replays(out, trained, dropout=0.0):
    """Every rank's DDP replay (ddp_replay_<rank>.pt) lands on the trained weights."""
    for rank in range(2):
        replayed = _model(dropout=dropout)
        replayed.load_state_dict(torch.load(out / f"ddp_replay_{rank}.pt"))
        assert _max_dw(replayed, trained) < TIGHT, rank


def _hf_ddp_resume(rank, out):
    """Resumes the run _hf_ddp_run killed at step 7 from its checkpoint-4 (new processes, as after a crash)."""
    import shutil

    run = os.path.join(out, "crash")
    trainer = _trainer(run, **DDP_ARGS, save_strategy="steps", save_steps=4)
    cb = hf.record(trainer, uf.HistoryPolicy(kind="full"))  # (reads args.world_size: the process group is up)
    # a checkpoint whose trainer state says step 3 (its history was saved at step 4): refused on every rank alike
    if rank == 0:
        shutil.copytree(os.path.join(run, "checkpoint-4"), os.path.join(out, "tampered"))
        state_file = os.path.join(out, "tampered", "trainer_state.json")
        state = json.loads(open(state_file).read())
        open(state_file, "w").write(json.dumps(dict(state, global_step=3)))
    torch.distributed.barrier()
    try:
        trainer.train(resume_from_checkpoint=os.path.join(out, "tampered"))
    except ValueError as err:
        open(os.path.join(out, f"refused_resume_{rank}.txt"), "w").write(str(err))
    trainer = _trainer(run, **DDP_ARGS, save_strategy="steps", save_steps=4)
    cb = hf.record(trainer, uf.HistoryPolicy(kind="full"))
    trainer.train(resume_from_checkpoint=os.path.join(run, "checkpoint-4"))
    history = cb.finish()
    if rank == 0:
        history.save(os.path.join(out, "resumed_history"))
    torch.save(trainer.model.state_dict(), os.path.join(out, f"resumed_{rank}.pt"))


def _hf_ddp_accumulated(rank, out):
    _record_ddp_training(rank, out, _trainer(out, **DDP_ARGS, gradient_accumulation_steps=2))


def _hf_ddp_bf16(rank, out):
    """bf16=True under DDP with 2 micro-batches a step (each rank's kept with the step), then its DDP replay."""
    _record_ddp_training(rank, out, _trainer(out, **DDP_ARGS, bf16=True, gradient_accumulation_steps=2))


def test_ddp_trainer_records_the_world_batches(tmp_path):
    spawn_as_torchrun(_hf_ddp_run, tmp_path)
    history = GradientHistory.load(str(tmp_path / "history"))
    finals = []
    for rank in range(2):
        model = _model()
        model.load_state_dict(torch.load(tmp_path / f"final_{rank}.pt"))
        finals.append(model)
    assert _max_dw(finals[0], finals[1]) == 0  # DDP: every rank the same weights
    assert history.meta["distributed"]["world_size"] == 2 and history.meta["hf_trainer"]["world_size"] == 2
    batches = history.schedule["batches"]
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)  # world batches: 4 samples of each rank
    for epoch in range(2):  # every sample once per epoch: rank 0 alone trained on half of them
        assert sorted(torch.cat(batches[6 * epoch: 6 * epoch + 6]).tolist()) == list(range(N))
    trained = finals[0]
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    # independent reference: the Trainer's step written out by hand, one process, over the recorded world batches
    reference = _trainer_style_retrain(history, [], DDP_ARGS["max_grad_norm"])
    assert _max_dw(reference, trained) < TIGHT < moved / 1000
    data = hf.replay_set(_Texts(), _collate)
    loss = hf.TrainerLoss("all")
    assert _max_dw(_replay(trained, history, data, loss), trained) < TIGHT
    # rank 0's own samples only (what recording without the gather would keep): far from the trained weights
    schedule = {k: v for k, v in history.schedule.items() if k != "batch_sizes"}  # (recomputed from the batches)
    local = GradientHistory(history.meta, dict(schedule, batches=[b[:4] for b in batches]), None, None)
    assert _max_dw(_replay(trained, local, data, loss), trained) > 100 * TIGHT
    for rank in range(2):
        assert "average_tokens_across_devices=False" in open(tmp_path / f"refused_{rank}.txt").read()
    # the DDP replay of the Trainer's history: before 2026-12-05 it skipped the Trainer's clipping and weighed the ranks by
    # samples, not label tokens: 0.066 off the trained weights (training moved them 0.028), 0.0023 with clipping alone
    spawn_as_torchrun(_hf_ddp_replay, tmp_path)
    _assert_ddp_replays(tmp_path, trained)
    # the killed run resumed from its checkpoint-4 in new processes: the history of the uninterrupted run, bit for bit
    crashed = GradientHistory.load(str(tmp_path / "crash" / "checkpoint-4" / hf.HISTORY_DIR))
    assert crashed.num_steps == 4 and crashed.recording_id is not None  # streamed, resumable
    spawn_as_torchrun(_hf_ddp_resume, tmp_path)
    for rank in range(2):  # every rank refused the tampered checkpoint (none left waiting in a collective)
        assert "resumes at global step 3, the history was saved at step 4" in open(tmp_path / f"refused_resume_{rank}.txt").read()
    resumed = GradientHistory.load(str(tmp_path / "resumed_history"))
    assert [r["global_step"] for r in resumed.meta["hf_trainer"]["resumed_from"]] == [4]
    assert resumed.meta["distributed"]["world_size"] == 2 and resumed.num_steps == 12
    assert all(torch.equal(a, b) for a, b in zip(resumed.schedule["batches"], batches))
    assert torch.equal(resumed.schedule["lrs"], history.schedule["lrs"])
    assert torch.equal(resumed.trajectory["g"].all(), history.trajectory["g"].all())
    for rank in range(2):
        model = _model()
        model.load_state_dict(torch.load(tmp_path / f"resumed_{rank}.pt"))
        assert _max_dw(model, trained) == 0


def test_ddp_trainer_with_dropout_and_accumulation_replays_every_ranks_masks(tmp_path):
    spawn_as_torchrun(_hf_ddp_dropout, tmp_path)
    history = GradientHistory.load(str(tmp_path / "history"))
    width = torch.get_rng_state().numel()
    states = history.schedule["rng_states"]
    assert states.shape == (6, 2 * width) and not torch.equal(states[:, :width], states[:, width:])  # each rank's own
    assert history.schedule["micro_counts"].tolist() == [4] * 6  # 2 ranks x 2 micro-batches, replayed one by one
    trained = _model(dropout=0.1)
    trained.load_state_dict(torch.load(tmp_path / "final_0.pt"))
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    data, loss = hf.replay_set(_Texts(), _collate), hf.TrainerLoss("all")
    # one process: each rank's part of a world batch padded as its collator did, its masks from its state, weighted by tokens
    assert _max_dw(_replay(trained, history, data, loss), trained) < TIGHT < moved / 1000
    _assert_ddp_replays(tmp_path, trained, dropout=0.1)  # under DDP, each rank drawing its own masks
    without = GradientHistory(history.meta, {k: v for k, v in history.schedule.items() if k not in ("rng_states", "batch_sizes")}, None, None)
    assert _max_dw(_replay(trained, without, data, loss), trained) > 100 * TIGHT  # other masks
    # each rank's part forwarded at once (what the DDP replay did before 2026-12-06, when this was refused): other masks
    parts = GradientHistory(history.meta, {k: v for k, v in history.schedule.items() if k not in ("micro_counts", "micro_sizes")})
    assert _max_dw(_replay(trained, parts, data, loss), trained) > 100 * TIGHT


def test_ddp_trainer_in_bf16_with_accumulation_replays_each_ranks_micro_batches(tmp_path):
    spawn_as_torchrun(_hf_ddp_bf16, tmp_path)
    history = GradientHistory.load(str(tmp_path / "history"))
    assert history.meta["recording"]["autocast"] == "bfloat16"
    assert history.schedule["micro_counts"].tolist() == [4] * history.num_steps  # 2 ranks x 2 micro-batches
    trained = _model()  # (not accelerate's patched model: the replay's autocast comes from the history)
    trained.load_state_dict(torch.load(tmp_path / "final_0.pt"))
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    data, loss = hf.replay_set(_Texts(), _collate), hf.TrainerLoss("all")
    # (not bit for bit in one process: 4e-8 on an AMD host, 2.1e-6 on an Intel (AVX-512) one, the same there with one thread;
    # which kernel rounds differently was not established. The wrong replay below is far off on both)
    replayed = _max_dw(_replay(trained, history, data, loss), trained)
    assert replayed < BF16_TIGHT < moved / 1000
    _assert_ddp_replays(tmp_path, trained)
    # each rank's part forwarded at once: other bfloat16 products
    parts = GradientHistory(history.meta, {k: v for k, v in history.schedule.items() if k not in ("micro_counts", "micro_sizes")})
    assert _max_dw(_replay(trained, parts, data, loss), trained) > 5 * BF16_TIGHT  # (6.3e-5 on the Intel host, 8e-5 on AMD)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_bf16_trainer_is_replayed_under_the_recorded_autocast(accumulation, tmp_path):
    # refused until 2026-12-06; with accumulation the micro-batches are recorded (each a bfloat16 product of its own)
    trainer = _trainer(tmp_path, bf16=True, optim="sgd", learning_rate=0.5, max_grad_norm=0.2, gradient_accumulation_steps=accumulation)
    cb = hf.record(trainer, uf.HistoryPolicy(kind="full"))
    trainer.train()
    history = cb.finish()
    assert history.meta["recording"]["autocast"] == "bfloat16"
    trained = _model()  # (not accelerate's patched model: the replay's autocast comes from the history)
    trained.load_state_dict(trainer.model.state_dict())
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    assert _max_dw(_replay(trained, history, cb.replay_set, cb.replay_loss), trained) < TIGHT < moved / 1000
    plain = GradientHistory(dict(history.meta, recording={k: v for k, v in history.meta["recording"].items() if k != "autocast"}),
                            dict(history.schedule))
    assert _max_dw(_replay(trained, plain, cb.replay_set, cb.replay_loss), trained) > 10 * TIGHT
    if accumulation > 1:
        assert history.schedule["micro_counts"].tolist() == [2] * history.num_steps
        one_batch = {k: v for k, v in history.schedule.items() if k not in ("micro_counts", "micro_sizes")}
        one = GradientHistory(dict(history.meta, recording=dict(history.meta["recording"], accumulation_weighting=None)), one_batch)
        assert _max_dw(_replay(trained, one, cb.replay_set, cb.replay_loss), trained) > 10 * TIGHT


def test_ddp_trainer_with_gradient_accumulation_replays_exactly(tmp_path):
    # 2 ranks x 2 micro-batches x 4 samples: 6 steps of 16-sample world batches (no_sync on the first micro-batch)
    spawn_as_torchrun(_hf_ddp_accumulated, tmp_path)
    history = GradientHistory.load(str(tmp_path / "history"))
    trained = _model()
    trained.load_state_dict(torch.load(tmp_path / "final_0.pt"))
    batches = history.schedule["batches"]
    assert len(batches) == 6 and all(len(b) == 16 for b in batches)
    moved = float((flat_params(trained) - history.schedule["w0"]).abs().max())
    # the Trainer's step written out by hand (measured 7.5e-9 off), retrain's replay, and the weights rebuilt from the rows
    assert _max_dw(_trainer_style_retrain(history, [], DDP_ARGS["max_grad_norm"]), trained) < TIGHT < moved / 1000
    data = hf.replay_set(_Texts(), _collate)
    assert _max_dw(_replay(trained, history, data, hf.TrainerLoss("all")), trained) < TIGHT
    for _, w, _ in trajectory.replay(history):
        pass
    assert float((w - flat_params(trained)).abs().max()) < TIGHT
    _assert_ddp_replays(tmp_path, trained)  # each rank's two micro-batches as one part, weighted by their label tokens
