"""Crash-safe, hostile-file-proof storage of a history: named tensors + JSON facts + a request log.

GradientHistory and the language-model FirstEpochHistory both save through this module. A history
is a directory (docs/storage.md):

    path/CURRENT        pointer: one line of JSON {"format", "format_version", "manifest": <digest>},
                        a newline, the sha256 of that line, a newline
    path/objects/<dig>  immutable files named by the digest of their bytes: the manifest (JSON) and
                        the data (one safetensors file with every tensor); XXH3-128 (32 hex digits)
                        since format version 4, sha256 (64 hex digits) before: the name says which
    path/LOCK           flock()ed by writers; path/tmp/ holds files being written

The chain CURRENT -> manifest -> data is checksummed end to end, so any changed byte is a ValueError;
object names are 32 or 64 hex digits checked before use, so no name read from a file can leave the
directory; tensors are safetensors data (never pickle), read as views of the verified bytes after
their header is checked against the manifest's dtypes and shapes.

Writing (under LOCK, which serialises writers): new objects are written to tmp/, fsync'd and renamed
into objects/; then CURRENT is replaced by rename and the directory fsync'd. The new version becomes
visible only at that rename, the previous one stays readable until then, and a crash at any moment
leaves one of the two. Leftovers of crashed writers (tmp/ files, objects no longer named by CURRENT)
are removed by the next writer, under the lock.

Reading takes no lock: each file is read once into memory and hashed from those same bytes; objects
are never modified in place, only removed by a later writer, so a reader that finds one gone re-reads
CURRENT and starts over. A load returns one version whole or raises ValueError.

The manifest's "requests" (the deletion requests served from the history) grow by append(): a new
manifest that differs from the current one only by one more request, written like any version, so a
crash never loses earlier entries. The "content" digest (the manifest without its requests)
identifies a history; append() refuses to extend a log whose history was replaced meanwhile.
"""
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import re
import stat
import threading
import uuid

import numpy as np
import torch
import xxhash

FORMAT = "unlearn_fast.store"
FORMAT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)  # version 2 had no chunks; 4 names new objects by XXH3-128 instead of sha256
CURRENT, LOCK, OBJECTS, TMP = "CURRENT", "LOCK", "objects", "tmp"
RECORDER = "RECORDER"  # flock()ed by the one recorder streaming to the history (hold_recording)
OBJECT_NAME = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")
READ_ATTEMPTS = 20  # a reader whose version is replaced mid-read starts over at most this often
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass
class Snapshot:
    """One stored version: what a history's save() wrote and its load() gets back."""

    kind: str  # which class wrote it ("GradientHistory", "FirstEpochHistory")
    info: dict  # that class's JSON facts
    tensors: dict  # name -> tensor
    requests: list  # [{"forget": [int], "method": str, "model_digest": str}], oldest first
    content: str  # sha256 of the manifest without its requests: names the history across appends
    chunks: list = dataclasses.field(default_factory=list)  # [{"steps", "mark", "parts": {name: {"data", "tensors"}}}]: read_part() reads a part
    head: str = None  # the object holding `tensors`


@dataclasses.dataclass
class StoredPart:
    """A chunk part already stored as object `data` of the history at `path` (written again only where a
    version goes to another directory: then its verified bytes are copied, or with `link` the file is hard-linked)."""

    path: str
    data: str
    tensors: dict
    link: bool = False


def link_copy(source, snap, path, kind, info, marks=None):
    """A new version at `path` of `snap` (a version read from the history at `source`) with `info` (and `marks` for its
    chunks where given), its head and chunk objects hard-linked to `source`'s where the file system allows (else
    verified copies): the copies of one run's recording a trainer keeps with its checkpoints, each of which would
    otherwise rewrite the whole recording. Not for a copy meant to survive damage to the original (history.save)."""
    head = StoredPart(source, snap.head, _table(snap.tensors), link=True)
    return write(path, kind, info, head, (), stored_chunks(source, snap.chunks, marks, link=True))


