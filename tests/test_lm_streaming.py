"""A language-model per-sample history streamed to disk (FirstEpochRecorder(..., path=)): rows appended in chunks by
the background writer, equal bit for bit to the history recorded in memory, read back one chunk at a time (an
ascent reads only the chunks holding its forget samples' rows), a killed run loads up to its last chunk and is
refused by the methods, a damaged chunk is refused naming it, and no recording overwrites a history."""
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rapidfuzz")

import unlearn_fast as uf  # noqa: E402
from unlearn_fast import store  # noqa: E402
from unlearn_fast.history import HistoryPolicy  # noqa: E402
from unlearn_fast.lm import FirstEpochHistory, FirstEpochRecorder, TextDataset, build_gpt2, lm_loss  # noqa: E402
from unlearn_fast.lm.training import forward_logits  # noqa: E402

N, BATCH, CHUNK = 24, 6, 5  # chunks of 5 rows: not aligned to the batches, so batches are split across chunks
FORGET = [0, 1, 2, 3]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_data():
    gen = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    texts = [f"s{i} " + "".join(letters[int(k)] for k in torch.randint(0, 27, (14,), generator=gen)) for i in range(N)]
    return TextDataset(texts)


def schedule(epochs=2):
    """[(epoch, batch indices)]: shuffled epochs of BATCH samples; epoch 0 ends with a batch repeating two samples of
    its first batch (a sample seen twice in an epoch keeps the row of its last visit)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for epoch in range(epochs):
        batches = list(torch.randperm(N, generator=gen).split(BATCH))
        if epoch == 0:
            batches.append(batches[0][:2].clone())
        out += [(epoch, b) for b in batches]
    return out


def new_run():
    model = build_gpt2(n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=0)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def policy(kind="all_epochs", codec="int8", activations=True):
    return HistoryPolicy(kind=kind, codec=codec, params="all", per_sample=True, activations=activations, blocksize=256)


def train(model, opt, recorders, data, steps, stop=None):
    """Plain SGD on the LM loss; every recorder records each batch, end_epoch() after each epoch."""
    for t, (epoch, batch) in enumerate(steps[:stop]):
        opt.zero_grad()
        lm_loss(forward_logits(model, data.input_ids[batch]), data.labels[batch]).backward()
        for rec in recorders:
            rec.record(batch, data.input_ids[batch], data.labels[batch])
            if rec.path is not None:  # the recorder holds less than one chunk: every full one went to the writer
                assert rec._open_rows < rec.chunk_rows
        opt.step()
        if stop is None and (t + 1 == len(steps) or steps[t + 1][0] != epoch):
            for rec in recorders:
                rec.end_epoch()


def expected_chunks(steps):
    """Where each sample's kept row lies, from the schedule alone: {(epoch, sample): chunk}, with chunks of CHUNK rows
    filled in recording order and closed at the end of each epoch."""
    where, chunk, epoch_start = {}, 0, 0
    for e in sorted({e for e, _ in steps}):
        stream = torch.cat([b for ep, b in steps if ep == e]).tolist()
        for pos, i in enumerate(stream):
            where[(e, i)] = chunk + pos // CHUNK  # later visits overwrite earlier ones: the last row is kept
        chunk += -(-len(stream) // CHUNK)
    return where


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One training run recorded twice at once: in memory, and streamed to a directory in chunks of CHUNK rows."""
    data, steps = make_data(), schedule()
    model, opt = new_run()
    path = str(tmp_path_factory.mktemp("lm") / "h")
    memory = FirstEpochRecorder(model, opt, policy())
    streamed = FirstEpochRecorder(model, opt, policy(), path=path)
    streamed.chunk_rows = CHUNK
    train(model, opt, [memory, streamed], data, steps)
    return dict(data=data, steps=steps, model=model, path=path, memory=memory.finish(), streamed=streamed.finish())


