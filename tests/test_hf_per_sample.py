"""hf.record(..., per_sample=...) through a real transformers.Trainer (tiny GPT-2 on CPU) streams the per-sample
recording beside the step recording, copies it into every checkpoint, and continues it from
trainer.train(resume_from_checkpoint=...): interrupted twice (inside epoch 0, and at its last step, where the Trainer
saves before on_epoch_end), the rows equal the uninterrupted run's bit for bit; a checkpoint whose per-sample recording
does not match is refused and left as it was."""
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import unlearn_fast as uf  # noqa: E402
from unlearn_fast import store  # noqa: E402
from unlearn_fast.integrations import hf  # noqa: E402
from unlearn_fast.lm import FirstEpochHistory  # noqa: E402
from test_integrations import BATCH, N, _Crash, _content, _Texts, _trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 2 epochs of 6 optimizer steps (accumulation 2 x batch 4), a checkpoint every 3 steps: checkpoint-6 is at epoch 0's
# last step. The interrupted run crashes at step 5 (checkpoint-3 saved), resumes from checkpoint-3, crashes at step 8
# (checkpoint-6 saved), resumes with resume_from_checkpoint=True (checkpoint-6: the Trainer continues in epoch 1) and
# finishes.
ARGS = dict(optim="sgd", learning_rate=0.5, num_train_epochs=2, gradient_accumulation_steps=2, max_grad_norm=0.2,
            save_strategy="steps", save_steps=3)
STEPS = uf.HistoryPolicy(kind="full")
# every epoch (a resume that got the epoch wrong would file epoch 1's rows under epoch 0), fp32 rows (compared with the
# model's own gradients below), and the activations
PER_SAMPLE = uf.HistoryPolicy(kind="all_epochs", per_sample=True, params="embeddings", codec="fp32", activations=True)
FORGET = [2, 9, 31]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def per_sample_content(checkpoint):
    """The checkpoint's per-sample copy as stored (content digest, files): what 'left as it was' means."""
    path = checkpoint / hf.PER_SAMPLE_DIR
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs if f != "LOCK")
    return store.read(str(path), "FirstEpochHistory").content, files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    a = _trainer(tmp_path_factory.mktemp("uninterrupted"), **ARGS)
    cba = hf.record(a, STEPS, per_sample=PER_SAMPLE)
    a.train()
    out = tmp_path_factory.mktemp("interrupted")
    b = _trainer(out, **ARGS)
    hf.record(b, STEPS, per_sample=PER_SAMPLE)
    b.add_callback(_Crash(5))
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        b.train()
    before = (_content(out / "checkpoint-3" / hf.HISTORY_DIR), per_sample_content(out / "checkpoint-3"))
    c = _trainer(out, **ARGS)
    hf.record(c, STEPS, per_sample=PER_SAMPLE)
    c.add_callback(_Crash(8))
    with pytest.raises(RuntimeError, match="simulated crash at step 8"):
        c.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    after = (_content(out / "checkpoint-3" / hf.HISTORY_DIR), per_sample_content(out / "checkpoint-3"))
    d = _trainer(out, **ARGS)
    cbd = hf.record(d, STEPS, per_sample=PER_SAMPLE)
    d.train(resume_from_checkpoint=True)  # the Trainer's last checkpoint: checkpoint-6
    return dict(a=a, cba=cba, rows_a=cba.per_sample_history(), d=d, cbd=cbd, rows_d=cbd.per_sample_history(), out=out,
                steps_a=cba.finish(summary=False), untouched=before == after)