def stored_chunks(path, chunks, marks=None, link=False):
    """The manifest `chunks` of the history at `path` as write()'s (steps, mark, {part: StoredPart}) entries, to write
    them into another version by reference (or, in another directory, as verified copies); `marks` replaces their
    marks where given. link: in another directory, share each chunk's file instead of copying it, where the file
    system allows (_link_object): for copies of one run's recording (a trainer's checkpoints), not for a copy meant
    to survive damage to the original."""
    return [(c["steps"], c["mark"] if marks is None else marks[j],
             {name: StoredPart(path, part["data"], part["tensors"], link) for name, part in c["parts"].items()}) for j, c in enumerate(chunks)]


# ----------------------------------------------------------------------------- small helpers
def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


# An object's name is the digest of its bytes, and the name's length says which function: XXH3-128 for the objects
# this version writes, sha256 for those of format version 3 and before (still read, and kept when copied). A digest
# detects damage, not forgery: with no key, whoever can write the directory can write a consistent history, so the
# cheaper hash loses nothing here. sha256 was three quarters of the background writer's CPU time (about 0.65 ms per MB
# on the hosts measured, XXH3 0.04 ms: docs/storage.md), taken from training's cores at every chunk.
DIGESTS = {32: ("xxh3-128", xxhash.xxh3_128), 64: ("sha256", hashlib.sha256)}