def test_a_streamed_history_equals_the_one_recorded_in_memory(recorded):
    ref, path, steps = recorded["memory"], recorded["path"], recorded["steps"]
    loaded = FirstEpochHistory.load(path, model=recorded["model"])
    for history in (recorded["streamed"], loaded):
        assert history.complete and history.n_epochs == ref.n_epochs == 2 and history.lrs == ref.lrs == [0.05, 0.05]
        assert [c["steps"] for c in history.chunks] == [5, 5, 5, 5, 5, 1, 5, 5, 5, 5, 4]  # epoch 0: 26 rows, epoch 1: 24
        assert history.bytes_per_sample() == ref.bytes_per_sample() and history.total_bytes() == ref.total_bytes()
        for e in range(2):
            assert torch.equal(history.epochs[e]["index"], ref.epochs[e]["index"]) and torch.equal(ref.epochs[e]["index"], torch.arange(N))
            for i in range(N):
                assert torch.equal(history.row(e, i), ref.row(e, i))
        assert all(torch.equal(history.activations[k], ref.activations[k]) for k in ("index", "values"))
    # the stored codes and scales themselves, read from the store chunk by chunk: each kept row of the in-memory
    # history is in the chunk the schedule puts it in, bit for bit
    where, matched = expected_chunks(steps), set()
    snap = store.read(path, "FirstEpochHistory")
    for j, chunk in enumerate(snap.chunks):
        head = store.read_part(path, chunk["parts"]["index"], path)
        rows = store.read_part(path, chunk["parts"]["rows"], path)
        e = int(head["epoch"][0])
        for r, i in enumerate(head["index"].tolist()):
            if where[(e, i)] == j and (e, i) not in matched:
                matched.add((e, i))
                assert torch.equal(rows["codes"][r], ref.epochs[e]["codes"][i]) and torch.equal(rows["scales"][r], ref.epochs[e]["scales"][i])
    assert len(matched) == 2 * N
    # copied to another directory: the chunks come along (verified), and load the same rows without the original
    other = str(os.path.join(os.path.dirname(path), "copy"))
    loaded.save(other)
    copied = FirstEpochHistory.load(other)
    assert copied.complete and [c["parts"]["rows"]["data"] for c in copied.chunks] == [c["parts"]["rows"]["data"] for c in loaded.chunks]
    assert all(torch.equal(copied.row(1, i), ref.row(1, i)) for i in (0, 11, N - 1))


