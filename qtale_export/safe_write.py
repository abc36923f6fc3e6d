"""The one rule every writing command follows, so no command destroys what the user had.

- An existing output is refused unless `force`; with `force` the new result is built beside it and
  swapped in only after it is complete (the old one is never deleted first), and only over an
  output QTALE wrote, of the same kind (`KINDS`: a checkpoint's qtale.json, an export's
  manifest.json, a Triton repository's models) or an empty folder: `--force` pointed at a folder
  of the user's own files is refused.
- An output never lies in, on, or around a source folder (`qtale quantize CK --out CK`).
- Temporary files and folders are named `.NAME.qtale-tmp-PID-xxxx` (and `.NAME.qtale-old-PID`
  while a folder is being replaced): a later run removes those of dead processes and says so, and
  removes an old copy left by a replacement that was cut (never restoring it over a target the
  user may have deleted since: the user had asked for it to be replaced).
- Published folders and files get the user's umask, like any other tool's output (mkdtemp's and
  mkstemp's 0700 / 0600 are widened to it).
- In-place updates of a folder's JSON file (`qtale calibrate` on qtale.json) hold an flock on the
  folder while they read, modify and write, so concurrent updates all land.
- SIGTERM is turned into the same clean-up path as Ctrl-C (see `handle_sigterm`).
Torch-free: the runtime and the Triton builder use it too.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import QtaleError

TMP = "qtale-tmp"
OLD = "qtale-old"
# .NAME.qtale-tmp-PID-xxxx or .NAME.qtale-old-PID (NAME may itself contain dots)
_OURS = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>{TMP}|{OLD})-(?P<pid>\d+)(?:-.*)?$")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` removes its temporaries."""


def handle_sigterm() -> None:
    """Make SIGTERM unwind the stack (clean-up included) instead of killing the process on the spot."""
    def raise_terminated(signum, frame):
        raise Terminated()

    with contextlib.suppress(ValueError):  # not the main thread: leave the default
        signal.signal(signal.SIGTERM, raise_terminated)


def is_ours(name: str) -> bool:
    """A temporary or old-copy name this module made (never listed in a checkpoint or an export)."""
    return _OURS.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep(folder: str | os.PathLike, say: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the temporaries of dead processes in `folder` (and restore a cut replacement).
    Returns what was removed; `say` gets one line per item (default: stderr)."""
    folder = Path(folder)
    say = say or (lambda line: print(line, file=sys.stderr))
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _OURS.match(p.name)
        if m is None or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        say(f"qtale: removed stale temporary {p} (process {m['pid']} is no longer running)")
    return removed


def tmp_prefix(target: Path) -> str:
    return f".{target.name}.{TMP}-{os.getpid()}-"


def staging_dir(target: str | os.PathLike) -> Path:
    """A new empty folder beside `target`, named after it and this process (after a sweep)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(target), dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the published folder from other users
    return tmp


def _triton_repository(folder: Path) -> bool:
    """A Triton model repository: its visible entries are model folders, each with a config.pbtxt."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(p.is_dir() and not p.is_symlink() and (p / "config.pbtxt").is_file() for p in entries)


# what `--force` may replace, by kind of output: a folder QTALE wrote of that kind (or an empty one)
KINDS: dict[str, Callable[[Path], bool]] = {
    "checkpoint": lambda f: (f / "qtale.json").is_file() or (f / "train_state.json").is_file(),
    "export": lambda f: (f / "manifest.json").is_file(),
    "triton": _triton_repository,
}


def is_output(folder: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether `folder` is empty or an output QTALE wrote, of `kind` (None: of any kind)."""
    folder = Path(folder)
    if not any(folder.iterdir()):
        return True
    return any(check(folder) for name, check in KINDS.items() if kind in (None, name))


def check_output(out: str | os.PathLike, *, force: bool, sources: Iterable[str | os.PathLike | None] = (),
                 what: str = "--out", kind: str | None = None) -> Path:
    """Refuse an output that exists (unless `force`), is not a folder, is not a QTALE output of
    `kind` (a KINDS name; None: of any kind), or overlaps a source folder."""
    out = Path(out)
    real = out.resolve()
    for src in sources:
        if src is None or not str(src):
            continue
        s = Path(src)
        if not s.exists():
            continue
        s = s.resolve()
        if real == s or s in real.parents or real in s.parents:
            raise QtaleError(f"{what} {out} is the source {src} or overlaps it: write to another folder")
    if out.exists() or out.is_symlink():
        if not force:
            raise QtaleError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink():
            raise QtaleError(f"{out} exists and is not a folder: --force replaces folders only")
        if not is_output(out, kind):
            raise QtaleError(f"{out} is not a QTALE {kind or 'output'} (no {MARKS.get(kind, 'qtale.json, manifest.json or Triton models')}): "
                             "--force replaces only what QTALE wrote; choose another --out or remove it yourself")
    return out


MARKS = {"checkpoint": "qtale.json", "export": "manifest.json", "triton": "model folders with config.pbtxt"}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the permissions the user's umask allows (a library that
    writes through mkstemp, such as a safetensors or ONNX writer, leaves 0600 files behind)."""
    mask = _umask()
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o7777
        want = mode | ((0o777 if p.is_dir() else 0o666) & ~mask)
        if want != mode:
            p.chmod(want)


def publish(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder `tmp` onto `target`. An older `target` is swapped with it in one
    step where the system can (so `target` is always the old or the new folder), else moved aside
    first; it is deleted only once the new one is in place (a cut between the two renames is
    undone by the next `sweep`)."""
    tmp, target = Path(tmp), Path(target)
    _follow_umask(tmp)
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.{OLD}-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if _exchange(tmp, target):
        os.replace(tmp, old)  # tmp now holds the old folder
    else:
        os.replace(target, old)
        os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(out: str | os.PathLike, *, force: bool = False,
           sources: Iterable[str | os.PathLike | None] = (), kind: str | None = None) -> Iterator[Path]:
    """`with staged(out, force=...) as tmp:` write into tmp; it becomes `out` only if the block
    succeeds (re-checking that `out` did not appear meanwhile); on any error tmp is removed."""
    out = check_output(out, force=force, sources=sources, kind=kind)
    tmp = staging_dir(out)
    try:
        yield tmp
        check_output(out, force=force, kind=kind)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def temporary(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A new empty file beside `target`, named after it and this process (so a killed run's is swept);
    removed on exit unless the block moved it into place."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(target), suffix=suffix, dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the published file from other users
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file in the same folder, fsync and rename (readers see old or new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary(path) as tmp:
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: dict, indent: int | None = 2) -> None:
    """JSON through write_bytes (readers see the old or the new file, never a part)."""
    write_bytes(path, (json.dumps(data, indent=indent, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def locked(folder: str | os.PathLike, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `folder` (waiting, and saying so, if another process holds it)."""
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (say or (lambda line: print(line, file=sys.stderr)))(
                f"qtale: waiting for another process that is updating {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def update_json(path: str | os.PathLike, change: Callable[[dict], dict], read: Callable[[Path], dict],
                say: Callable[[str], None] | None = None) -> dict:
    """Read-modify-write of a JSON file under the folder's lock: `change(read(path))` is written back
    atomically; concurrent updates are serialised, so none is lost."""
    path = Path(path)
    with locked(path.parent, say):
        data = change(read(path))
        write_json(path, data)
    return data
