# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Output folders: every command that writes a folder goes through here, so that none can lose a user's files.

The rules, checked before anything is written:
- OUT may not be a source of the command, lie inside one, or contain one (with or without overwrite).
- An existing OUT is replaced only with `overwrite=True`, and only when it is empty or holds a previous output of
  hf-moe: a folder with the record `.hf-moe-output.json` whose listed entries are all that is in it (plus, for a
  fine-tune, Trainer's `checkpoint-N/` and `runs/`). Anything else in it (a notes.txt, a checkpoint of another
  tool) makes hf-moe refuse, naming what it would have deleted.

- `atomic_output_dir(out)` writes into a temporary sibling `.OUT.tmp-PID-xxxxxxxx` renamed to OUT when the block
  succeeds; on any exception (KeyboardInterrupt and SIGTERM, which the CLI turns into one, included) it is deleted
  and OUT is left as it was. Temporary folders that a killed run (SIGKILL, power loss) left next to OUT are deleted
  on the next write to the same OUT.
- `prepare_output_dir(out)` is for commands that write into OUT as they go (a fine-tune's checkpoints, the
  quickstart's steps): it checks, removes a previous hf-moe output when asked to, and records the new owner.
"""

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

OWNER_FILE = ".hf-moe-output.json"
# What Trainer writes into a fine-tune's output folder while it runs (before the run lists its files).
TRAINER_ENTRIES = re.compile(r"checkpoint-\d+|runs")
# `.OUT.tmp-PID-xxxxxxxx` (being written) and `.OUT.old-PID-xxxxxxxx` (the replaced OUT, deleted once the new one is
# in place); earlier versions of hf-moe named them `.OUT.tmp-xxxxxxxx` without the process id.
_SIBLING = r"\.{name}\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{{8}}"
LEGACY_TEMPORARY_AGE_S = 3600  # a pid-less temporary folder older than this belongs to no running write


class OutputPathError(ValueError):
    """OUT overlaps a source of the command. One line naming both; the CLI prints it without a traceback."""


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, sources: Iterable = (),
                     resume: bool = False) -> Path:
    """Raise if writing OUT could lose data; returns OUT as an absolute path. Nothing is written.

    `sources`: the folders and files the command reads (None entries and Hub ids that are not local paths are
    ignored). `resume`: the command continues its own earlier run in OUT (a fine-tune's checkpoints), so an existing
    hf-moe output is kept rather than replaced.
    """
    out = Path(out).absolute()
    for source in sources:
        _check_not_overlapping(out, source)
    if not out.exists():
        return out
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another output path")
    if not any(out.iterdir()):
        return out
    if not (overwrite or resume):
        raise FileExistsError(f"{out} already exists and is not empty: choose another folder, or pass overwrite=True "
                              f"(--overwrite) to replace an earlier output of hf-moe")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out} holds files that hf-moe did not write ({shown}); --overwrite only replaces an earlier output of "
            f"hf-moe (a folder with its {OWNER_FILE} record) or an empty folder. Move those files, or choose another "
            f"output folder"
        )
    return out


def _check_not_overlapping(out: Path, source) -> None:
    if source is None or not os.path.exists(source):
        return
    out_real, source_real = _real(out), _real(Path(source))
    if out_real == source_real:
        raise OutputPathError(f"the output folder {out} is the source {source}: write to another folder")
    if source_real in out_real.parents:
        raise OutputPathError(f"the output folder {out} lies inside the source {source}: write outside it")
    if out_real in source_real.parents:
        raise OutputPathError(f"the output folder {out} contains the source {source}: replacing it would delete "
                              f"the source; write to another folder")


def _real(path: Path) -> Path:
    """The path with symbolic links resolved, also for a path that does not exist yet."""
    return Path(os.path.realpath(path))


def foreign_entries(folder: Path) -> list[str]:
    """Names in `folder` that no hf-moe output record there accounts for (all of them when there is no record)."""
    names = sorted(name for name in os.listdir(folder) if name != OWNER_FILE)
    record = read_owner_record(folder)
    if record is None:
        return names
    listed = set(record.get("files", []))
    allowed = TRAINER_ENTRIES if record.get("command") == "finetune" else None
    return [name for name in names if name not in listed and not (allowed and allowed.fullmatch(name))]


def read_owner_record(folder: str | os.PathLike) -> dict | None:
    """The parsed `.hf-moe-output.json` of `folder`, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files", []), list) else None


def write_owner_record(folder: str | os.PathLike, command: str, files: Iterable[str] | None = None) -> None:
    """Record that hf-moe `command` wrote `folder`, listing its entries (default: what is in it now)."""
    folder = Path(folder)
    if files is None:
        files = (name for name in os.listdir(folder) if name != OWNER_FILE)
    record = {"command": command, "files": sorted(set(files))}
    (folder / OWNER_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


@contextmanager
def atomic_output_dir(out: str | os.PathLike, command: str, overwrite: bool = False,
                      sources: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary folder next to OUT that becomes OUT when the block succeeds.

    Checks OUT first (`check_output_dir`); an existing OUT is replaced only at the very end, once the new content
    is complete. On any exception the temporary folder is deleted and OUT is untouched. Missing parent folders of
    OUT are created.
    """
    out = check_output_dir(out, overwrite, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    temporary = _sibling(out, "tmp")
    temporary.mkdir()
    try:
        yield temporary
        write_owner_record(temporary, command)
        _replace_dir(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def prepare_output_dir(out: str | os.PathLike, command: str, overwrite: bool = False, sources: Iterable = (),
                       resume: bool = False, files: Iterable[str] | None = None) -> Path:
    """Make OUT ready for a command that writes into it as it goes; returns OUT as an absolute path.

    After the checks of `check_output_dir`, an earlier output is removed when `overwrite` (and not `resume`), OUT
    is created, and the record names `command` as its owner with the entries `files` it will write (a fine-tune
    lists them when it finishes: `write_owner_record`).
    """
    out = check_output_dir(out, overwrite, sources, resume)
    if out.exists() and any(out.iterdir()) and not resume:
        logger.warning(f"replacing the earlier hf-moe output in {out}")
        for entry in out.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if read_owner_record(out) is None or not resume:
        write_owner_record(out, command, files or ())
    return out


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _replace_dir(new: Path, out: Path) -> None:
    """Move `new` to `out`; an existing `out` is moved aside first and deleted once `new` is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_siblings(out: Path) -> None:
    """Delete the temporary folders that killed writes of OUT left next to it.

    A sibling belongs to a dead write when its process id is not running (pid-less ones of earlier versions: when
    older than an hour). A stale `.old` folder is the OUT that a write was replacing when it was killed: it is put
    back when OUT is missing, deleted otherwise.
    """
    pattern = re.compile(_SIBLING.format(name=re.escape(out.name)))
    for sibling in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(sibling.name)
        if match is None or not sibling.is_dir() or not _stale(sibling, match["pid"]):
            continue
        if match["kind"] == "old" and not out.exists():
            os.replace(sibling, out)
            logger.warning(f"restored {out} from {sibling.name}, which a killed write left")
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        logger.warning(f"removed {sibling}, left by a killed write of {out}")


def _stale(sibling: Path, pid: str | None) -> bool:
    if pid is None:
        return time.time() - sibling.stat().st_mtime > LEGACY_TEMPORARY_AGE_S
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists but is not ours (PermissionError), or the question failed: leave it
        return False
    return False
