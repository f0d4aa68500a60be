"""A recording streamed to disk (HistoryRecorder(..., path=)): chunks appended by a background writer, memory
bounded by a few chunks, a killed run loads up to its last chunk and resumes from a trainer checkpoint, and
the history it finishes equals one recorded in memory."""
import copy
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.history import flat_params
from unlearn_fast.methods import deltagrad, retrain

LOSS = torch.nn.functional.cross_entropy
N, BATCH = 96, 12


def make_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    return torch.utils.data.TensorDataset(X, y)


def new_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)


def order(epochs):
    gen = torch.Generator().manual_seed(1)
    perms = [torch.randperm(N, generator=gen) for _ in range(epochs)]
    return [perm[i : i + BATCH] for perm in perms for i in range(0, N, BATCH)]


def train(model, opt, rec, data, batches, start=0, stop=None, flush_at=()):
    for t in range(start, len(batches) if stop is None else stop):
        opt.zero_grad()
        x, y = data[batches[t]]
        LOSS(model(x), y).backward()
        rec.record(batches[t])
        opt.step()
        if t + 1 in flush_at:
            rec.flush()


def rows(history, key):
    return torch.stack([history.trajectory[key].row(t) for t in range(history.num_steps)])


@pytest.fixture(scope="module")
def in_memory():
    data, batches = make_data(), order(3)
    model, opt = new_run()
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="int8"))
    train(model, opt, rec, data, batches)
    return data, batches, model, rec.finish(data, LOSS)


def test_a_streamed_history_equals_the_one_recorded_in_memory(tmp_path, in_memory):
    data, batches, model_ref, ref = in_memory
    model, opt = new_run()
    path = str(tmp_path / "h")
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="int8"), path=path)
    rec.chunk_steps = 5  # 24 steps: chunks of 5, 5, 5, 5, 4
    train(model, opt, rec, data, batches)
    # the recorder holds at most the open chunk: every sealed one went to disk
    assert rec.batches == [] and len(rec._open["sizes"]) < 5
    history = rec.finish(data, LOSS)
    assert torch.equal(flat_params(model), flat_params(model_ref))
    assert history.chunk_steps == [5, 5, 5, 5, 4] and history.path == path
    for key in ("g",):
        assert torch.equal(rows(history, key), rows(ref, key))
    assert all(torch.equal(a, b) for a, b in zip(history.schedule["batches"], ref.schedule["batches"]))
    assert torch.equal(history.schedule["lrs"], ref.schedule["lrs"])
    # loaded again: the same rows, read chunk by chunk; retrain forgetting nothing replays the trained weights
    loaded = uf.GradientHistory.load(path)
    assert loaded.complete and loaded.recording_id is None
    assert torch.equal(rows(loaded, "g"), rows(ref, "g"))
    replay, _ = retrain.run(copy.deepcopy(model), loaded, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))


@pytest.mark.parametrize("how", ["linked", "cross-device", "save"])
def test_copies_of_a_streamed_history_share_its_chunks_only_when_asked(tmp_path, in_memory, how, monkeypatch):
    # a trainer checkpoint's copy of the recording links its files (store.link_copy): else each
    # checkpoint rewrites the whole recording; history.save(elsewhere) copies them (a copy that survives the original)
    from unlearn_fast import store

    data, batches, _, ref = in_memory
    model, opt = new_run()
    path = str(tmp_path / "h")
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="int8"), path=path)
    rec.chunk_steps = 5
    train(model, opt, rec, data, batches)
    rec.finish(data, LOSS)
    copy_path = str(tmp_path / "copy")
    if how == "save":
        uf.GradientHistory.load(path).save(copy_path)
    else:
        if how == "cross-device":  # another file system: os.link fails with EXDEV, and the chunks are copied
            def cross_device(*args, **kwargs):
                raise OSError(18, "Invalid cross-device link")
            monkeypatch.setattr(os, "link", cross_device)
        snap = store.read(path, "GradientHistory")
        store.link_copy(path, snap, copy_path, "GradientHistory", snap.info)
    objects = lambda p: {n: os.stat(os.path.join(p, "objects", n)).st_ino for n in os.listdir(os.path.join(p, "objects"))}
    src, dst = objects(path), objects(copy_path)
    shared = [n for n in dst if n in src and src[n] == dst[n]]
    assert len(shared) == (11 if how == "linked" else 0)  # the head (w0) and 5 chunks x (schedule, rows); the manifest is new
    # the original removed: the copy stands alone, with the same rows
    import shutil
    shutil.rmtree(path)
    copied = uf.GradientHistory.load(copy_path)
    assert torch.equal(rows(copied, "g"), rows(ref, "g"))


