"""Writing outputs so that a failure never leaves a half-written file in place of a good one."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, OutputError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.
    The file gets the permissions a plain ``open(path, "w")`` would leave: those of the file it
    replaces, or else 0o666 less the umask (a temporary file is made private, 0o600, and a
    report or result that only its writer can read is no use on a shared disk or server)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"could not write {path} ({e.strerror or e}); the file there before, "
                          "if any, is unchanged") from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits for a new version of ``path``: its own where it exists."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, as it is now: from /proc on Linux; elsewhere by setting it and
    setting it back (the only portable way, but for a moment process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_writable_dir(path: Path, option: str = "--out") -> None:
    """Raise ConfigError unless ``path`` is, or could be made as, a writable directory.

    Creates nothing: the test file goes into ``path`` or its nearest existing ancestor.
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == path else \
            f"cannot be made: {existing} is not a directory"
        raise ConfigError(f"{option} {path} {what}; give a directory")
    _prove_writable(existing, path, option)


def check_output_file(path: Path, suffix: str, option: str) -> None:
    """Raise ConfigError unless ``path`` names a ``suffix`` file (``.png``) in a folder that is,
    or could be made, writable: a typo must not put a figure over a result.json or a
    pyproject.toml. Creates nothing."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ConfigError(f"{option} {path} is not a {suffix} file; give a file name ending in "
                          f"{suffix}, such as {path.with_suffix(suffix).name}")
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give the {suffix} file to write, "
                          f"such as {path / ('out' + suffix)}")
    check_writable_dir(path.absolute().parent, option)


def ensure_writable_dir(path: Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and prove that files can be created in it, or raise ConfigError."""
    path = Path(path)
    check_writable_dir(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {path} cannot be made ({e.strerror}); give a writable "
                          "directory") from None
    _prove_writable(path, path, option)
    return path


def _prove_writable(folder: Path, path: Path, option: str) -> None:
    """Create and remove a file in ``folder``; ``path`` is what the message names."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{option} {path} is not writable ({e.strerror}); give a writable "
                          "directory") from None