def _content_digest(manifest):
    return _sha256(_canonical({k: v for k, v in manifest.items() if k not in ("requests", "format_version")}))


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(fpath):
    """The bytes of a regular file, read once; links are not followed (a name inside the history must
    not lead outside it) and devices or pipes are refused (they could block or never end)."""
    try:
        fd = os.open(fpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise  # callers tell a replaced version from a missing file
    except OSError as err:  # a link (ELOOP), no permission, ...
        raise ValueError(f"history: cannot read {fpath} ({err.strerror})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"history: {fpath} is not a regular file")
        data = bytearray(info.st_size)  # writable: loaded tensors are views of it
        view, got = memoryview(data), 0
        while got < len(data) and (n := f.readinto(view[got:])):  # one read() returns at most ~2 GiB
            got += n
        if got != len(data) or f.read(1):
            raise ValueError(f"history: {fpath} changed size while being read")
        return data


def check_request(request, where):
    """A request log entry as stored: ValueError naming `where` unless it has the documented shape."""
    ok = (
        isinstance(request, dict)
        and set(request) == {"forget", "method", "model_digest"}
        and isinstance(request["forget"], list)
        and all(type(i) is int for i in request["forget"])
        and isinstance(request["method"], str)
        and isinstance(request["model_digest"], str)
    )
    if not ok:
        raise ValueError(f"history: {where}: a request must be {{'forget': [int], 'method': str, 'model_digest': str}}, got {request!r:.200}")
    return request


def _as_dir(path):
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: must be a str or os.PathLike naming a directory, got {type(path).__name__}")
    return os.fspath(path)


# ----------------------------------------------------------------------------- writing
def hold_recording(path):
    """A file descriptor holding `path`'s RECORDER lock (flock, not waiting) for as long as a recorder streams to it:
    a second recorder on the same history (a resume while the first one still records, in this process or another)
    is refused rather than interleaving its chunks with the first one's. Closing the descriptor, or the process
    ending, releases it."""
    try:
        fd = os.open(os.path.join(path, RECORDER), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise ValueError(f"path: cannot lock {path!r} for recording ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"path: another recorder is still streaming to {path!r} (in this process or another); finish() or close() "
                         "it, or end its process, before resuming the recording") from None
    return fd


@contextlib.contextmanager
def _writer(path):
    """Hold `path`'s LOCK, with objects/ and tmp/ present and tmp/ emptied of crashed writers' files."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a file, not a history directory (format-1 language-model histories were single files: re-record them)")
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if names and not names & {LOCK, CURRENT}:
            what = "a format-1 history (load it and save it to a new path)" if "manifest.json" in names else "other files"
            raise ValueError(f"path: {path!r} holds {what}; refusing to write a history into it")
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    if created:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    try:  # no link may redirect what a writer creates or removes to outside the history
        fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise ValueError(f"path: cannot lock {path!r} ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for sub in (OBJECTS, TMP):
            if os.path.islink(os.path.join(path, sub)):
                raise ValueError(f"path: {path!r}/{sub} is a link; refusing to write a history through it")
            if os.path.lexists(os.path.join(path, sub)) and not os.path.isdir(os.path.join(path, sub)):
                raise ValueError(f"path: {path!r}/{sub} is not a directory; refusing to write a history into {path!r}")
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        _fsync_dir(path)
        _remove(os.path.join(path, TMP), keep=())  # only the lock holder writes there: a crashed writer's files
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_durably(path, parts, name_length=32):
    """A new file in tmp/ holding the concatenated buffers `parts`, hashed as written and flushed to
    disk; (its name, its digest: XXH3-128, or sha256 for name_length 64)."""
    tmp = os.path.join(path, TMP, uuid.uuid4().hex)
    views = [memoryview(part).cast("B") for part in parts]
    if sum(v.nbytes for v in views) >= DIRECT_MIN_BYTES and _direct_io_allowed(path):
        try:
            return tmp, _write_direct(tmp, views, DIGESTS[name_length][1]())
        except _DirectIORefused:
            _DIRECT_REFUSED.add(os.stat(path).st_dev)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    digest = DIGESTS[name_length][1]()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for view in views:
            digest.update(view)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        # A history is read back when a request arrives, not now: its pages, clean after the fsync, go back to the
        # free list, where the next write reuses them. Kept, every chunk takes fresh pages (10x slower to write on
        # the VMs measured, results/recording.md) and pushes training's data out of the page cache.
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return tmp, digest.hexdigest()


# Large objects (a recording's chunks) are written with O_DIRECT where the file system takes it: the page cache's copy
# and write-back cost 1.5 ms of kernel CPU per MB on the VMs measured (dd, 1 GiB, fsync'd: 1.56 s of system time),
# direct writes 0.11 ms, and that CPU is taken from training's cores (docs/storage.md). Direct I/O needs memory, file
# offsets and lengths aligned to the device's blocks. A part whose memory lies at the same offset within a block as its
# bytes in the file (a recorder's row buffers are page-aligned, and _put_tensors pads the header to match) is written
# from where it lies; everything else goes through an aligned staging buffer. The last block is padded with zeros and
# the file truncated to its length before the fsync.
DIRECT_MIN_BYTES = 1 << 20
DIRECT_ALIGN = 4096  # the largest logical block size of common devices; 512-byte devices accept it too
DIRECT_STAGE_BYTES = 8 << 20
DIRECT_IN_PLACE_BYTES = 1 << 20  # a shorter aligned run is copied: a separate write() costs more than the copy
_DIRECT_REFUSED = set()  # st_dev of file systems that refused O_DIRECT (tmpfs, some FUSE): buffered writes there
_STAGE = threading.local()


class _DirectIORefused(Exception):
    pass


def _direct_io_allowed(path):
    return hasattr(os, "O_DIRECT") and os.environ.get("UNLEARN_FAST_DIRECT_IO", "1") != "0" and os.stat(path).st_dev not in _DIRECT_REFUSED


def _stage():
    """This thread's page-aligned staging buffer (an anonymous mmap) as a numpy byte array."""
    if getattr(_STAGE, "array", None) is None or _STAGE.array.size != DIRECT_STAGE_BYTES:
        # private: a process forked from this one (a DataLoader worker) does not share it
        _STAGE.map = mmap.mmap(-1, DIRECT_STAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _STAGE.array = np.frombuffer(_STAGE.map, dtype=np.uint8)
    return _STAGE.array


class _DirectFile:
    """A file written with O_DIRECT, hashed in file order. `written` (what reached the file) stays a multiple of
    DIRECT_ALIGN until close(); `fill` bytes wait in the staging buffer."""

    def __init__(self, tmp, digest):
        try:
            self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
        except OSError as err:
            if err.errno == errno.EINVAL:
                raise _DirectIORefused from None
            raise
        self.tmp, self.digest, self.stage, self.fill, self.written = tmp, digest, _stage(), 0, 0

    def _write(self, view):
        """write() an aligned run (or the padded last one), hashed by the caller."""
        while view:
            try:
                done = os.write(self.fd, view)
            except OSError as err:
                if err.errno == errno.EINVAL and self.written == 0:  # the file system took the open, not the write
                    raise _DirectIORefused from None
                raise
            if done % DIRECT_ALIGN and done != len(view):  # a short write off the block grid cannot be continued directly
                raise OSError(errno.EIO, f"history: short direct write to {self.tmp}")
            view = view[done:]
            self.written += done

    def _flush_stage(self, pad=False):
        length = self.fill
        padded = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN if pad else length
        self.digest.update(self.stage[:length])  # hashed while in cache
        self.stage[length:padded] = 0
        self._write(memoryview(self.stage[:padded]))
        self.fill = 0

    def _copy(self, src):
        at = 0
        while at < src.size:
            n = min(src.size - at, DIRECT_STAGE_BYTES - self.fill)
            self.stage[self.fill:self.fill + n] = src[at:at + n]  # (numpy's copy releases the GIL: training's thread goes on)
            self.fill, at = self.fill + n, at + n
            if self.fill == DIRECT_STAGE_BYTES:
                self._flush_stage()

    def add(self, view):
        src = np.frombuffer(view, dtype=np.uint8)
        if not src.size:
            return
        position = self.written + self.fill
        head = -position % DIRECT_ALIGN
        if (src.ctypes.data - position) % DIRECT_ALIGN or src.size - head < DIRECT_IN_PLACE_BYTES:
            return self._copy(src)
        self._copy(src[:head])  # up to the block boundary, where memory and file are both aligned
        if self.fill:
            self._flush_stage()  # ends on a block boundary: written + fill is one
        run = (src.size - head) // DIRECT_ALIGN * DIRECT_ALIGN
        self.digest.update(src[head:head + run])
        self._write(memoryview(src[head:head + run]))
        self._copy(src[head + run:])

    def close(self):
        """Write what waits (its last block padded), cut the file to its length, fsync; the digest."""
        try:
            length = self.written + self.fill
            if self.fill:
                self._flush_stage(pad=True)
            os.ftruncate(self.fd, length)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        return self.digest.hexdigest()


def _write_direct(tmp, views, digest):
    """_write_durably's file written with O_DIRECT; raises _DirectIORefused where the file system does not take it
    (EINVAL at open or at the first write), before anything reached the file."""
    out = _DirectFile(tmp, digest)
    try:
        for view in views:
            out.add(view)
    except BaseException:
        os.close(out.fd)
        raise
    return out.close()


def _put_object(path, parts, name_length=32):
    tmp, digest = _write_durably(path, parts, name_length)
    os.replace(tmp, os.path.join(path, OBJECTS, digest))
    return digest


def _put_tensors(path, tensors):
    """`tensors` as one safetensors object (8-byte little-endian header length, JSON header padded to 8
    bytes, raw little-endian data), each tensor written from its own memory: saving a history of
    several GB needs no second copy of it. Returns the object's name (its digest)."""
    header, offset = {}, 0
    tensors = dict(sorted(tensors.items(), key=lambda item: -item[1].element_size()))  # widest first: every tensor aligned
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    pad = -len(head) % 8
    if offset >= DIRECT_MIN_BYTES:
        # the header's trailing spaces (which safetensors allows) put the largest tensor at the offset within a disk
        # block at which its memory lies, so a direct write takes it from there (_DirectFile); not where that would
        # misalign the data for the wider dtypes before it
        name, t = max(tensors.items(), key=lambda item: item[1].numel() * item[1].element_size())
        at = t.data_ptr() - header[name]["data_offsets"][0]  # where the data section would lie in memory, mod the block
        if at % 8 == 0:
            pad = (at - 8 - len(head)) % DIRECT_ALIGN
    head += b" " * pad
    data = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors.values() if t.numel()]
    return _put_object(path, [len(head).to_bytes(8, "little"), head, *data])


def _commit(path, manifest):
    """Make `manifest` the current version, then remove every object it does not name."""
    manifest["format_version"] = FORMAT_VERSION  # (a version-2 history gains a request: written as version 3)
    manifest_digest = _put_object(path, [_canonical(manifest)])
    _fsync_dir(os.path.join(path, OBJECTS))  # the objects are durable before CURRENT names them
    body = _canonical({"format": FORMAT, "format_version": FORMAT_VERSION, "manifest": manifest_digest})
    os.replace(_write_durably(path, [body, b"\n", _sha256(body).encode(), b"\n"])[0], os.path.join(path, CURRENT))
    _fsync_dir(path)
    parts = [part["data"] for chunk in manifest.get("chunks", ()) for part in chunk["parts"].values()]
    _remove(os.path.join(path, OBJECTS), keep={manifest_digest, manifest["data"], *parts})


def _remove(directory, keep):
    """Remove the files this module names (64 or 32 hex digits) in `directory`, except `keep`; anything
    else there is not ours and stays."""
    for name in os.listdir(directory):
        if name not in keep and OBJECT_NAME.fullmatch(name):
            with contextlib.suppress(IsADirectoryError):
                os.unlink(os.path.join(directory, name))


def _storable(tensors):
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"history: tensor {name} has dtype {t.dtype}, which histories do not store")
    return tensors


def _table(tensors):
    return {name: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)} for name, t in tensors.items()}


