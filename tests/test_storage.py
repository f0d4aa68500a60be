"""History storage (store.py, docs/storage.md): round trips, crashes, concurrency, hostile files, optimizer allow-list.

The on-disk format is re-implemented here with hashlib/json (read_current, forge) as an independent
reference: tests parse and craft histories the way an attacker or another tool would.
"""
import copy
import glob
import hashlib
import io
import json
import os
import pickle
import random
import signal
import sys
import time

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast import store
from unlearn_fast.history import flat_params
from unlearn_fast.methods.retrain import build_optimizer

LOSS = F.cross_entropy


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def record(kind, seed, optimizer_cls=torch.optim.SGD, n=48, batch=12, epochs=2):
    gen = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)
    data = torch.utils.data.TensorDataset(X, y)
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 3).double()
    opt = optimizer_cls(model.parameters(), lr=0.2, momentum=0.9)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind=kind, codec="int8" if kind == "full" else None, rank=2))
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(0, n, batch):
            idx = order[b : b + batch]
            opt.zero_grad()
            LOSS(model(X[idx]), y[idx]).backward()
            rec.record(idx)
            opt.step()
    return data, model, rec.finish(data, LOSS)


@pytest.fixture(scope="module")
def recorded(one_thread):
    a = record("full", 0)
    b = record("minimal", 1)
    return {"full": a, "minimal": b}


def fingerprint(history):
    """Everything a history holds, as one sha256: equal fingerprints mean equal histories."""
    h = hashlib.sha256(json.dumps([history.meta, history.requests], sort_keys=True).encode())

    def add(name, value):
        if isinstance(value, uf.history.ChunkedRows):  # stored in chunks or not, the same rows are the same history
            value = uf.history.EncodedRows.cat([value._part(j) for j, (n, _) in enumerate(value.parts) if n])
        if isinstance(value, uf.history.EncodedRows):
            h.update(json.dumps(value.meta()).encode())
            for k in sorted(value.tensors):
                add(f"{name}.{k}", value.tensors[k])
        elif isinstance(value, torch.Tensor):
            h.update(f"{name}{value.dtype}{list(value.shape)}".encode())
            h.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                add(f"{name}[{i}]", v)

    for section in ("schedule", "trajectory", "summary"):
        for key, value in sorted((getattr(history, section) or {}).items()):
            add(f"{section}.{key}", value)
    return h.hexdigest()


def fresh(history):
    """A copy of a shared history with its own empty request log, saved nowhere yet."""
    h = copy.copy(history)
    h.requests, h.path = [], None
    return h


# ----------------------------------------------------------------------------- the format, read and forged independently
def read_current(path):
    raw = open(os.path.join(path, "CURRENT"), "rb").read()
    body, checksum = raw[:-1].split(b"\n")
    assert hashlib.sha256(body).hexdigest().encode() == checksum and raw.endswith(b"\n")
    pointer = json.loads(body)
    manifest_bytes = open(os.path.join(path, "objects", pointer["manifest"]), "rb").read()
    return pointer, json.loads(manifest_bytes)


def put(path, data):
    digest = hashlib.sha256(data).hexdigest()
    open(os.path.join(path, "objects", digest), "wb").write(data)
    return digest


def forge(path, manifest, data=None, raw=None):
    """Make `manifest` (with `data` bytes as its data object; or the manifest's own bytes `raw`) current, with every
    checksum right: what an attacker who edits a history file by file would produce."""
    if data is not None:
        manifest = dict(manifest, data=put(path, data))
    digest = put(path, json.dumps(manifest).encode() if raw is None else raw)
    body = json.dumps({"format": "unlearn_fast.store", "format_version": 2, "manifest": digest}).encode()
    open(os.path.join(path, "CURRENT"), "wb").write(body + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n")


def leftovers(path):
    """Files besides the current version's objects, CURRENT and LOCK."""
    pointer, manifest = read_current(path)
    extra = set(os.listdir(path)) - {"CURRENT", "LOCK", "objects", "tmp"}
    named = {pointer["manifest"], manifest["data"], *(part["data"] for chunk in manifest.get("chunks", ()) for part in chunk["parts"].values())}
    extra |= {f"objects/{n}" for n in os.listdir(os.path.join(path, "objects"))} - {f"objects/{n}" for n in named}
    extra |= {f"tmp/{n}" for n in os.listdir(os.path.join(path, "tmp"))}
    return sorted(extra)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["full", "minimal"])
def test_round_trip_keeps_every_tensor_meta_and_request(tmp_path, recorded, kind):
    data, model, history = recorded[kind]
    history = fresh(history)
    history.meta = dict(history.meta, note={"by": "a user", "values": [1, 2.5, None, True]})  # any JSON-able meta is kept
    history.append_request([3, 1], "retrain", "cd" * 32)
    path = str(tmp_path / "h")
    assert history.save(path) == path and history.path == path
    loaded = uf.GradientHistory.load(path)
    assert fingerprint(loaded) == fingerprint(history)
    assert loaded.meta == json.loads(json.dumps(history.meta)) and loaded.requests == [{"forget": [3, 1], "method": "retrain", "model_digest": "cd" * 32}]
    assert loaded.path == path
    pointer, manifest = read_current(path)
    assert manifest["format_version"] == 4 and manifest["kind"] == "GradientHistory"
    assert os.listdir(tmp_path) == ["h"]
    if kind == "full":
        forget = [0, 5, 7]
        a = uf.unlearn(model, history, forget, data, LOSS, method="retrain").model
        b = uf.unlearn(model, loaded, forget, data, LOSS, method="retrain").model
        assert torch.equal(flat_params(a), flat_params(b))


def lm_histories():
    """Two small FirstEpochHistory objects made directly (no transformers: building a GPT-2 costs seconds):
    int8 rows of the first epoch, and fp32 rows of two epochs with activations."""
    from unlearn_fast.lm import FirstEpochHistory

    gen = torch.Generator().manual_seed(0)
    names, shapes, dtypes = ["wte.weight", "wpe.weight"], [(10, 4), (6, 4)], ["float32", "float32"]
    rows = [torch.randn(5, 64, generator=gen) for _ in range(2)]
    codes, scales = uf.ops.quantize_rows(rows[0], 32, 8)
    int8 = FirstEpochHistory("first_epoch", "int8", 32, names, shapes, dtypes, [{"index": torch.arange(5), "codes": codes, "scales": scales}], [0.01], None, 1.5)
    epochs = [{"index": torch.tensor([0, 2, 3, 5, 9]), "values": r} for r in rows]
    activations = {"index": torch.arange(5), "values": torch.randn(5, 4, generator=gen)}
    fp32 = FirstEpochHistory("all_epochs", "fp32", 4096, names, shapes, dtypes, epochs, [0.01, 0.005], activations)
    return int8, fp32