def test_a_per_sample_recording_resumed_through_the_trainer_equals_the_uninterrupted_one(runs):
    a, d, ref, got, out = runs["a"], runs["d"], runs["rows_a"], runs["rows_d"], runs["out"]
    assert runs["untouched"]  # a resume only reads its checkpoint
    assert [r["global_step"] for r in runs["cbd"].finish(summary=False).meta["hf_trainer"]["resumed_from"]] == [3, 6]
    assert torch.equal(flat(d.model), flat(a.model))  # the Trainer itself resumed exactly
    # both streamed (resumable by default when checkpoints are saved), beside their step recordings
    assert ref.path == runs["cba"].recording_path + hf.PER_SAMPLE_SUFFIX and got.path == runs["cbd"].recording_path + hf.PER_SAMPLE_SUFFIX
    for history in (got, FirstEpochHistory.load(got.path)):
        assert history.complete and history.n_epochs == ref.n_epochs == 2 and history.lrs == ref.lrs
        assert (history.kind, history.codec, history.param_names) == ("all_epochs", "fp32", ["transformer.wte.weight", "transformer.wpe.weight"])
        # every sample once per epoch: the rows the crashed runs streamed after their checkpoints were dropped
        assert sum(c["steps"] for c in history.chunks) == 2 * N
        for e in range(2):
            assert torch.equal(history.epochs[e]["index"], torch.arange(N)) and torch.equal(ref.epochs[e]["index"], torch.arange(N))
            for i in range(N):
                assert torch.equal(history.row(e, i), ref.row(e, i)), (e, i)
        assert all(torch.equal(history.activations[k], ref.activations[k]) for k in ("index", "values"))
    strip = lambda info: {k: v for k, v in info.items() if k != "record_seconds"}  # noqa: E731
    assert strip(store.read(got.path, "FirstEpochHistory").info) == strip(store.read(ref.path, "FirstEpochHistory").info)
    # independent reference: the rows of the first step after the last resume (epoch 1) are each sample's gradient of
    # the model's own loss at checkpoint-6's weights, one unpadded sample at a time
    reference = transformers.GPT2LMHeadModel.from_pretrained(str(out / "checkpoint-6"))
    params, data = dict(reference.named_parameters()), _Texts()
    batch = runs["steps_a"].schedule["batches"][6]
    assert batch.numel() == 2 * BATCH
    for i in batch.tolist():
        reference.zero_grad()
        ids = data[i]["input_ids"][None]
        reference(input_ids=ids, labels=ids).loss.backward()
        expected = torch.cat([params[n].grad.reshape(-1) for n in got.param_names])
        torch.testing.assert_close(got.row(1, i), expected, rtol=1e-4, atol=1e-6)
    # checkpoint-3's copy: the unfinished recording of steps 0-2, rows equal to the uninterrupted run's
    saved = FirstEpochHistory.load(str(out / "checkpoint-3" / hf.PER_SAMPLE_DIR))
    first = torch.cat(runs["steps_a"].schedule["batches"][:3])
    assert not saved.complete and torch.equal(saved.epochs[0]["index"], torch.sort(first).values)
    assert all(torch.equal(saved.row(0, i), ref.row(0, i)) for i in first.tolist())
    # the methods: the same unlearned model from both
    results = [uf.unlearn(m, h, FORGET, runs["cba"].replay_set, None, method="first_epoch_ascent", calibrate=False).model
               for m, h in ((a.model, ref), (d.model, got))]
    assert torch.equal(flat(results[0]), flat(results[1])) and not torch.equal(flat(results[0]), flat(a.model))


def refused(out, checkpoint, match, per_sample=PER_SAMPLE):
    """A resume from `checkpoint` raises `match` before training, leaves the checkpoint's histories as they were and
    creates no recording."""
    before = (_content(checkpoint / hf.HISTORY_DIR),
              per_sample_content(checkpoint) if (checkpoint / hf.PER_SAMPLE_DIR).exists() else None)
    trainer = _trainer(out, **ARGS)
    hf.record(trainer, STEPS, per_sample=per_sample)
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert before == (_content(checkpoint / hf.HISTORY_DIR),
                      per_sample_content(checkpoint) if (checkpoint / hf.PER_SAMPLE_DIR).exists() else None)
    assert not (out / hf.RECORDING_DIR).exists()


def test_a_checkpoint_whose_per_sample_recording_does_not_match_is_refused_and_left_as_it_was(runs, tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(runs["out"] / "checkpoint-3", ckpt)
    # checkpoint-6's per-sample recording in checkpoint-3: saved at another step (it holds checkpoint-3's flush point
    # too, being the same recording continued, so the step is what tells)
    shutil.rmtree(ckpt / hf.PER_SAMPLE_DIR)
    shutil.copytree(runs["out"] / "checkpoint-6" / hf.PER_SAMPLE_DIR, ckpt / hf.PER_SAMPLE_DIR)
    refused(tmp_path, ckpt, r"resume: .*: the per-sample recording .* was saved at global step 6, the Trainer resumes at 3\. Nothing")
    shutil.rmtree(ckpt / hf.PER_SAMPLE_DIR)
    shutil.copytree(runs["out"] / "checkpoint-3" / hf.PER_SAMPLE_DIR, ckpt / hf.PER_SAMPLE_DIR)
    # weights modified in the checkpoint: no flush point of the per-sample recording matches them either
    from safetensors.torch import load_file, save_file

    weights = load_file(str(ckpt / "model.safetensors"))
    original = {k: v.clone() for k, v in weights.items()}
    name = next(n for n in weights if n.endswith("wpe.weight"))
    weights[name][0, 0] += 1e-3
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    refused(tmp_path, ckpt, r"restored weights' digest .*; the per-sample recording .*: model: its weights match none of the 1 flush points")
    save_file(original, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    # another per-sample policy than the one recorded
    other = uf.HistoryPolicy(kind="all_epochs", per_sample=True, params="embeddings", codec="int8", activations=True)
    refused(tmp_path, ckpt, r"policy: differs .*'codec': \('fp32', 'int8'\)", per_sample=other)
    # none (saved without per_sample=): the rows of the steps before it are missing
    shutil.rmtree(ckpt / hf.PER_SAMPLE_DIR)
    refused(tmp_path, ckpt, "holds no 'unlearn_per_sample_history'")