def test_ascent_reads_only_the_chunks_holding_the_forget_rows_and_moves_the_model_as_in_memory(recorded):
    ref, data, model = recorded["memory"], recorded["data"], recorded["model"]
    loaded = FirstEpochHistory.load(recorded["path"])
    assert loaded.chunks_read == []  # a load reads the small index parts only
    results = [uf.unlearn(model, h, FORGET, data, None, method="first_epoch_ascent", calibrate=False) for h in (ref, loaded)]
    a, b = (torch.cat([p.detach().reshape(-1) for p in r.model.parameters()]) for r in results)
    assert torch.equal(a, b) and not torch.equal(a, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    where = expected_chunks(recorded["steps"])
    holding = sorted({where[(e, i)] for e in range(2) for i in FORGET})
    assert len(holding) < len(loaded.chunks) and sorted(loaded.chunks_read) == holding  # each once, no other chunk
    # the fisher retain guard reads many retain rows one sample at a time: the same bits as in memory, with the row
    # cache smaller than them (rows gathered in batches of 3, evicted, read again)
    loaded = FirstEpochHistory.load(recorded["path"])
    loaded.cache_bytes = 3 * loaded.bytes_per_sample()["stored"]
    results = [uf.unlearn(model, h, FORGET, data, None, method="first_epoch_ascent", calibrate=False, retain_guard="fisher") for h in (ref, loaded)]
    a, b = (torch.cat([p.detach().reshape(-1) for p in r.model.parameters()]) for r in results)
    assert torch.equal(a, b) and results[1].stats["retain_guard_rows"] > 3
    assert len(loaded._row_cache) <= 3
    # a sample asked for twice in one call counts twice, across the batches of a one-row cache too
    loaded.cache_bytes = 1
    for wanted in ([5, 5, 7], [7, 2, 5, 2]):
        expected = ref.accumulate_(torch.zeros(ref.numel), wanted, 0.5)
        assert torch.equal(loaded.accumulate_(torch.zeros(ref.numel), wanted, 0.5), expected)
    assert len(loaded._row_cache) == 0 and loaded._cached_bytes == 0


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_lm_streaming import CHUNK, make_data, new_run, policy, schedule, train
    from unlearn_fast.lm import FirstEpochRecorder
    data, steps = make_data(), schedule()
    model, opt = new_run()
    rec = FirstEpochRecorder(model, opt, policy(), path={path!r})
    rec.chunk_rows = CHUNK
    train(model, opt, [rec], data, steps, stop=3)  # 18 rows: chunks of 5, 5, 5 handed to the writer, 3 rows open
    rec._writer.join()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_recording_loads_up_to_its_last_chunk_and_methods_refuse_it(tmp_path, recorded):
    data, steps = recorded["data"], recorded["steps"]
    path = str(tmp_path / "h")
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN.format(tests=os.path.dirname(__file__), path=path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = FirstEpochHistory.load(path)
    assert not partial.complete and [c["steps"] for c in partial.chunks] == [5, 5, 5] and partial.lrs == [0.05]
    # reference: the same three batches recorded in memory here
    model, opt = new_run()
    memory = FirstEpochRecorder(model, opt, policy())
    train(model, opt, [memory], data, steps, stop=3)
    ref = memory.finish()
    streamed = torch.cat([b for _, b in steps[:3]])[:15]
    assert torch.equal(partial.epochs[0]["index"], torch.sort(streamed).values) and partial.n_epochs == 1
    for i in streamed.tolist():
        assert torch.equal(partial.row(0, i), ref.row(0, i))
    with pytest.raises(ValueError, match=f"did not finish .*15 rows in 3 chunks .*{path}"):
        uf.unlearn(recorded["model"], partial, FORGET, data, None, method="first_epoch_ascent", calibrate=False)
    with pytest.raises(ValueError, match="did not finish"):  # also when saved elsewhere: still the same unfinished recording
        FirstEpochHistory.load(partial.save(str(tmp_path / "copy"))).check_params(model, partial.param_names)
    # and nothing records over it
    with pytest.raises(ValueError, match="already holds a history"):
        FirstEpochRecorder(model, opt, policy(), path=path)


def damage(fpath, data):
    """Replace an object's file with `data` (a new file, not a write in place: a copied history may share the object's
    file with the one it was copied from, by hard link)."""
    with open(fpath + ".damaged", "wb") as f:
        f.write(bytes(data))
    os.replace(fpath + ".damaged", fpath)


def test_a_corrupted_chunk_is_a_value_error_naming_it(tmp_path, recorded):
    ref = recorded["memory"]
    path = str(tmp_path / "h")
    FirstEpochHistory.load(recorded["path"]).save(path)  # a copy to damage
    history = FirstEpochHistory.load(path)
    where = expected_chunks(recorded["steps"])
    j = where[(1, 0)]
    digest = history.chunks[j]["parts"]["rows"]["data"]
    fpath = os.path.join(path, "objects", digest)
    raw = bytearray(open(fpath, "rb").read())
    raw[-1] ^= 1
    damage(fpath, raw)
    with pytest.raises(ValueError, match=f"{digest}.*corrupted"):
        history.row(1, 0)
    other = next(i for i in range(N) if where[(1, i)] != j)  # a row in another chunk still reads
    assert torch.equal(history.row(1, other), ref.row(1, other))
    damage(fpath, raw[:100])
    with pytest.raises(ValueError, match=f"{digest}.*corrupted"):
        FirstEpochHistory.load(path).row(1, 0)
    # an index part is read at load: a damaged one refuses the load, naming it
    index = history.chunks[0]["parts"]["index"]["data"]
    ipath = os.path.join(path, "objects", index)
    raw = bytearray(open(ipath, "rb").read())
    raw[-1] ^= 1
    damage(ipath, raw)
    with pytest.raises(ValueError, match=f"{index}.*corrupted"):
        FirstEpochHistory.load(path)
    # a crafted version, every checksum right, whose chunk claims a row more than its tensors hold
    from test_storage import forge, read_current

    path = str(tmp_path / "crafted")
    FirstEpochHistory.load(recorded["path"]).save(path)
    _, manifest = read_current(path)
    manifest["chunks"][2]["steps"] += 1
    forge(path, manifest)
    with pytest.raises(ValueError, match="chunk 2 .* does not hold 6 rows"):
        FirstEpochHistory.load(path)


def test_recording_never_overwrites_a_history(tmp_path, recorded):
    model, opt = new_run()
    for name, existing in (("memory", recorded["memory"]), ("streamed", FirstEpochHistory.load(recorded["path"]))):
        path = str(tmp_path / name)
        existing.save(path)
        before = open(os.path.join(path, "CURRENT"), "rb").read()
        with pytest.raises(ValueError, match="path: .* already holds a history"):
            FirstEpochRecorder(model, opt, policy(), path=path)
        assert open(os.path.join(path, "CURRENT"), "rb").read() == before
        assert FirstEpochHistory.load(path).complete
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a history")
    with pytest.raises(ValueError, match="holds other files"):
        FirstEpochRecorder(model, opt, policy(), path=str(other))
    assert os.listdir(other) == ["notes.txt"]


def test_a_first_epoch_recording_streams_epoch_zero_only_and_its_manifest_says_so(tmp_path):
    data, steps = make_data(), schedule()
    model, opt = new_run()
    path = str(tmp_path / "h")
    rec = FirstEpochRecorder(model, opt, policy("first_epoch", "fp32", activations=False), path=path)
    rec.chunk_rows = 100  # one chunk: epoch 0 ends it
    train(model, opt, [rec], data, steps)
    history = rec.finish()
    assert [c["steps"] for c in history.chunks] == [N + 2] and history.n_epochs == 1 and history.activations is None
    pointer = json.loads(open(os.path.join(path, "CURRENT"), "rb").read().split(b"\n")[0])
    manifest = json.load(open(os.path.join(path, "objects", pointer["manifest"])))
    assert "recording" not in manifest["info"] and manifest["info"]["n_epochs"] == 1 and manifest["tensors"] == {}
    assert set(manifest["chunks"][0]["parts"]) == {"index", "rows"}
    with pytest.raises(RuntimeError, match="already called"):
        rec.finish()
    # fp32 rows are the per-sample gradients at the weights each batch saw: the two samples epoch 0 saw twice keep
    # the rows of their second visit (the weights after the first four steps)
    t = next(t for t, (e, b) in enumerate(steps) if e == 0 and len(b) == 2)
    last = steps[t][1]
    model2, opt2 = new_run()
    train(model2, opt2, [], data, steps, stop=t)
    expected = uf.lm.per_sample_gradients(model2, history.param_names, data.input_ids[last], data.labels[last])
    first = uf.lm.per_sample_gradients(new_run()[0], history.param_names, data.input_ids[last], data.labels[last])
    for k, i in enumerate(last.tolist()):
        assert torch.equal(history.row(0, i), expected[k]) and not torch.equal(expected[k], first[k])


# ----------------------------------------------------------------------------- resume from a trainer checkpoint
def run_steps(model, opt, rec, steps, data, start, stop, flush_after=None, epoch_ends=True):
    """Steps start..stop-1 of the schedule, SGD on the LM loss, rec recording each batch. flush_after=t: after step t's
    optimizer step, flush() and take a trainer checkpoint (model and optimizer state) before end_epoch(), as the HF
    Trainer saves before on_epoch_end; returned. epoch_ends=False: no end_epoch() after the last step run."""
    checkpoint = None
    for t in range(start, stop):
        epoch, batch = steps[t]
        opt.zero_grad()
        lm_loss(forward_logits(model, data.input_ids[batch]), data.labels[batch]).backward()
        rec.record(batch, data.input_ids[batch], data.labels[batch])
        opt.step()
        if t == flush_after:
            rec.flush()
            checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": copy.deepcopy(opt.state_dict())}
        if (t + 1 == len(steps) or steps[t + 1][0] != epoch) and (epoch_ends or t + 1 < stop):
            rec.end_epoch()
    return checkpoint


def restored(checkpoint):
    """A fresh model and optimizer holding a checkpoint's state (a new process resuming)."""
    model, opt = new_run()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    return model, opt


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


EPOCH0_END = 4  # the schedule's step 4 is epoch 0's last (4 batches of 6, then one of 2)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, recorded):
    """The run of `recorded`, stopped twice and resumed from its checkpoints, streamed in chunks of CHUNK rows:
    run 1 flushes after step 1 (mid epoch 0: 12 rows, 2 chunks written and 2 rows open) and goes on to step 6 (into
    epoch 1) before it stops; run 2 resumes there, flushes after step 4 (epoch 0's last step, before end_epoch(),
    so training continues in epoch 1) and goes on to step 7; run 3 resumes there with epoch=1 and finishes."""
    data, steps = recorded["data"], recorded["steps"]
    path = str(tmp_path_factory.mktemp("resume") / "h")
    model, opt = new_run()
    rec = FirstEpochRecorder(model, opt, policy(), path=path)
    rec.chunk_rows = CHUNK
    first = run_steps(model, opt, rec, steps, data, 0, 7, flush_after=1)
    rec.close()  # (the open rows of step 6 are written too: more chunks after the mark to drop)
    chunks_1 = [(c["steps"], c["mark"] is not None) for c in FirstEpochHistory.load(path).chunks]
    model, opt = restored(first)
    rec = FirstEpochRecorder.resume(path, model, opt)
    rec.chunk_rows = CHUNK
    state_2 = dict(epoch=rec.epoch, rows=rec.rows, lrs=list(rec.lrs))
    second = run_steps(model, opt, rec, steps, data, 2, 8, flush_after=EPOCH0_END)
    rec.close()
    model, opt = restored(second)
    rec = FirstEpochRecorder.resume(path, model, opt, epoch=1)
    rec.chunk_rows = CHUNK
    state_3 = dict(epoch=rec.epoch, rows=rec.rows, lrs=list(rec.lrs))
    run_steps(model, opt, rec, steps, data, EPOCH0_END + 1, len(steps))
    return dict(path=path, model=model, history=rec.finish(), chunks_1=chunks_1, state_2=state_2, state_3=state_3)


def test_a_recording_resumed_from_trainer_checkpoints_equals_the_uninterrupted_one(recorded, resumed):
    ref, data, steps = recorded["memory"], recorded["data"], recorded["steps"]
    # run 1 streamed chunks after its flush (rows of steps 2-6), which the resume drops: 12 rows, then 5 + 5 + ...
    assert resumed["chunks_1"][:3] == [(5, False), (5, False), (2, True)] and sum(n for n, _ in resumed["chunks_1"]) == 6 * BATCH + 2
    assert resumed["state_2"] == {"epoch": 0, "rows": 2 * BATCH, "lrs": [0.05]}
    assert resumed["state_3"] == {"epoch": 1, "rows": 4 * BATCH + 2, "lrs": [0.05]}  # epoch 0 whole: 26 rows
    # the trainer resumed exactly: the same final weights as the uninterrupted run
    assert torch.equal(flat(resumed["model"]), flat(recorded["model"]))
    for history in (resumed["history"], FirstEpochHistory.load(resumed["path"], model=resumed["model"])):
        assert history.complete and (history.kind, history.codec, history.blocksize) == (ref.kind, ref.codec, ref.blocksize)
        assert (history.param_names, history.shapes, history.dtypes) == (ref.param_names, ref.shapes, ref.dtypes)
        assert history.n_epochs == ref.n_epochs == 2 and history.lrs == ref.lrs == [0.05, 0.05]
        # every streamed row is one the schedule recorded once, the dropped chunks gone: 26 + 24 rows, epoch 0's in
        # chunks cut short by the flushes (marked), epoch 1's from a fresh chunk
        assert [(c["steps"], c["mark"] is not None) for c in history.chunks] == [
            (5, False), (5, False), (2, True), (5, False), (5, False), (4, True), (5, False), (5, False), (5, False), (5, False), (4, False)]
        for e in range(2):
            assert torch.equal(history.epochs[e]["index"], ref.epochs[e]["index"])
            for i in range(N):
                assert torch.equal(history.row(e, i), ref.row(e, i)), (e, i)
        assert all(torch.equal(history.activations[k], ref.activations[k]) for k in ("index", "values"))
    # the stored facts as well, but the recording time
    info = {k: v for k, v in store.read(resumed["path"], "FirstEpochHistory").info.items() if k != "record_seconds"}
    assert info == {k: v for k, v in store.read(recorded["path"], "FirstEpochHistory").info.items() if k != "record_seconds"}
    # the methods give the same model from both, bit for bit (fixed-scale ascent, and the fisher guard over retain rows)
    for options in ({}, {"retain_guard": "fisher", "epochs": [1]}):
        a, b = (flat(uf.unlearn(recorded["model"], h, FORGET, data, None, method="first_epoch_ascent", calibrate=False, **options).model)
                for h in (ref, FirstEpochHistory.load(resumed["path"])))
        assert torch.equal(a, b) and not torch.equal(a, flat(recorded["model"]))


def test_a_flush_after_end_epoch_marks_a_chunk_of_no_rows_and_the_resume_continues_in_the_next_epoch(tmp_path, recorded):
    """kind="first_epoch": a checkpoint after end_epoch() of epoch 0 (nothing open: the flush writes a chunk of no rows,
    carrying the mark and epoch 1); resumed there, epoch 1 is not recorded and epoch 0's rows are the uninterrupted run's."""
    ref, data, steps = recorded["memory"], recorded["data"], recorded["steps"]
    path = str(tmp_path / "h")
    model, opt = new_run()
    rec = FirstEpochRecorder(model, opt, policy("first_epoch"), path=path)
    rec.chunk_rows = CHUNK
    run_steps(model, opt, rec, steps, data, 0, EPOCH0_END + 1)  # epoch 0, ended
    rec.flush()
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": copy.deepcopy(opt.state_dict())}
    run_steps(model, opt, rec, steps, data, EPOCH0_END + 1, EPOCH0_END + 3)
    rec.close()
    chunks = FirstEpochHistory.load(path).chunks
    assert [(c["steps"], c["mark"] is not None) for c in chunks] == [(5, False)] * 5 + [(1, False), (0, True)]
    model, opt = restored(checkpoint)
    rec = FirstEpochRecorder.resume(path, model, opt)
    assert (rec.epoch, rec.rows, rec.lrs) == (1, 4 * BATCH + 2, [0.05])
    run_steps(model, opt, rec, steps, data, EPOCH0_END + 1, len(steps))
    history = rec.finish()
    assert torch.equal(flat(model), flat(recorded["model"]))
    assert history.complete and history.n_epochs == 1 and history.lrs == [0.05] and len(history.chunks) == 7
    assert torch.equal(history.epochs[0]["index"], ref.epochs[0]["index"])
    assert all(torch.equal(history.row(0, i), ref.row(0, i)) for i in range(N))
    assert all(torch.equal(history.activations[k], ref.activations[k]) for k in ("index", "values"))


def test_resume_refuses_what_does_not_match_naming_it_and_leaves_the_recording_as_it_was(tmp_path, recorded):
    data, steps = recorded["data"], recorded["steps"]
    path = str(tmp_path / "h")
    model, opt = new_run()
    rec = FirstEpochRecorder(model, opt, policy(), path=path)
    rec.chunk_rows = CHUNK
    checkpoint = run_steps(model, opt, rec, steps, data, 0, 3, flush_after=1)  # then step 2: the stopped run's weights
    rec.close()
    with pytest.raises(RuntimeError, match="flush"):
        rec.flush()
    current = open(os.path.join(path, "CURRENT"), "rb").read()

    def refused(match, model, **kwargs):
        with pytest.raises(ValueError, match=match):
            FirstEpochRecorder.resume(path, model, opt, **kwargs)
        assert open(os.path.join(path, "CURRENT"), "rb").read() == current

    refused(r"model: the recording .* another model \(recorded parameter .* vs model parameter .*; 16 recorded vs 28 model",
            build_gpt2(n_layer=2, n_embd=16, n_head=2, n_positions=32, seed=0))
    # weights of no flush point: the initial ones, the stopped run's (a step past the flush), the checkpoint's changed
    refused("model: its weights match none of the 1 flush points", new_run()[0])
    refused("model: its weights match none of the 1 flush points", model)
    changed, _ = restored(checkpoint)
    with torch.no_grad():
        changed.transformer.wpe.weight[0, 0] += 1e-3
    refused("model: its weights match none", changed)
    at, _ = restored(checkpoint)
    refused(r"policy: differs .* \(recorded, now\): \{'codec': \('int8', 'fp32'\)\}", at, policy=policy(codec="fp32"))
    refused(r"policy: differs .*\{'activations': \(True, False\)\}", at, policy=policy(activations=False))
    refused(r"policy: differs .*\{'kind': \('all_epochs', 'first_epoch'\)\}", at, policy=policy("first_epoch"))
    refused("policy: a HistoryPolicy", at, policy="all")
    refused("epoch: .* flushed in epoch 0; it continues there or later, got -1", at, epoch=-1)
    with pytest.raises(ValueError, match="path: .* holds a finished history"):
        FirstEpochRecorder.resume(recorded["path"], recorded["model"], opt)
    with pytest.raises(ValueError, match="holds no history"):
        FirstEpochRecorder.resume(str(tmp_path / "nothing"), at, opt)
    # untouched: the checkpoint's model still resumes it (the steps after the flush dropped), with the policy given too
    rec = FirstEpochRecorder.resume(path, at, restored(checkpoint)[1], policy=policy())
    assert (rec.epoch, rec.rows) == (0, 2 * BATCH) and [c["steps"] for c in FirstEpochHistory.load(path).chunks] == [5, 5, 2]
    rec.close()
    memory = FirstEpochRecorder(at, opt, policy())
    memory.flush()  # (no path: nothing to make durable)