@pytest.mark.parametrize("flush_at", [(5,), (24,), (10, 10)], ids=["chunk-end", "last-step", "twice"])
def test_a_flush_with_no_step_since_the_last_chunk_loads_and_resumes(tmp_path, in_memory, flush_at):
    # a flush right where a chunk was sealed (or at the last step, before finish, or twice in a row) has no new
    # step: the empty chunk it appends must load (it was refused as "a chunk of 0 steps lacks its 0 rows")
    data, batches, model_ref, ref = in_memory
    model, opt = new_run()
    path = str(tmp_path / "h")
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="int8"), path=path)
    rec.chunk_steps = 5
    stop = flush_at[0]
    train(model, opt, rec, data, batches, stop=stop)
    for _ in flush_at:
        rec.flush()
    checkpoint = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    train(model, opt, rec, data, batches, start=stop)
    history = rec.finish(data, LOSS)
    assert history.num_steps == len(batches) and torch.equal(rows(uf.GradientHistory.load(path), "g"), rows(ref, "g"))
    if stop < len(batches):  # and a resume from the flushed point finishes to the same history
        other = str(tmp_path / "resumed")
        model2, opt2 = new_run()
        rec2 = uf.HistoryRecorder(model2, opt2, uf.HistoryPolicy(kind="full", codec="int8"), path=other)
        rec2.chunk_steps = 5
        train(model2, opt2, rec2, data, batches, stop=stop)
        for _ in flush_at:
            rec2.flush()
        rec2.close()
        model2.load_state_dict(checkpoint[0])
        opt2.load_state_dict(checkpoint[1])
        rec3 = uf.HistoryRecorder.resume(other, model2, opt2)
        train(model2, opt2, rec3, data, batches, start=stop)
        resumed = rec3.finish(data, LOSS)
        assert torch.equal(rows(resumed, "g"), rows(ref, "g"))