def test_lm_history_round_trip_and_bit_flips(tmp_path):
    from unlearn_fast.lm import FirstEpochHistory

    model = torch.nn.Module()
    model.wte, model.wpe = torch.nn.Embedding(10, 4), torch.nn.Embedding(6, 4)
    for i, history in enumerate(lm_histories()):
        path = str(tmp_path / f"lm{i}")
        assert history.save(path) == path
        loaded = FirstEpochHistory.load(path, model=model)
        fields = ("kind", "codec", "blocksize", "param_names", "shapes", "dtypes", "lrs", "record_seconds")
        assert all(getattr(loaded, f) == getattr(history, f) for f in fields)
        assert len(loaded.epochs) == len(history.epochs)
        for e, rec in enumerate(history.epochs):
            assert set(loaded.epochs[e]) == set(rec) and all(torch.equal(loaded.epochs[e][k], t) for k, t in rec.items())
        assert (loaded.activations is None) == (history.activations is None)
        for k, t in (history.activations or {}).items():
            assert torch.equal(loaded.activations[k], t)
    model.wpe = torch.nn.Embedding(7, 4)
    with pytest.raises(ValueError, match="wpe.weight was recorded with shape"):
        FirstEpochHistory.load(path, model=model)
    # every single-bit flip of the int8 history's pointer and of its manifest is refused
    path = str(tmp_path / "lm0")
    assert_every_flip_refused(path, lambda: FirstEpochHistory.load(path), manifest_flips=None)
    with pytest.raises(ValueError, match="GradientHistory"):  # a history of the other class is named, not misread
        uf.GradientHistory.load(path)
    # a crafted version (checksums right) whose int8 rows are one code short
    _, manifest = read_current(path)
    tensors = safetensors.torch.load(open(os.path.join(path, "objects", manifest["data"]), "rb").read())
    tensors["epoch0.codes"] = tensors["epoch0.codes"][:, :-1].clone()
    entries = dict(manifest["tensors"], **{"epoch0.codes": {"dtype": "int8", "shape": list(tensors["epoch0.codes"].shape)}})
    forge(path, dict(manifest, tensors=entries), data=safetensors.torch.save(tensors))
    with pytest.raises(ValueError, match="tensors of epoch 0 .* do not fit 64 recorded values"):
        FirstEpochHistory.load(path)
    single = tmp_path / "old.uf"
    single.write_bytes(b"format-1 single file")
    with pytest.raises(ValueError, match="not a history directory"):
        FirstEpochHistory.load(single)


# ----------------------------------------------------------------------------- damaged and hostile files
def flip_positions(path, manifest_flips, seed=0):
    pointer, _ = read_current(path)
    rng = random.Random(seed)
    current = os.path.join(path, "CURRENT")
    manifest = os.path.join(path, "objects", pointer["manifest"])
    positions = [(current, bit) for bit in range(8 * os.path.getsize(current))]
    bits = 8 * os.path.getsize(manifest)
    positions += [(manifest, bit) for bit in (range(bits) if manifest_flips is None else [rng.randrange(bits) for _ in range(manifest_flips)])]
    return positions


