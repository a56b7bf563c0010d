"""Whether a pulled model file is still the one whose sha256 was checked.

A file's name, size and modification time can all be kept while its bytes change (`cp` over it,
then `touch -r`): the manifest's size check passes, and the output changes silently. What cannot
be set back is the inode and the change time (ctime: every write, and every utime that restores
an mtime, moves it). So the device, inode, size and ctime are recorded beside the manifest when
the file's sha256 was last checked, and a file whose identity differs is hashed again before it
is used: the same bytes are recorded anew (a chmod or a new hard link also moves ctime), other
bytes are a one-line error. A store from before these records hashes each model once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from specrun.catalog import ModelEntry
from specrun.errors import ModelFileError
from specrun.files import sha256_file
from specrun.store import Pulled, Store

RECORD = "verified.json"  # in the model's store directory, beside manifest.json


def identity(path: Path) -> list[int]:
    """What a rewrite in place changes even when the mtime is set back."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns]


def record(store: Store, pulled: Pulled) -> None:
    """Remember that `pulled`'s file, as it is now, has its manifest's sha256 (just checked)."""
    if pulled.files is not None or not pulled.sha256:  # a directory: its files were checked against the hub
        return
    data = {"sha256": pulled.sha256, "identity": identity(Path(pulled.path))}
    try:
        (store.model_dir(pulled.name) / RECORD).write_text(json.dumps(data) + "\n")
    except OSError:  # a read-only store: checked again next time
        pass


def check(store: Store, entry: ModelEntry, notice: Callable[[str], None] = lambda _: None) -> None:
    """ModelFileError if `entry`'s pulled file changed since its sha256 was checked; hashes it
    again only when its identity changed (or was never recorded)."""
    pulled = store.pulled(entry)
    if pulled is None or pulled.files is not None or entry.path is not None or not pulled.sha256:
        return  # not pulled, a directory, or a file of the user's registered by path (no sha256 pinned)
    path = Path(pulled.path)
    try:
        seen = json.loads((store.model_dir(entry.name) / RECORD).read_text())
    except (OSError, ValueError):
        seen = None
    if seen == {"sha256": pulled.sha256, "identity": identity(path)}:
        return
    why = "it changed on disk" if seen else "no record of its last check"
    notice(f"checking {path.name}'s sha256 ({why})…")
    if sha256_file(path) != pulled.sha256:
        raise ModelFileError(f"{path} changed since it was pulled: its sha256 no longer matches",
                             hint=f"pull it again: specrun rm {entry.name} && specrun pull {entry.name}")
    record(store, pulled)