def _link_object(source, path, name):
    """Give `path` the immutable object `name` of the history at `source` as a hard link (no bytes copied; it is
    verified, like every object, when read); False where the two directories cannot share a file (another file
    system, links not supported), and the caller copies it. A trainer checkpoint's copy of a streamed recording
    holds every chunk recorded so far: copied, each checkpoint would rewrite the whole recording. Linked files are
    one file: damage to it (never a write of ours: objects are immutable) shows in both histories."""
    tmp = os.path.join(path, TMP, uuid.uuid4().hex)
    try:
        os.link(os.path.join(source, OBJECTS, name), tmp, follow_symlinks=False)
    except FileNotFoundError:
        raise ValueError(f"history: {source}/objects/{name} is gone (the history there was replaced or removed)") from None
    except OSError:  # EXDEV, EPERM, EMLINK, ...
        return False
    if not stat.S_ISREG(os.lstat(tmp).st_mode):  # a link to a link or a device is not an object of ours
        os.unlink(tmp)
        return False
    os.replace(tmp, os.path.join(path, OBJECTS, name))  # named in objects/ only now; _commit fsyncs the directory
    return True


def _put_part(path, part):
    """Store one chunk part (a dict of tensors, or a StoredPart) in `path`; its manifest entry."""
    if isinstance(part, StoredPart):
        if os.path.abspath(part.path) != os.path.abspath(path) and not (part.link and _link_object(part.path, path, part.data)):
            data, _ = _read_object(part.path, part.data)
            if _put_object(path, [data], len(part.data)) != part.data:  # under its own name: the manifest's entry stays
                raise ValueError(f"history: {part.path}/objects/{part.data} changed while being copied")
        return {"data": part.data, "tensors": part.tensors}
    tensors = _storable(part)
    return {"data": _put_tensors(path, tensors), "tensors": _table(tensors)}