def test_deltagrad_reads_a_streamed_trajectory_like_an_in_memory_one(tmp_path):
    data, batches = make_data(), order(2)
    results = []
    for path in (None, str(tmp_path / "h")):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=path)
        rec.chunk_steps = 3
        train(model, opt, rec, data, batches)
        history = rec.finish(data, LOSS)
        if path is not None:
            history = uf.GradientHistory.load(path)
        out, stats = deltagrad.run(copy.deepcopy(model), history, torch.arange(0, N, 9), data, LOSS)
        results.append((flat_params(out), stats["approx_steps"]))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] > 0


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import unlearn_fast as uf
    from test_streaming import make_data, new_run, order, train
    data, batches = make_data(), order(3)
    model, opt = new_run()
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="int8"), path={path!r})
    rec.chunk_steps = 4
    train(model, opt, rec, data, batches, stop=10, flush_at=(10,))   # chunks of 4, 4 and a flushed 2
    torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, {ckpt!r})
    train(model, opt, rec, data, batches, start=10, stop=17)          # a chunk of 4 more, then 3 in the open chunk
    rec._writer.join()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_run_loads_up_to_its_last_chunk_and_resumes_from_a_checkpoint(tmp_path, in_memory):
    data, batches, model_ref, ref = in_memory
    path, ckpt = str(tmp_path / "h"), str(tmp_path / "ckpt.pt")
    script = KILLED_RUN.format(tests=os.path.dirname(__file__), path=path, ckpt=ckpt)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = uf.GradientHistory.load(path)
    assert not partial.complete and partial.num_steps == 14 and partial.chunk_steps == [4, 4, 2, 4]
    assert torch.equal(rows(partial, "g"), rows(ref, "g")[:14])
    # a method refuses a recording that did not finish, naming it
    model, opt = new_run()
    with pytest.raises(ValueError, match="did not finish"):
        uf.unlearn(model, partial, [0], data, LOSS, method="retrain", allow_unrecorded_model=True)
    # the run restarts from its checkpoint (step 10): weights that match no flush point are refused
    with pytest.raises(ValueError, match="model: its weights match none"):
        uf.HistoryRecorder.resume(path, model, opt)
    state = torch.load(ckpt)
    model.load_state_dict(state["model"])
    # another optimizer (here: other momentum) would extend the history with steps it did not take: refused, untouched
    with pytest.raises(ValueError, match="optimizer: torch.optim.sgd.SGD .* is not the recorded"):
        uf.HistoryRecorder.resume(path, model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9))
    assert uf.GradientHistory.load(path).num_steps == 14
    opt.load_state_dict(state["opt"])
    opt.param_groups[0]["lr"] = 0.1  # a scheduler's change since step 0: the history keeps the optimizer as recorded
    rec = uf.HistoryRecorder.resume(path, model, opt)
    assert rec.meta["optimizer"] == ref.meta["optimizer"]
    opt.param_groups[0]["lr"] = 0.2
    assert rec.num_steps == 10 and uf.GradientHistory.load(path).num_steps == 10  # the steps after the checkpoint are dropped
    train(model, opt, rec, data, batches, start=10)
    history = rec.finish(data, LOSS)
    # the resumed run equals the uninterrupted one: weights, schedule and every row
    assert torch.equal(flat_params(model), flat_params(model_ref))
    assert history.num_steps == ref.num_steps
    assert all(torch.equal(a, b) for a, b in zip(history.schedule["batches"], ref.schedule["batches"]))
    for key in ("g",):
        assert torch.equal(rows(history, key), rows(ref, key))
    with pytest.raises(ValueError, match="finished history"):
        uf.HistoryRecorder.resume(path, model, opt)


def streaming(path, epochs, stop, flush_at):
    data, batches = make_data(), order(epochs)
    model, opt = new_run()
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="fp32"), path=path)
    train(model, opt, rec, data, batches, stop=stop, flush_at=flush_at)
    return data, batches, model, opt, rec


def test_a_recording_still_streaming_cannot_be_resumed_alongside_it(tmp_path):
    # a trainer restarted while the old process still records: two recorders on one path would interleave their
    # chunks into a history of neither run; the second is refused and the first one's recording is untouched
    path = str(tmp_path / "h")
    data, batches, model, opt, rec = streaming(path, 2, 6, (4,))
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, rec, data, batches, start=6, stop=8)
    copy_model, copy_opt = new_run()
    copy_model.load_state_dict(state[0])
    copy_opt.load_state_dict(state[1])
    with pytest.raises(ValueError, match="another recorder is still streaming"):
        uf.HistoryRecorder.resume(path, copy_model, copy_opt)
    train(model, opt, rec, data, batches, start=8)
    history = rec.finish(data, LOSS)
    assert history.num_steps == len(batches)
    assert all(torch.equal(a, b) for a, b in zip(history.schedule["batches"], batches))
    with pytest.raises(ValueError, match="finished history"):  # (and the lock went with the recorder)
        uf.HistoryRecorder.resume(path, copy_model, copy_opt)


def test_a_closed_recording_can_be_resumed(tmp_path):
    path = str(tmp_path / "h")
    _, _, model, opt, rec = streaming(path, 1, 4, (4,))
    rec.close()
    rec = uf.HistoryRecorder.resume(path, model, opt)
    assert rec.num_steps == 4
    rec.close()