def assert_every_flip_refused(path, load, manifest_flips):
    for fpath, bit in flip_positions(path, manifest_flips):
        fd = os.open(fpath, os.O_RDWR)  # flipped in place: truncating rewrites cost ms each here
        try:
            byte = os.pread(fd, 1, bit // 8)[0]
            os.pwrite(fd, bytes([byte ^ (1 << (bit % 8))]), bit // 8)
            with pytest.raises(ValueError):
                load()
        finally:
            os.pwrite(fd, bytes([byte]), bit // 8)
            os.close(fd)
    load()  # restored: loads again


def test_every_pointer_bit_flip_and_manifest_flips_are_refused(tmp_path, recorded):
    path = fresh(recorded["full"][2]).save(str(tmp_path / "h"))
    assert_every_flip_refused(path, lambda: uf.GradientHistory.load(path), manifest_flips=300)
    # the example: momentum 0.9 -> 0.8 in the manifest, checksums of the data untouched
    pointer, manifest = read_current(path)
    mpath = os.path.join(path, "objects", pointer["manifest"])
    text = open(mpath).read()
    assert '"momentum":0.9' in text
    open(mpath, "w").write(text.replace('"momentum":0.9', '"momentum":0.8'))
    with pytest.raises(ValueError, match="xxh3-128 mismatch"):
        uf.GradientHistory.load(path)


def test_names_from_files_never_leave_the_history(tmp_path, recorded):
    history = fresh(recorded["full"][2])
    outside = tmp_path / "B"
    outside.mkdir()
    path = history.save(str(tmp_path / "h"))
    _, manifest = read_current(path)
    secret = open(os.path.join(path, "objects", manifest["data"]), "rb").read()
    (outside / "data").write_bytes(secret)
    for bad in ("../../B/data", "/etc/passwd", manifest["data"].upper()):
        forge(path, dict(manifest, data=bad))
        with pytest.raises(ValueError, match="no valid data object"):
            uf.GradientHistory.load(path)


def test_links_in_a_history_never_redirect_what_a_writer_removes(tmp_path, recorded):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ("ab" * 32)).write_text("a file named like an object")
    (victim / ("cd" * 16)).write_text("a file named like a temporary file")
    history = fresh(recorded["minimal"][2])
    path = history.save(str(tmp_path / "h"))
    loaded = uf.GradientHistory.load(path)
    for sub in ("tmp", "objects"):
        moved = os.path.join(path, sub + ".real")
        os.rename(os.path.join(path, sub), moved)
        os.symlink(victim, os.path.join(path, sub))
        with pytest.raises(ValueError, match=f"{sub} is a link"):
            loaded.append_request([1], "mini", "aa" * 32)  # unlearn() logs every request like this
        with pytest.raises(ValueError, match=f"{sub} is a link"):
            history.save(path)
        os.remove(os.path.join(path, sub))
        os.rename(moved, os.path.join(path, sub))
    assert sorted(os.listdir(victim)) == sorted(["ab" * 32, "cd" * 16])
    os.symlink(victim / ("ab" * 32), os.path.join(path, "LOCK.new"))
    os.replace(os.path.join(path, "LOCK.new"), os.path.join(path, "LOCK"))
    with pytest.raises(ValueError, match="cannot lock"):
        history.save(path)
    assert (victim / ("ab" * 32)).read_text() == "a file named like an object"


def test_format1_names_never_leave_the_history(tmp_path, recorded):
    # a manifest entry "../B/x.pt" whose target is a valid tensor file with the right sha256
    history = fresh(recorded["full"][2])
    outside = tmp_path / "B"
    outside.mkdir()
    old = tmp_path / "old"
    write_format1(old, history)
    torch.save(history.schedule["w0"], outside / "w0.pt")
    entries = json.loads((old / "manifest.json").read_text())
    entries["files"]["schedule.w0"] = dict(entries["files"]["schedule.w0"], file="../B/w0.pt", sha256=hashlib.sha256((outside / "w0.pt").read_bytes()).hexdigest())
    (old / "manifest.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"'\.\./B/w0\.pt' .* not a plain name"):
        uf.GradientHistory.load(str(old))


class Boom:
    def __reduce__(self):
        return (os.mkdir, (MARKER,))


MARKER = None


def test_a_pickle_in_place_of_a_data_file_is_a_value_error_naming_it(tmp_path, recorded, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MARKER", str(tmp_path / "pwned"))
    payload = pickle.dumps(Boom())
    history = fresh(recorded["minimal"][2])
    path = history.save(str(tmp_path / "h"))
    _, manifest = read_current(path)
    forge(path, manifest, data=payload)
    with pytest.raises(ValueError, match=r"objects/[0-9a-f]{64} is not a valid safetensors file"):
        uf.GradientHistory.load(path)
    assert not os.path.exists(MARKER)  # nothing from the file ran


def test_a_pickle_in_place_of_a_format1_file_is_a_value_error_naming_it(tmp_path, recorded, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MARKER", str(tmp_path / "pwned"))
    payload = pickle.dumps(Boom())
    history = fresh(recorded["full"][2])
    old = tmp_path / "old"
    write_format1(old, history)
    entries = json.loads((old / "manifest.json").read_text())
    (old / "schedule.w0.pt").write_bytes(payload)
    entries["files"]["schedule.w0"]["sha256"] = hashlib.sha256(payload).hexdigest()
    (old / "manifest.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"schedule\.w0\.pt is not a tensor"):
        uf.GradientHistory.load(str(old))
    assert not os.path.exists(MARKER)  # nothing from the files ran


def test_shapes_and_dtypes_are_checked_against_the_data(tmp_path, recorded):
    history = fresh(recorded["full"][2])
    path = history.save(str(tmp_path / "h"))
    _, manifest = read_current(path)
    tensors = safetensors.torch.load(open(os.path.join(path, "objects", manifest["data"]), "rb").read())
    # the manifest disagrees with the data object's own header
    wrong = dict(manifest, tensors=dict(manifest["tensors"], **{"schedule.w0": {"dtype": "float64", "shape": [3, 1]}}))
    forge(path, wrong)
    with pytest.raises(ValueError, match=r"tensor schedule\.w0 .* the manifest says float64 \[3, 1\]"):
        uf.GradientHistory.load(path)
    # manifest and data agree, but w0 is too short for the recorded parameters
    short = dict(tensors, **{"schedule.w0": tensors["schedule.w0"][:-1].clone()})
    entries = dict(manifest["tensors"], **{"schedule.w0": {"dtype": "float64", "shape": [short["schedule.w0"].numel()]}})
    forge(path, dict(manifest, tensors=entries), data=safetensors.torch.save(short))
    with pytest.raises(ValueError, match=r"schedule\.w0 has 17 values, the recorded parameters 18"):
        uf.GradientHistory.load(path)
    # a chunk of the trajectory whose int8 g codes are one row short (its table agrees with its data)
    chunk = manifest["chunks"][0]
    rows = safetensors.torch.load(open(os.path.join(path, "objects", chunk["parts"]["rows"]["data"]), "rb").read())
    rows["trajectory.g.codes"] = rows["trajectory.g.codes"][:-1].clone()
    table = {n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)} for n, t in rows.items()}
    part = {"data": put(path, safetensors.torch.save(rows)), "tensors": table}
    forged = dict(manifest, chunks=[dict(chunk, parts=dict(chunk["parts"], rows=part))] + manifest["chunks"][1:])
    forge(path, forged)
    with pytest.raises(ValueError, match="trajectory.g"):
        uf.GradientHistory.load(path)


# ----------------------------------------------------------------------------- optimizer classes
def test_optimizer_names_from_a_file_are_never_imported(tmp_path, recorded, monkeypatch):
    data, model, history = recorded["full"]
    history = fresh(history)
    (tmp_path / "attacker_mod.py").write_text("import os\nos.mkdir(os.environ['UF_PWNED'])\nEvil = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("UF_PWNED", str(tmp_path / "pwned"))
    for name in ("builtins.print", "os.system", "attacker_mod.Evil", "torch.optim.Optimizer", "SGD", ["torch.optim.SGD"]):
        meta = dict(history.meta, optimizer=dict(history.meta["optimizer"], **{"class": name}))
        with pytest.raises(ValueError, match=r"is not allowed.*register_optimizer"):
            build_optimizer(model, meta)
    assert "attacker_mod" not in sys.modules and not (tmp_path / "pwned").exists()
    # through a saved (and re-checksummed, as an attacker would) history into retrain
    path = history.save(str(tmp_path / "h"))
    _, manifest = read_current(path)
    manifest["info"]["meta"]["optimizer"]["class"] = "attacker_mod.Evil"
    forge(path, manifest)
    crafted = uf.GradientHistory.load(path)
    with pytest.raises(ValueError, match="'attacker_mod.Evil' is not allowed"):
        uf.unlearn(model, crafted, [0], data, LOSS, method="retrain")
    assert "attacker_mod" not in sys.modules and not (tmp_path / "pwned").exists()
    # the recorder's spelling and the public one both name torch's SGD
    for name in ("torch.optim.sgd.SGD", "torch.optim.SGD"):
        meta = dict(history.meta, optimizer=dict(history.meta["optimizer"], **{"class": name}))
        assert type(build_optimizer(model, meta)) is torch.optim.SGD


@pytest.mark.parametrize("world_size", [0, -1, None, "2", 2.5, True, 2**40])
def test_a_crafted_world_size_is_refused_naming_it(tmp_path, recorded, world_size):
    # it splits every replayed batch and generator-state row into ranks: 0 was a ZeroDivisionError, None a TypeError
    history = fresh(recorded["full"][2])
    path = history.save(str(tmp_path / "h"))
    _, manifest = read_current(path)
    manifest["info"]["meta"]["distributed"] = {"world_size": world_size, "backend": "gloo", "recording_rank": 0}
    forge(path, manifest)
    with pytest.raises(ValueError, match=r"meta\['distributed'\] must hold the world size as an int in \[1, 2\*\*20\]"):
        uf.GradientHistory.load(path)


def test_a_manifest_integer_past_pythons_digit_limit_is_refused_naming_the_manifest(tmp_path, recorded):
    # (json's own ValueError named neither the history nor the file)
    path = fresh(recorded["full"][2]).save(str(tmp_path / "h"))
    _, manifest = read_current(path)
    manifest["info"]["meta"]["n_train"] = "BIG"
    forge(path, None, raw=json.dumps(manifest).encode().replace(b'"BIG"', b"9" * 5000))
    with pytest.raises(ValueError, match=r"the manifest of .* is not readable JSON .*digits"):
        uf.GradientHistory.load(path)


@pytest.mark.parametrize("world_size", [1, 2])
def test_crafted_micro_batches_that_split_no_step_are_refused_naming_them(tmp_path, recorded, world_size):
    # the load checks only that the sizes add up over the run; a step they do not split (or, under DDP, whose ranks' parts
    # they do not split equally) was a RuntimeError deep in torch.split, or a silently wrong replay
    data, model, history = recorded["full"]
    history = fresh(history)
    sched = dict(history.schedule)
    T = len(sched["batches"])
    sched["micro_counts"] = torch.tensor([2] * T)
    sched["micro_sizes"] = torch.tensor([5, 7] * T if world_size == 1 else [3, 9] * T)  # batches of 12
    meta = dict(history.meta, distributed={"world_size": world_size, "backend": "gloo", "recording_rank": 0})
    crafted = uf.GradientHistory(meta, sched, history.trajectory)
    if world_size == 1:
        crafted.schedule["micro_sizes"] = torch.tensor([5, 8] + [5, 7] * (T - 1))  # step 0 split into 13
        crafted.schedule["micro_sizes"][3] = 6  # (the run's total kept: 13 + 11 + ...)
    else:
        crafted.schedule["rng_states"] = torch.zeros(T, 2 * torch.get_rng_state().numel(), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"history: step \d+'s micro-batches .* do not split its batch of 12 samples"):
        uf.unlearn(model, crafted, [0], data, LOSS, method="retrain")


class HalfStepSGD(torch.optim.SGD):
    """A user's optimizer: SGD at half the learning rate."""

    def step(self, closure=None):
        for g in self.param_groups:
            g["lr"] /= 2
        super().step(closure)
        for g in self.param_groups:
            g["lr"] *= 2


def test_register_optimizer_allows_a_users_class(tmp_path, recorded, monkeypatch):
    from unlearn_fast import optimizers

    monkeypatch.setattr(optimizers, "_ALLOWED", dict(optimizers._ALLOWED))
    data, model, history = record("full", 2, optimizer_cls=HalfStepSGD)
    assert history.meta["optimizer"]["class"] == f"{__name__}.HalfStepSGD"
    loaded = uf.GradientHistory.load(history.save(str(tmp_path / "h")))
    with pytest.raises(ValueError, match="HalfStepSGD' is not allowed"):
        uf.unlearn(model, loaded, [1], data, LOSS, method="retrain")
    assert uf.optimizers.register_optimizer(HalfStepSGD) is HalfStepSGD
    replayed = uf.unlearn(model, loaded, [], data, LOSS, method="retrain").model
    assert torch.equal(flat_params(replayed), flat_params(model))  # forgetting nothing replays training exactly
    for bad in (print, torch.optim.Optimizer, "torch.optim.SGD"):
        with pytest.raises(ValueError, match="register_optimizer: cls must be a subclass"):
            uf.optimizers.register_optimizer(bad)


# ----------------------------------------------------------------------------- requests
def test_requests_persist_and_append_durably(tmp_path, recorded):
    history = fresh(recorded["minimal"][2])
    history.append_request(torch.tensor([4, 2]), "mini", "aa" * 32)  # in memory until saved
    path = history.save(str(tmp_path / "h"))
    history.append_request([7], "retrain", "bb" * 32)
    elsewhere = uf.GradientHistory.load(path)  # another process's view
    assert [r["forget"] for r in elsewhere.requests] == [[4, 2], [7]]
    elsewhere.append_request([9], "mini", "cc" * 32)
    history.append_request([11], "mini", "dd" * 32)  # both appenders' entries are kept, in order
    expected = [[4, 2], [7], [9], [11]]
    assert [r["forget"] for r in uf.GradientHistory.load(path).requests] == expected == [r["forget"] for r in history.requests]
    assert fingerprint(uf.GradientHistory.load(path)) == fingerprint(history)
    assert leftovers(path) == []
    # the directory now holds another history: appending this one's request there is refused
    other = fresh(recorded["full"][2])
    other.save(path)
    with pytest.raises(ValueError, match="replaced by another history"):
        history.append_request([1], "mini", "ee" * 32)
    assert uf.GradientHistory.load(path).requests == []


def test_objects_are_named_by_their_xxh3_and_sha256_named_histories_still_load_and_grow(tmp_path, recorded):
    import xxhash

    history = fresh(recorded["full"][2])
    path = history.save(str(tmp_path / "h"))
    pointer, manifest = read_current(path)
    names = [pointer["manifest"], manifest["data"], *(part["data"] for chunk in manifest["chunks"] for part in chunk["parts"].values())]
    assert len(names) > 2  # the trajectory's chunks are objects too
    for name in names:  # computed here with the xxhash package, not the store's code
        assert name == xxhash.xxh3_128(open(os.path.join(path, "objects", name), "rb").read()).hexdigest()
    # the same history as format version 3 wrote it: every object named by its sha256
    old = str(tmp_path / "v3")
    os.makedirs(os.path.join(old, "objects"))
    rename = {n: put(old, open(os.path.join(path, "objects", n), "rb").read()) for n in names[1:]}
    v3 = dict(manifest, format_version=3, data=rename[manifest["data"]],
              chunks=[dict(c, parts={k: dict(part, data=rename[part["data"]]) for k, part in c["parts"].items()}) for c in manifest["chunks"]])
    digest = put(old, json.dumps(v3).encode())
    body = json.dumps({"format": "unlearn_fast.store", "format_version": 3, "manifest": digest}).encode()
    open(os.path.join(old, "CURRENT"), "wb").write(body + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n")
    loaded = uf.GradientHistory.load(old)
    assert fingerprint(loaded) == fingerprint(history)
    # a request appended to it keeps its objects, names and all; a copy elsewhere verifies and keeps them too
    loaded.append_request([3], "retrain", "ab" * 32)
    pointer3, manifest3 = read_current(old)
    assert manifest3["format_version"] == 4 and manifest3["data"] == rename[manifest["data"]] and len(pointer3["manifest"]) == 32
    copied = uf.GradientHistory.load(loaded.save(str(tmp_path / "copy")))
    assert fingerprint(copied) == fingerprint(loaded) and copied.requests == loaded.requests
    # damage to an sha256-named object is found by sha256, to an XXH3-named one by XXH3
    target = os.path.join(old, "objects", manifest3["data"])
    raw = bytearray(open(target, "rb").read())
    raw[-1] ^= 1
    open(target, "wb").write(raw)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        uf.GradientHistory.load(old)
    target = os.path.join(path, "objects", manifest["data"])
    raw = bytearray(open(target, "rb").read())
    raw[-1] ^= 1
    open(target, "wb").write(raw)
    with pytest.raises(ValueError, match="xxh3-128 mismatch"):
        uf.GradientHistory.load(path)


# ----------------------------------------------------------------------------- crashes and concurrency
def fork(work):
    """Run work() in a forked child (torch is already imported: no 3 s start-up); its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def exit_code(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def kill_at_call(k, names=("write", "fsync", "replace", "unlink")):
    """In a child: SIGKILL this process at its k-th call of one of os.`names` (every step of a save)."""
    count = [0]
    for name in names:
        real = getattr(os, name)

        def counted(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(os, name, counted)


def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_history(tmp_path, recorded):
    a, b = fresh(recorded["full"][2]), fresh(recorded["minimal"][2])
    prints = {fingerprint(a), fingerprint(b)}
    path = str(tmp_path / "h")
    a.save(path)
    started = time.perf_counter()
    b.save(path)
    a.save(path)
    save_seconds = (time.perf_counter() - started) / 2
    kills, rng = 0, random.Random(0)

    def check():
        loaded = uf.GradientHistory.load(path)
        assert fingerprint(loaded) in prints

    # every step: the k-th write/fsync/rename/unlink of a save, until the save runs to its end
    for k in range(1, 100):
        pid = fork(lambda: (kill_at_call(k), b.save(path)))
        if exit_code(pid) == 0:
            break
        kills += 1
        check()
    assert kills >= 10  # a save has that many steps (14 today)
    a.save(path)
    # and random moments of a child saving the two in turn
    for _ in range(20):
        pid = fork(lambda: [h.save(path) for _ in range(1000) for h in (b, a)])
        time.sleep(rng.uniform(0, 2 * save_seconds))
        os.kill(pid, signal.SIGKILL)
        assert exit_code(pid) == -signal.SIGKILL
        check()
    a.save(path)
    assert leftovers(path) == []


def test_an_append_killed_at_any_moment_keeps_every_earlier_request(tmp_path, recorded):
    history = fresh(recorded["minimal"][2])
    path = history.save(str(tmp_path / "h"))
    history.append_request([0], "mini", "aa" * 32)
    kills = 0
    for k in range(1, 100):
        pid = fork(lambda: (kill_at_call(k), history.append_request([k], "mini", "bb" * 32)))
        code = exit_code(pid)
        log = [r["forget"] for r in uf.GradientHistory.load(path).requests]
        before = [[j] for j in range(k)]
        assert log in (before, before + [[k]]), log  # nothing earlier lost or reordered; the new entry whole or absent
        if code == 0:
            assert log == before + [[k]]
            break
        kills += 1
        if log == before:  # killed before its version was current: a surviving process logs it
            history.append_request([k], "mini", "bb" * 32)
    assert kills >= 8
    assert leftovers(path) == []


def test_loads_while_another_process_saves_return_one_history_whole(tmp_path, recorded):
    a, b = fresh(recorded["full"][2]), fresh(recorded["minimal"][2])
    prints = {fingerprint(a), fingerprint(b)}
    path = str(tmp_path / "h")
    a.save(path)
    pid = fork(lambda: [h.save(path) for _ in range(100000) for h in (b, a)])
    try:
        loads, refused = 0, 0
        deadline = time.perf_counter() + 2
        while time.perf_counter() < deadline:
            try:
                assert fingerprint(uf.GradientHistory.load(path)) in prints
                loads += 1
            except ValueError:
                refused += 1
    finally:
        os.kill(pid, signal.SIGKILL)
        exit_code(pid)
    assert loads >= 20 and refused <= loads


def test_two_writers_on_one_path_are_serialised(tmp_path, recorded):
    a, b = fresh(recorded["full"][2]), fresh(recorded["minimal"][2])
    path = str(tmp_path / "h")
    pids = [fork(lambda h=h: [h.save(path) for _ in range(15)]) for h in (a, b)]
    assert [exit_code(pid) for pid in pids] == [0, 0]
    assert fingerprint(uf.GradientHistory.load(path)) in {fingerprint(a), fingerprint(b)}
    assert leftovers(path) == []


def test_a_crashed_writers_leftovers_are_removed_by_the_next_save(tmp_path, recorded):
    history = fresh(recorded["minimal"][2])
    path = history.save(str(tmp_path / "h"))
    open(os.path.join(path, "tmp", "ef" * 16), "wb").write(b"x" * 1000)  # what a killed writer leaves (a uuid4 hex name)
    put(path, b"an object no version names")
    assert len(leftovers(path)) == 2
    assert fingerprint(uf.GradientHistory.load(path)) == fingerprint(history)  # readers are not disturbed
    history.save(path)
    assert leftovers(path) == []
    # a first save killed before its version was complete is reported, then replaced
    first = str(tmp_path / "first")
    pid = fork(lambda: (kill_at_call(4), history.save(first)))
    assert exit_code(pid) == -signal.SIGKILL
    with pytest.raises(ValueError, match="interrupted before its first version"):
        uf.GradientHistory.load(first)
    history.save(first)
    assert leftovers(first) == [] and fingerprint(uf.GradientHistory.load(first)) == fingerprint(history)


# ----------------------------------------------------------------------------- format 1
def format1_arrays(history):
    """The flat arrays of format 1 (and of format 2's single data object): schedule, trajectory, summary."""
    batches = history.schedule["batches"]
    arrays = {"schedule.w0": history.schedule["w0"], "schedule.lrs": history.schedule["lrs"],
              "schedule.batch_sizes": torch.tensor([len(b) for b in batches], dtype=torch.int64), "schedule.batch_indices": torch.cat(batches)}
    encoded = {}
    for section in ("trajectory", "summary"):
        for key, value in (getattr(history, section) or {}).items():
            if hasattr(value, "meta"):
                if isinstance(value, uf.history.ChunkedRows):
                    value = uf.history.EncodedRows.cat([value._part(j) for j, (n, _) in enumerate(value.parts) if n])
                tensors = value.tensors
                encoded[f"{section}.{key}"] = value.meta()
                arrays.update({f"{section}.{key}.{n}": t for n, t in tensors.items()})
            else:
                arrays[f"{section}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return arrays, encoded


def write_format1(path, history):
    """A format-1 directory as the old save() wrote it: torch.save per array, manifest.json with sha256s."""
    os.makedirs(path)
    arrays, encoded = format1_arrays(history)
    files = {}
    for name, tensor in arrays.items():
        buffer = io.BytesIO()
        torch.save(tensor.contiguous(), buffer)
        open(os.path.join(path, name + ".pt"), "wb").write(buffer.getvalue())
        files[name] = {"file": name + ".pt", "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
    manifest = {"format_version": 1, "meta": history.meta, "encoded": encoded, "files": files}
    open(os.path.join(path, "manifest.json"), "w").write(json.dumps(manifest))


def test_format1_histories_are_read_read_only(tmp_path, recorded):
    history = fresh(recorded["full"][2])
    history.schedule = {k: v for k, v in history.schedule.items() if not k.startswith("micro_")}  # format 1 predates them
    old = str(tmp_path / "old")
    write_format1(old, history)
    loaded = uf.GradientHistory.load(old)
    assert fingerprint(loaded) == fingerprint(history) and loaded.path is None
    before = {f: open(os.path.join(old, f), "rb").read() for f in os.listdir(old)}
    loaded.append_request([1], "retrain", "ff" * 32)  # in memory: format 1 is never written
    assert loaded.requests[0]["forget"] == [1] and {f: open(os.path.join(old, f), "rb").read() for f in os.listdir(old)} == before
    with pytest.raises(ValueError, match="holds a format-1 history"):
        loaded.save(old)
    upgraded = loaded.save(str(tmp_path / "new"))
    assert uf.GradientHistory.load(upgraded).requests == loaded.requests


def test_every_stored_dtype_and_shape_round_trips_and_the_data_is_plain_safetensors(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = {str(dtype): (base * 0.5 - 3).to(dtype) for dtype in store.SAFETENSORS_DTYPES}
    tensors.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 3, dtype=torch.int64), strided=base.t(), part=base[1:3, 2:])
    path = str(tmp_path / "s")
    content = store.write(path, "Test", {"x": [1, 2.5, None]}, tensors)
    snap = store.read(path, "Test")
    assert snap.info == {"x": [1, 2.5, None]} and snap.content == content and set(snap.tensors) == set(tensors)
    for name, t in tensors.items():
        assert snap.tensors[name].dtype == t.dtype and torch.equal(snap.tensors[name], t), name
    # the safetensors library reads the data object by itself, with the same tensors
    _, manifest = read_current(path)
    with safetensors.safe_open(os.path.join(path, "objects", manifest["data"]), "pt") as f:
        assert all(torch.equal(f.get_tensor(name), t) for name, t in tensors.items())
    with pytest.raises(ValueError, match="tensor c has dtype torch.complex64"):
        store.write(path, "Test", {}, {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="meta must be JSON-able"):
        store.write(path, "Test", {"f": print}, {})


def test_crafted_safetensors_headers_are_refused_before_any_tensor_is_made():
    from unlearn_fast import store

    def blob(header, data):
        head = json.dumps(header).encode()
        return bytearray(len(head).to_bytes(8, "little") + head + data)

    two_floats = {"a": {"dtype": "float32", "shape": [2]}, "b": {"dtype": "float32", "shape": [2]}}
    overlapping = blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    cases = [
        (overlapping, two_floats, "do not tile its data exactly"),
        (blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(16)), {"a": two_floats["a"]}, "do not tile"),
        (blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)), {"a": two_floats["a"]}, "data offsets"),
        (blob({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x00\x02"), {"a": {"dtype": "bool", "shape": [2]}}, "bools other than 0 and 1"),
        (blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), {"a": {"dtype": "float64", "shape": [2]}}, "the manifest says float64"),
        (bytearray((1 << 62).to_bytes(8, "little") + b"{}"), {}, "header length runs past"),
    ]
    for data, expected, message in cases:
        with pytest.raises(ValueError, match=message):
            store.decode(data, expected, "crafted")
    good = blob({"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy().tobytes())
    tensors = store.decode(good, two_floats, "crafted")
    assert tensors["a"].tolist() == [1.0, 2.0] and tensors["b"].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("sizes", [[8], [1], [4095, 1, 3], [4096 * 3], [5, 4096 * 2 + 7, 12000]])
def test_direct_writes_hold_the_same_bytes_and_digest_as_buffered_ones(tmp_path, monkeypatch, sizes):
    """store's O_DIRECT path (a recording's large chunks) against hashlib/xxhash on the bytes: odd lengths, several
    staging buffers (shrunk to 2 blocks here), the last block padded then truncated."""
    from unlearn_fast import store

    monkeypatch.setattr(store, "DIRECT_STAGE_BYTES", 2 * store.DIRECT_ALIGN)
    (tmp_path / "tmp").mkdir()
    gen = torch.Generator().manual_seed(len(sizes))
    parts = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).numpy() for n in sizes]
    expected = b"".join(p.tobytes() for p in parts)
    assert_direct_write(tmp_path, parts, expected)


def assert_direct_write(tmp_path, parts, expected):
    """store._write_direct of `parts` gives a file of `expected` bytes and their XXH3-128."""
    from unlearn_fast import store
    import xxhash

    try:
        digest = store._write_direct(str(tmp_path / "tmp" / "direct"), [memoryview(p) for p in parts], xxhash.xxh3_128())
    except store._DirectIORefused:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT (the buffered path is tested by every other test)")
    assert (tmp_path / "tmp" / "direct").read_bytes() == expected
    assert digest == xxhash.xxh3_128(expected).hexdigest()


def test_a_file_system_that_refuses_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    from unlearn_fast import store

    (tmp_path / "tmp").mkdir()
    real_open, opened = os.open, []

    def no_direct(path, flags, *args):
        opened.append(bool(flags & getattr(os, "O_DIRECT", 0)))
        if opened[-1]:
            raise OSError(22, "Invalid argument")  # EINVAL: what tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(store.os, "open", no_direct)
    monkeypatch.setattr(store, "_DIRECT_REFUSED", set())
    data = torch.arange(3 * store.DIRECT_MIN_BYTES // 2, dtype=torch.int64).to(torch.uint8).numpy()
    for _ in range(2):
        tmp, digest = store._write_durably(str(tmp_path), [data])
        assert open(tmp, "rb").read() == data.tobytes() and digest == store.DIGESTS[32][1](data.tobytes()).hexdigest()
    assert opened == ([True, False, False] if hasattr(os, "O_DIRECT") else [False, False])  # refused once, then not tried


@pytest.mark.parametrize("lead,shift", [(100, 100), (100, 0), (4096, 0), (0, 0), (5000, 904)])
def test_direct_writes_from_memory_in_place_hold_the_same_bytes(tmp_path, monkeypatch, lead, shift):
    """A part whose memory sits at its file offset within a block is written from where it lies (lead bytes before
    it, its memory `shift` bytes into a page: congruent when lead = shift mod 4096), the rest staged; the file and the
    digest are those of the bytes either way."""
    import mmap
    import numpy as np
    from unlearn_fast import store

    monkeypatch.setattr(store, "DIRECT_IN_PLACE_BYTES", store.DIRECT_ALIGN)
    monkeypatch.setattr(store, "DIRECT_STAGE_BYTES", 2 * store.DIRECT_ALIGN)
    (tmp_path / "tmp").mkdir()
    pages = np.frombuffer(mmap.mmap(-1, 16 * store.DIRECT_ALIGN), dtype=np.uint8)  # page-aligned memory
    pages[:] = torch.randint(0, 256, (pages.size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(lead)).numpy()
    parts = [bytes(range(256)) * (lead // 256) + bytes(lead % 256), pages[shift:shift + 9 * store.DIRECT_ALIGN + 77], pages[:3]]
    expected = b"".join(bytes(p) for p in parts)
    written = []
    real_write = os.write
    monkeypatch.setattr(store.os, "write", lambda fd, view: written.append(len(view)) or real_write(fd, view))
    assert_direct_write(tmp_path, parts, expected)
    in_place = (lead - shift) % store.DIRECT_ALIGN == 0
    assert any(n > 2 * store.DIRECT_ALIGN for n in written) == in_place, written  # in place: one write longer than the stage


def test_a_recorders_chunks_are_laid_out_for_in_place_direct_writes(tmp_path):
    """The header padding puts a chunk's gradient codes at the file offset, within a block, at which the recorder's
    page-aligned buffers hold them; the file is still plain safetensors."""
    from unlearn_fast import store

    model = torch.nn.Linear(600, 500)  # 300k parameters: a chunk of 4 int8 rows is over store.DIRECT_MIN_BYTES
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full", codec="int8"), path=str(tmp_path / "h"))
    x, y = torch.randn(8, 600), torch.randint(0, 500, (8,))
    for step in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.record(torch.arange(8 * step, 8 * step + 8))
        opt.step()
    rec.flush()
    rec.close()
    big = max((tmp_path / "h" / "objects").iterdir(), key=lambda f: f.stat().st_size)
    data = big.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:start])
    codes = max(header, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    assert header[codes]["dtype"] == "I8"
    assert (start + header[codes]["data_offsets"][0]) % store.DIRECT_ALIGN == 0  # the buffers are page-aligned
    tensors = safetensors.torch.load(data)
    assert tensors[codes].shape == (4, 600 * 500 + 500)


def _head_names(path):
    """The tensor names in a saved history's safetensors objects."""
    names = set()
    for f in glob.glob(os.path.join(path, "objects", "*")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if size > 1 << 20:
                continue
            try:
                names |= set(json.loads(fh.read(size))) - {"__metadata__"}
            except ValueError:  # the manifest, not a safetensors file
                continue
    return names


@pytest.mark.parametrize("trained", ["all but a block", "a random half"])
def test_which_samples_were_trained_on_is_stored_in_the_fewer_bytes_of_knots_and_bits(tmp_path, trained):
    """A minimal history's `seen` mask: as knots where the trained samples form a few runs (every sample, or all but a
    block: a few knots whatever n) and that saves bytes, else one bit a sample; both load back the same mask."""
    n = 10000
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    data = torch.utils.data.TensorDataset(X, y)
    pool = torch.cat([torch.arange(3000), torch.arange(4000, n)]) if trained == "all but a block" else torch.randperm(n, generator=gen)[: n // 2]
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # (18 parameters: 64 vectors, 1.2 kB, would not hold the random half's 1.25 kB of bits)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal", rank=2, budget_vectors=256))
    for b in range(0, len(pool), 500):
        idx = pool[b : b + 500]
        opt.zero_grad()
        LOSS(model(X[idx]), y[idx]).backward()
        rec.record(idx)
        opt.step()
    history = rec.finish(data, LOSS)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[pool] = True
    loaded = uf.GradientHistory.load(history.save(str(tmp_path / "h")))
    assert torch.equal(history.seen_mask(), expected) and torch.equal(loaded.seen_mask(), expected)
    as_knots = trained == "all but a block"
    assert ("seen" in loaded.columns) is as_knots and ("seen" in history.columns) is as_knots
    seen_bytes = history.nbytes("schedule") - sum(history.column_bytes(k) for k in ("lrs", "batch_sizes")) - 4 * history.schedule["w0"].numel()
    assert seen_bytes == (16 + 6 * (4 + 4) if as_knots else n // 8)  # (span; knots at 0, the block's four edges and n - 1, int32 steps and values)
    assert loaded.nbytes("schedule") == history.nbytes("schedule")


@pytest.mark.parametrize("mangle, match", [
    (lambda t: t.update({"schedule.lrs.knot_steps": t["schedule.lrs.knot_steps"] + 1}), "schedule.lrs: a schedule column's knot steps"),
    (lambda t: t.update({"schedule.lrs.span": t["schedule.lrs.span"] + torch.tensor([1, 0])}), "schedule.batch_sizes .* disagrees with schedule.lrs"),
    (lambda t: t.update({"schedule.lrs.span": torch.tensor([2**40, 1])}), "schedule.lrs: a schedule column spans"),
    (lambda t: t.update({"schedule.lrs.knot_values": t["schedule.lrs.knot_values"] * float("nan")}), "schedule.lrs: a schedule column holds a non-finite"),
    (lambda t: t.update({"schedule.batch_sizes.knot_values": -t["schedule.batch_sizes.knot_values"]}), "schedule.batch_sizes"),
    (lambda t: t.pop("schedule.lrs.span"), "schedule.lrs: a schedule column's knots are malformed"),
    (lambda t: t.update({"schedule.seen": torch.full((3,), 2, dtype=torch.int64)}), "schedule.seen .* must be 1-D torch.uint8/torch.bool"),
    (lambda t: t.update({"schedule.seen.span": torch.tensor([3, 1]), "schedule.seen.knot_steps": torch.tensor([0], dtype=torch.int32),
                         "schedule.seen.knot_values": torch.tensor([2], dtype=torch.int32), "schedule.seen": None}), "schedule.seen's knots must be 0 / 1"),
    (lambda t: t.update({"schedule.seen.span": torch.tensor([3, 1]), "schedule.seen.knot_steps": torch.tensor([0], dtype=torch.int32),
                         "schedule.seen.knot_values": torch.tensor([1], dtype=torch.int32), "schedule.seen": None}), "schedule.seen's knots give 3 values"),
    (lambda t: t.update({"schedule.lrs.span": torch.tensor([2**24 + 1, 1])}), r"spans 16777217 steps .*at most 16777216"),
    (lambda t: t.update({"schedule.lrs.values": torch.full((1, 1), 0.5, dtype=torch.float64)}), "schedule.lrs is stored both as knots and as values"),
])
def test_crafted_schedule_knots_are_refused_naming_the_column(tmp_path, recorded, mangle, match):
    path = fresh(recorded["minimal"][2]).save(str(tmp_path / "h"))
    snap = store.read(path, "GradientHistory")
    tensors = dict(snap.tensors)
    mangle(tensors)
    tensors = {name: t for name, t in tensors.items() if t is not None}  # (None: taken out)
    store.write(str(tmp_path / "crafted"), "GradientHistory", snap.info, tensors)
    with pytest.raises(ValueError, match=match):
        uf.GradientHistory.load(str(tmp_path / "crafted"))


@pytest.mark.parametrize("schedule", ["decaying", "constant"])
def test_a_minimal_schedule_is_stored_as_knots_and_loads_back_the_same(tmp_path, schedule):
    """A minimal history's per-step columns are stored as knots (unlearn_fast/columns.py): a constant learning rate and
    the batch sizes as one knot each, a decaying one as its steps (6 here, within the budget); loading gives back the
    same columns, and a history saved before the knots (run-length encoded columns) still loads."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(60, 5, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    data = torch.utils.data.TensorDataset(X, y)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: 1 / (1 + s)) if schedule == "decaying" else (lambda s: 1.0))
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="minimal", rank=2))
    recorded = []
    for b in range(0, 60, 10):
        opt.zero_grad()
        LOSS(model(X[b : b + 10]), y[b : b + 10]).backward()
        rec.record(torch.arange(b, b + 10))
        recorded.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    history = rec.finish(data, LOSS)
    assert history.schedule["lrs"][:, 0].tolist() == recorded and history.meta["schedule_error"] == {}
    path = history.save(str(tmp_path / "h"))
    names = _head_names(path)
    assert {"schedule.lrs.knot_values", "schedule.batch_sizes.knot_values"} <= names
    assert not any(n.endswith((".values", ".lengths")) and ".knot_" not in n for n in names if n.startswith("schedule."))
    loaded = uf.GradientHistory.load(path)
    assert torch.equal(loaded.schedule["lrs"], history.schedule["lrs"])
    assert torch.equal(loaded.schedule["batch_sizes"], history.schedule["batch_sizes"])
    assert loaded.columns["lrs"]["knot_steps"].numel() == (6 if schedule == "decaying" else 1)
    assert loaded.columns["batch_sizes"]["knot_steps"].numel() == 1
    assert loaded.nbytes("schedule") == history.nbytes("schedule")

    # the layout before 2026-12-07: each column's run values, and lengths where runs repeat
    snap = store.read(path, "GradientHistory")
    old = {n: t for n, t in snap.tensors.items() if ".knot_" not in n and not n.endswith(".span")}
    for name in ("schedule.lrs", "schedule.batch_sizes"):
        column = history.schedule[name.split(".")[1]]
        rows = column if column.dim() > 1 else column[:, None]
        starts = torch.tensor([0] + [t for t in range(1, len(rows)) if not torch.equal(rows[t], rows[t - 1])])
        values, lengths = column[starts], torch.diff(torch.cat([starts, torch.tensor([len(rows)])]))
        old[f"{name}.values"] = values if name.endswith("lrs") else values.to(torch.int32)
        if values.shape[0] < history.num_steps:
            old[f"{name}.lengths"] = lengths.to(torch.int32)
    store.write(str(tmp_path / "old"), "GradientHistory", snap.info, old)
    before = uf.GradientHistory.load(str(tmp_path / "old"))
    assert torch.equal(before.schedule["lrs"], history.schedule["lrs"]) and before.columns == {}
    assert torch.equal(before.schedule["batch_sizes"], history.schedule["batch_sizes"])


def _set(d, keys, value):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


@pytest.mark.parametrize("keys, value, match", [
    (("optimizer", "groups", 0, "weight_decay"), None, r"meta\['optimizer'\]\['groups'\]\[0\]\['weight_decay'\] is None"),
    (("optimizer", "groups", 0, "momentum"), True, r"meta\['optimizer'\]\['groups'\]\[0\]\['momentum'\] is True"),
    (("optimizer",), {}, r"meta\['optimizer'\] must hold a class name"),
    (("optimizer", "groups"), [1, 2], r"meta\['optimizer'\] must hold a class name"),
    (("recording",), 1, r"meta\['recording'\] must be a JSON object"),
    (("loss_check", "param_norms"), None, r"meta\['loss_check'\] must hold"),
    (("policy",), "x", r"meta\['policy'\] must be a JSON object"),
])
def test_crafted_meta_fields_are_refused_naming_them(tmp_path, recorded, keys, value, match):
    # (checksums recomputed: a forged file, which the digests cannot tell from an honest one; before, each failed deep
    # inside a method with a TypeError, KeyError or AttributeError)
    path = fresh(recorded["full"][2]).save(str(tmp_path / "h"))
    snap = store.read(path, "GradientHistory")
    info = copy.deepcopy(snap.info)
    _set(info["meta"], keys, value)
    store.write(str(tmp_path / "crafted"), "GradientHistory", info, dict(snap.tensors))
    with pytest.raises(ValueError, match=match):
        uf.GradientHistory.load(str(tmp_path / "crafted"))


@pytest.mark.parametrize("mangle, match", [
    (lambda t: t.update({"summary.w_star": t["summary.w_star"][:1]}), r"summary.w_star must be finite floats of shape \(18,\)"),
    (lambda t: t.update({"summary.w_star": t["summary.w_star"] * float("nan")}), "summary.w_star must be finite floats"),
    (lambda t: t.update({"summary.w_star": t["summary.w_star"].float()}), "summary.w_star is torch.float32, the recorded weights"),
    (lambda t: t.update({"summary.eigvals": t["summary.eigvals"][:1]}), "summary.eigvals must be finite floats of shape"),
    (lambda t: t.update({"summary.rho_path": t["summary.rho_path"][:1]}), "summary.rho_path must be"),
    (lambda t: t.update({"summary.ckpt_steps": t["summary.ckpt_steps"] * 1000}), "summary.ckpt_steps must be distinct rising steps"),
    (lambda t: t.pop("summary.g_star"), "summary.g_star must be"),
])
def test_a_crafted_summary_is_refused_naming_its_part(tmp_path, recorded, mangle, match):
    data, model, history = recorded["minimal"]
    path = fresh(history).save(str(tmp_path / "h"))
    snap = store.read(path, "GradientHistory")
    tensors = dict(snap.tensors)
    mangle(tensors)
    store.write(str(tmp_path / "crafted"), "GradientHistory", snap.info, tensors)
    with pytest.raises(ValueError, match=match):
        uf.unlearn(model, uf.GradientHistory.load(str(tmp_path / "crafted")), [0, 1], data, LOSS, method="mini")