def _put_chunk(path, steps, mark, parts):
    if not (type(steps) is int and steps >= 0) or not (mark is None or isinstance(mark, str)):
        raise ValueError(f"history: a chunk needs steps >= 0 and a str mark or None, got {steps!r}, {mark!r}")
    return {"steps": steps, "mark": mark, "parts": {name: _put_part(path, part) for name, part in parts.items()}}


def write(path, kind, info, tensors, requests=(), chunks=()):
    """Store a new version at directory `path` (created if needed); returns its Snapshot.content.
    tensors: the head's {name: tensor}, or a StoredPart (link_copy: the head of a stored version, written again
    only where `path` is another directory).
    chunks: [(steps, mark, {part name: tensors dict or StoredPart})], in order (a recording's appended steps)."""
    path = _as_dir(path)
    head = tensors if isinstance(tensors, StoredPart) else _storable(tensors)
    requests = [check_request(r, "requests") for r in requests]
    try:
        _canonical(info)
    except (TypeError, ValueError) as err:
        raise ValueError(f"history: meta must be JSON-able to be saved ({err})") from None
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "info": info,
        "requests": requests,
    }
    with _writer(path):
        manifest["chunks"] = [_put_chunk(path, *chunk) for chunk in chunks]
        entry = _put_part(path, head)
        manifest["data"], manifest["tensors"] = entry["data"], entry["tensors"]
        _commit(path, manifest)
    return _content_digest(manifest)