def test_a_history_directory_whose_tmp_is_a_file_is_refused_naming_it(tmp_path):
    data, batches = make_data(), order(1)
    model, opt = new_run()
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="fp32"))
    train(model, opt, rec, data, batches)
    history = rec.finish(data, LOSS)
    path = str(tmp_path / "h")
    history.save(path)
    os.rmdir(os.path.join(path, "tmp"))
    with open(os.path.join(path, "tmp"), "w") as f:
        f.write("not a directory")
    with pytest.raises(ValueError, match="tmp is not a directory"):
        uf.GradientHistory.load(path).save(path)


def flushed_and_resumed(path, policy, fresh, run, flush_at, end):
    """Steps [0, flush_at) streamed to `path` (run(t0, t1, model, opt, rec)), a flush, the recorder dropped as a killed
    run's would be, a fresh model and optimizer loaded from that point's state and the recording resumed to step `end`.
    Returns (model, recorder)."""
    model, opt = fresh()
    rec = uf.HistoryRecorder(model, opt, policy, path=path)
    run(0, flush_at, model, opt, rec)
    rec.flush()
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    rec.close()
    model, opt = fresh()
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    rec = uf.HistoryRecorder.resume(path, model, opt)
    run(flush_at, end, model, opt, rec)
    return model, rec


@pytest.mark.parametrize("feature", ["clipping", "autocast"])
def test_a_resume_goes_on_from_what_the_steps_before_its_flush_did(tmp_path, feature):
    # clipping active before the flush only (large features in the first steps' samples), or bfloat16 autocast on every
    # step: the resumed recorder must know it, or the finished history replays a run that did not happen
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(N, 6, generator=gen), torch.randint(0, 3, (N,), generator=gen)
    X[: N // 2] *= 10
    data = torch.utils.data.TensorDataset(X, y)
    perm = torch.Generator().manual_seed(1)
    batches = [torch.randperm(N // 2, generator=perm)[:BATCH] + (0 if t < 10 else N // 2) for t in range(20)]

    def run(t0, t1, model, opt, rec):
        for t in range(t0, t1):
            opt.zero_grad()
            with torch.autocast("cpu", torch.bfloat16, enabled=feature == "autocast"):
                loss = LOSS(model(X[batches[t]]), y[batches[t]])
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.85 if feature == "clipping" else 1e9)))
            rec.record(batches[t])
            opt.step()

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        return model, torch.optim.SGD(model.parameters(), lr=0.2)

    norms = []
    model, rec = flushed_and_resumed(str(tmp_path / "h"), uf.HistoryPolicy(kind="full"), fresh, run, 10, 20)
    history = rec.finish(data, LOSS)
    if feature == "clipping":
        clipped = sum(n > 0.85 for n in norms)
        assert clipped == sum(n > 0.85 for n in norms[:10]) > 0  # (so only the steps before the flush clipped)
        assert history.meta["recording"]["clip_max_norm"] == 0.85 and history.meta["recording"]["clipped_steps"] == clipped
    else:
        assert history.meta["recording"]["autocast"] == "bfloat16" and history.meta["recording"]["autocast_steps"] == 20
    replay, _ = retrain.run(copy.deepcopy(model), history, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model))


def test_an_edit_on_an_unmeasured_step_survives_a_resume(tmp_path):
    # clipping switched on at step 19 (off the recorder's audit grid, so not measured at backward) of a streamed minimal
    # recording, flushed at step 24 and resumed: the finished history keeps that step and the threshold that explains it
    from unlearn_fast.methods._common import clip_max_norm

    data = make_data()
    batches = [torch.arange(t * BATCH, (t + 1) * BATCH) % N for t in range(30)]

    def run(t0, t1, model, opt, rec):
        for t in range(t0, t1):
            opt.zero_grad()
            LOSS(model(data.tensors[0][batches[t]]), data.tensors[1][batches[t]]).backward()
            if t >= 19:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            rec.record(batches[t])
            opt.step()

    _, rec = flushed_and_resumed(str(tmp_path / "h"), uf.HistoryPolicy(kind="minimal"), new_run, run, 24, 30)
    history = rec.finish(data, LOSS)
    [(step, norm)] = history.meta["recording"]["unmeasured_edits"]
    assert step == 19 and norm <= 0.05 * (1 + 1e-6) and clip_max_norm(history) == 0.05


