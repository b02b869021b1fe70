"""Writing an output folder without ever losing the user's files.

- **Refused before any work**: an existing output is replaced only with ``overwrite=True``
  (``--overwrite``), and then only when it is a folder potq wrote holding nothing but potq's
  own files: a quantization that would end by refusing its output is refused before it starts,
  and a file the user kept in the folder is never deleted.
- **Atomic replacement**: the new folder is written under a temporary sibling
  ``.NAME.tmp-PID-XXXX`` and swapped in with one ``renameat2(RENAME_EXCHANGE)`` (Linux), so
  the final name always holds either the complete old folder or the complete new one. Where the
  exchange is not available, the old folder is first renamed to ``.NAME.old-PID`` and the new
  one renamed into place; a crash between the two renames leaves the old folder there, and the
  next write to the same name moves it back (or ``mv .NAME.old-PID NAME`` by hand).
- **Stale siblings cleaned**: temporary siblings of processes that no longer run are removed
  the next time potq writes to that name.
- **Ordinary permissions**: the folder gets 0777 and its files 0666, less the umask.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

from potq.errors import PotqError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_output(out: Path, overwrite: bool, marker: str, own_files: Collection[str]) -> None:
    """Refuse ``out`` unless it is free, or ``overwrite`` and it is a folder potq wrote
    (``marker`` inside) holding only ``own_files``. Call it before any long work."""
    recover(out, marker)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise PotqError(f"{out} exists and is not a folder: choose another output path")
    if not (out / marker).is_file():
        raise PotqError(f"{out} exists and is not a potq model folder: choose another output path")
    if not overwrite:
        raise PotqError(f"{out} already holds a potq model: pass --overwrite (overwrite=True) to replace it, "
                        "or choose another output path")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own_files)
    if foreign:
        raise PotqError(f"{out} also holds files potq did not write ({', '.join(foreign[:3])}): "
                        "move them out or choose another output path")


def temp_folder(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` (its name says which process owns it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def publish(tmp: Path, out: Path) -> None:
    """Give ``tmp``'s files ordinary permissions and move it to ``out``, replacing an old ``out``
    atomically; the old folder is removed only once the new one is in place."""
    umask = _umask()
    os.chmod(tmp, 0o777 & ~umask)
    for file in tmp.iterdir():
        if file.is_file():
            os.chmod(file, 0o666 & ~umask)
    if out.exists():
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def recover(out: Path, marker: str) -> None:
    """Put back the old folder a crash between the two renames of :func:`publish` left aside."""
    if out.exists() or out.is_symlink() or not out.parent.is_dir():
        return
    olds = sorted((p for p in out.parent.glob(f".{out.name}.old-*") if (p / marker).is_file()),
                  key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], out)


def clean_stale(out: Path) -> None:
    """Remove the temporary siblings of ``out`` left by processes that no longer run."""
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for sibling in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = sibling.name[len(f".{out.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)) and (kind == "tmp" or out.exists()):
                shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot replace {b}: {os.strerror(ctypes.get_errno())}")


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current