def _locked_manifest(path, kind):
    try:
        return _manifest_of(path, _current(path), kind)[0]
    except FileNotFoundError as err:  # nobody else writes while we hold the lock: this is damage
        raise ValueError(f"history: {err.filename} of the current version of {path!r} is missing") from None


def _check_recording(manifest, path, recording):
    if manifest["info"].get("recording") != recording:
        raise ValueError(f"history: {path!r} was replaced by another history while it was being recorded; the recorder stops")


def append_chunk(path, kind, recording, steps, parts, mark=None):
    """Append a chunk of `steps` recorded steps ({part name: tensors}) to the history being recorded at
    `path` (its info["recording"] must be `recording`); a new version, so a crash keeps every earlier chunk.
    mark: a label to truncate back to (resume)."""
    path = _as_dir(path)
    with _writer(path):
        manifest = _locked_manifest(path, kind)
        _check_recording(manifest, path, recording)
        manifest["chunks"].append(_put_chunk(path, steps, mark, parts))
        _commit(path, manifest)


def truncate(path, kind, recording, chunks):
    """Keep only the first `chunks` chunks of the history being recorded at `path` (resume from a mark)."""
    path = _as_dir(path)
    with _writer(path):
        manifest = _locked_manifest(path, kind)
        _check_recording(manifest, path, recording)
        del manifest["chunks"][chunks:]
        _commit(path, manifest)


def read_part(path, part, where):
    """The tensors of a chunk part (an entry of Snapshot.chunks[i]["parts"]), verified; ValueError if the
    history at `path` was replaced since its Snapshot was read (its objects are gone)."""
    try:
        data, fpath = _read_object(_as_dir(path), part["data"])
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"history: {where}: {path!r} was replaced or removed since it was loaded (chunk {part['data'][:12]} is gone)") from None
    return decode(data, part["tensors"], fpath)


def append(path, kind, request, content):
    """Append `request` to the log of the history at `path`, which must still be the one named by
    `content`; returns the whole log as now stored."""
    path = _as_dir(path)
    request = check_request(request, "request")
    if not os.path.isdir(path):
        raise ValueError(f"history: {path!r} no longer exists; the request was not logged there")
    with _writer(path):
        manifest = _locked_manifest(path, kind)
        if _content_digest(manifest) != content:
            raise ValueError(f"history: {path!r} was replaced by another history since this one was loaded or saved; the request was not logged there")
        manifest["requests"].append(request)
        _commit(path, manifest)
    return manifest["requests"]


# ----------------------------------------------------------------------------- reading
def _current(path):
    """The bytes of `path`/CURRENT; ValueError if there is none."""
    try:
        return read_file(os.path.join(path, CURRENT))
    except (FileNotFoundError, NotADirectoryError):
        if os.path.isfile(path):
            hint = "a file, not a history directory; format-1 language-model histories were single files: re-record them"
        elif os.path.isdir(os.path.join(path, OBJECTS)):
            hint = "a save was interrupted before its first version was complete"
        else:
            hint = "not written by save()"
        raise ValueError(f"history: {path!r} holds no history (no manifest: {hint})") from None