@pytest.mark.parametrize("stored", [b'{"accumulated_steps": 0, "clipped_steps": -1, "autocast_steps": 0}', b'{"clipped_steps": 2}',
                                    b'{"accumulated_steps": 0, "clipped_steps": 1, "autocast_steps": 0, "unmeasured_edits": [[12, 0.1]]}',
                                    b'{"accumulated_steps": 0, "clipped_steps": 1, "autocast_steps": 0, "unmeasured_edits": [["1", 0.1]]}',
                                    b'{"accumulated_steps": 0, "clipped_steps": 1, "autocast_steps": 0, "unmeasured_edits": [[1, -0.1]]}',
                                    b'{"accumulated_steps": 0, "clipped_steps": 1, "autocast_steps": 0, "unmeasured_edits": {"1": 0.1}}',
                                    b'{"accumulated_steps": 0, "clipped_steps": 99, "autocast_steps": 0}', b"[1, 2]", b"\xff{",
                                    b'{"accumulated_steps": 0, "clipped_steps": 1, "autocast_steps": 0, "clip_max_norm": "1"}',
                                    b'{"accumulated_steps": 0, "clipped_steps": 0, "autocast_steps": 3, "autocast": "os.system"}'])
def test_recorder_features_read_from_a_file_are_checked(stored):
    from unlearn_fast.recording import _features_of

    with pytest.raises(ValueError, match="malformed recorder features"):
        _features_of({"recording.features": torch.frombuffer(bytearray(stored), dtype=torch.uint8)}, 10, "p")


def test_recording_never_overwrites_a_history(tmp_path, in_memory):
    data, batches, _, ref = in_memory
    path = str(tmp_path / "h")
    ref.save(path)
    before = open(os.path.join(path, "CURRENT"), "rb").read()
    model, opt = new_run()
    with pytest.raises(ValueError, match="path: .* already holds a history"):
        uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=path)
    assert open(os.path.join(path, "CURRENT"), "rb").read() == before


def test_a_corrupted_chunk_is_a_value_error_naming_it(tmp_path, in_memory):
    data, batches, _, ref = in_memory
    path = str(tmp_path / "h")
    ref.save(path)
    history = uf.GradientHistory.load(path)
    part = history.trajectory["g"].parts[0][1].part["data"]
    fpath = os.path.join(path, "objects", part)
    raw = bytearray(open(fpath, "rb").read())
    raw[-1] ^= 1
    open(fpath, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=f"{part}.*corrupted"):
        history.trajectory["g"].row(0)
    os.truncate(fpath, 100)  # truncated: the same refusal
    with pytest.raises(ValueError, match="corrupted"):
        uf.GradientHistory.load(path).trajectory["g"].row(1)


def test_a_minimal_history_keeps_which_samples_were_trained_on_not_the_batch_order(tmp_path):
    data, batches = make_data(), order(1)[:-1]  # one epoch without its last batch: its samples were never trained on
    model, opt = new_run()
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal", rank=2))
    train(model, opt, rec, data, batches)
    history = rec.finish(data, LOSS)
    assert "batches" not in history.schedule
    expected = torch.zeros(N, dtype=torch.bool)
    expected[torch.cat(batches)] = True
    assert torch.equal(history.seen_mask(), expected) and int(expected.sum()) < N
    loaded = uf.GradientHistory.load(history.save(str(tmp_path / "h")))
    assert torch.equal(loaded.seen_mask(), expected) and "batches" not in loaded.schedule
    assert torch.equal(loaded.schedule["batch_sizes"], torch.full((len(batches),), BATCH))
    unseen = int(torch.nonzero(~expected)[0])
    with pytest.raises(ValueError, match="never appear"):
        uf.unlearn(model, loaded, [unseen], data, LOSS, method="retrain")
    # retrain from it draws batches of the recorded sizes (another batch order), and says so
    res = uf.unlearn(model, loaded, [0, 1], data, LOSS, method="retrain")
    assert res.stats["batch_order"].startswith("resampled") and res.stats["steps"] == len(batches)


def test_a_minimal_history_s_schedule_does_not_grow_with_steps(tmp_path):
    """Constant learning rate and batch size: the schedule is a few runs, whatever the number of steps."""
    import json

    data = make_data()
    sizes = {}
    for epochs in (1, 4):
        model, opt = new_run()
        rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal", rank=2))
        batches = order(epochs)
        train(model, opt, rec, data, batches)
        history = rec.finish(data, LOSS)
        path = history.save(str(tmp_path / f"h{epochs}"))
        pointer = json.loads(open(os.path.join(path, "CURRENT"), "rb").read().split(b"\n")[0])
        manifest = json.load(open(os.path.join(path, "objects", pointer["manifest"])))
        assert manifest["chunks"] == []
        sizes[epochs] = {name: entry["shape"] for name, entry in manifest["tensors"].items() if name.startswith("schedule.") and name != "schedule.w0"}
        loaded = uf.GradientHistory.load(path)
        assert torch.equal(loaded.schedule["lrs"], history.schedule["lrs"]) and loaded.num_steps == len(batches)
        assert torch.equal(loaded.schedule["batch_sizes"], torch.full((len(batches),), BATCH))
    assert sizes[1] == sizes[4]


def test_a_minimal_recording_resumes_with_its_checkpoints(tmp_path):
    """kind="minimal" streams its few checkpoints with the chunks: a resumed run keeps the same ones and finishes
    to the same summary inputs as an uninterrupted run."""
    data, batches = make_data(), order(6)  # 48 steps: checkpoints at powers of two and on a thinning grid
    runs = {}
    for resumed in (False, True):
        model, opt = new_run()
        path = str(tmp_path / f"h{resumed}")
        rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal", rank=2), path=path)
        rec.chunk_steps = 7
        if resumed:
            train(model, opt, rec, data, batches, stop=30, flush_at=(30,))
            state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
            train(model, opt, rec, data, batches, start=30, stop=37)
            rec.close()  # the run stops here (killed, say); it restarts from its step-30 checkpoint
            model, opt = new_run()
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            rec = uf.HistoryRecorder.resume(path, model, opt)
            assert rec.num_steps == 30
            train(model, opt, rec, data, batches, start=30)
        else:
            train(model, opt, rec, data, batches)
        runs[resumed] = (rec.checkpoints, rec.finish(data, LOSS), model)
    (ck_a, h_a, m_a), (ck_b, h_b, m_b) = runs[False], runs[True]
    assert [s for s, _ in ck_a] == [s for s, _ in ck_b] and len(ck_a) >= 4
    assert all(torch.equal(a.all(), b.all()) for (_, a), (_, b) in zip(ck_a, ck_b))
    assert torch.equal(flat_params(m_a), flat_params(m_b))
    for key, value in h_a.summary.items():
        other = h_b.summary[key]
        assert torch.equal(value.all(), other.all()) if hasattr(value, "all") and not isinstance(value, torch.Tensor) else torch.equal(value, other), key


@pytest.mark.parametrize("streamed", [False, True])
def test_a_snapshot_replays_the_steps_so_far_and_is_bound_to_the_weights_now(tmp_path, streamed):
    data, batches = make_data(), order(2)
    model, opt = new_run()
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"), path=str(tmp_path / "h") if streamed else None)
    rec.chunk_steps = 5
    train(model, opt, rec, data, batches, stop=13)
    snap = rec.snapshot(len(data))
    assert snap.complete and snap.num_steps == 13 and snap.trajectory is None
    assert snap.meta["final_digest"] == uf.history.weights_digest(model)
    res = uf.unlearn(model, snap, [], data, LOSS, method="retrain")  # bound to these weights: no allow_unrecorded_model needed
    replay, _ = retrain.run(copy.deepcopy(model), snap, torch.empty(0, dtype=torch.int64), data, LOSS)
    assert torch.equal(flat_params(replay), flat_params(model)) and torch.equal(flat_params(res.model), flat_params(model))
    train(model, opt, rec, data, batches, start=13)  # recording goes on
    assert rec.finish(data, LOSS).num_steps == len(batches)