def _loads(data, what):
    """JSON from bytes; ValueError naming `what` for anything else (invalid UTF-8 or JSON, nesting past the recursion
    limit, an integer past Python's digit limit: a plain ValueError of json's that named nothing)."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"history: {what} is not readable JSON ({type(err).__name__}: {str(err)[:200]})") from None


def _manifest_of(path, raw, kind):
    """(manifest, its file) named by CURRENT's bytes `raw`; FileNotFoundError if the object is gone."""
    body, _, checksum = raw[:-1].rpartition(b"\n")
    if not (raw.endswith(b"\n") and checksum == _sha256(body).encode()):
        raise ValueError(f"history: {path}/{CURRENT} is corrupted (its checksum does not match)")
    try:
        pointer = _loads(body, f"{path}/{CURRENT}")
        if not (isinstance(pointer, dict) and pointer.get("format") == FORMAT and pointer.get("format_version") in READABLE_VERSIONS):
            raise ValueError(f"history: {path}/{CURRENT} is format {pointer!r:.200}, expected {FORMAT} version {FORMAT_VERSION}")
        digest = pointer.get("manifest")
        if not (isinstance(digest, str) and OBJECT_NAME.fullmatch(digest)):
            raise ValueError(f"history: {path}/{CURRENT} names no valid manifest object")
        data, fpath = _read_object(path, digest)
        manifest = _loads(data, f"the manifest of {path!r}")
    except UnicodeDecodeError as err:
        raise ValueError(f"history: {path!r} has an unreadable pointer or manifest ({type(err).__name__}: {err})") from None
    _check_manifest(manifest, kind, fpath)
    return manifest, fpath


def _read_object(path, digest):
    fpath = os.path.join(path, OBJECTS, digest)  # digest is 32 or 64 hex digits: the name stays inside path
    data = read_file(fpath)
    if DIGESTS[len(digest)][1](data).hexdigest() != digest:
        raise ValueError(f"history: {fpath} is corrupted ({DIGESTS[len(digest)][0]} mismatch)")
    return data, fpath


def _check_manifest(manifest, kind, where):
    def need(ok, what):
        if not ok:
            raise ValueError(f"history: manifest {where} {what}")

    need(isinstance(manifest, dict), "is not a JSON object")
    need(manifest.get("format") == FORMAT and manifest.get("format_version") in READABLE_VERSIONS, f"has format {manifest.get('format')!r} version {manifest.get('format_version')!r}")
    need(manifest.get("kind") == kind, f"holds a {manifest.get('kind')!r}, not a {kind}")
    need(isinstance(manifest.get("info"), dict), "lacks its 'info' object")
    need(isinstance(manifest.get("data"), str) and OBJECT_NAME.fullmatch(manifest["data"]), "names no valid data object")
    def tensor_table(tensors):
        need(isinstance(tensors, dict), "lacks a 'tensors' object")
        for name, entry in tensors.items():
            need(
                isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
                and all(type(s) is int and s >= 0 for s in entry["shape"]),
                f"describes tensor {name!r} without a dtype and a shape of non-negative ints",
            )

    tensor_table(manifest.get("tensors"))
    if manifest["format_version"] == 2:
        need("chunks" not in manifest, "of version 2 has chunks")
        manifest["chunks"] = []
    need(isinstance(manifest.get("chunks"), list), "lacks its 'chunks' list")
    for chunk in manifest["chunks"]:
        need(isinstance(chunk, dict) and set(chunk) == {"steps", "mark", "parts"} and type(chunk["steps"]) is int and chunk["steps"] >= 0
             and (chunk["mark"] is None or isinstance(chunk["mark"], str)) and isinstance(chunk["parts"], dict), "has a malformed chunk")
        for part in chunk["parts"].values():
            need(isinstance(part, dict) and set(part) == {"data", "tensors"} and isinstance(part["data"], str) and OBJECT_NAME.fullmatch(part["data"]),
                 "names no valid chunk object")
            tensor_table(part["tensors"])
    need(isinstance(manifest.get("requests"), list), "lacks its 'requests' list")
    for request in manifest["requests"]:
        check_request(request, f"manifest {where}")


def read(path, kind):
    """The current version at `path` as a Snapshot; ValueError if it is missing, corrupted or not a `kind`."""
    path = _as_dir(path)
    for _ in range(READ_ATTEMPTS):
        raw = _current(path)
        try:
            manifest, fpath = _manifest_of(path, raw, kind)
            data, data_path = _read_object(path, manifest["data"])
        except (FileNotFoundError, NotADirectoryError) as err:
            if _current(path) != raw:
                continue  # a writer replaced this version while we read it: read the new one
            raise ValueError(f"history: {err.filename} of the current version of {path!r} is missing") from None
        return Snapshot(manifest["kind"], manifest["info"], decode(data, manifest["tensors"], data_path), manifest["requests"],
                        _content_digest(manifest), manifest["chunks"], manifest["data"])
    raise ValueError(f"history: {path!r} was replaced {READ_ATTEMPTS} times while being read; try again")


def decode(data, expected, where):
    """The tensors of safetensors file `data` (a bytearray: they are views of it, not copies, so a load
    needs the history's size in memory once). It must hold exactly the names, dtypes and shapes of
    `expected` ({name: {"dtype", "shape"}}), with offsets that tile its data; ValueError naming `where`
    and the tensor otherwise. Only these checks stand between a crafted file and torch.frombuffer."""
    def refuse(why):
        raise ValueError(f"history: {where} is not a valid safetensors file ({why})")

    if len(data) < 8 or int.from_bytes(data[:8], "little") > len(data) - 8:
        refuse("its header length runs past its end")
    start = 8 + int.from_bytes(data[:8], "little")
    try:
        header = _loads(data[8:start], where)
    except ValueError as err:
        refuse(f"its header is not JSON: {err}")
    if not isinstance(header, dict):
        refuse("its header is not a JSON object")
    header.pop("__metadata__", None)
    if set(header) != set(expected):
        raise ValueError(f"history: {where} holds tensors {sorted(header)[:8]}, the manifest lists {sorted(expected)[:8]}")
    spans = []
    for name, entry in header.items():
        dtype = TORCH_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if dtype is None or str(dtype).replace("torch.", "") != expected[name]["dtype"] or entry.get("shape") != expected[name]["shape"]:
            raise ValueError(f"history: tensor {name} in {where} is {entry!r:.120}, the manifest says {expected[name]['dtype']} {expected[name]['shape']}")
        offsets, size = entry.get("data_offsets"), math.prod(entry["shape"]) * dtype.itemsize  # shape: ints >= 0 (manifest checked)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets) and offsets[1] - offsets[0] == size):
            refuse(f"tensor {name} has data offsets {offsets!r:.60} for {size} bytes")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    ends = [0] + [stop for _, stop, _ in spans]
    if [begin for begin, _, _ in spans] != ends[:-1] or ends[-1] != len(data) - start:
        refuse("its tensors do not tile its data exactly")
    tensors = {}
    for begin, stop, name in spans:
        dtype = TORCH_DTYPES[header[name]["dtype"]]
        raw = torch.frombuffer(data, dtype=torch.uint8, count=stop - begin, offset=start + begin) if stop > begin else torch.empty(0, dtype=torch.uint8)
        if (start + begin) % dtype.itemsize:  # a view as dtype must be aligned to it (our writer keeps every tensor aligned)
            raw = raw.clone()
        if dtype == torch.bool and bool((raw > 1).any()):
            refuse(f"tensor {name} holds bools other than 0 and 1")
        tensors[name] = raw.view(dtype).reshape(header[name]["shape"])
    return tensors


def check_tensor(tensors, name, where, dtypes, ndim):
    """tensors[name], which must exist with one of `dtypes` and `ndim` dimensions; ValueError naming it."""
    t = tensors.get(name)
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or t.dim() != ndim:
        got = f"{t.dtype} with shape {list(t.shape)}" if isinstance(t, torch.Tensor) else "missing"
        raise ValueError(f"history: tensor {name} in {where} must be {ndim}-D {'/'.join(str(d) for d in dtypes)}, got {got}")
    return t
