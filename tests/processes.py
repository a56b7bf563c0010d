"""Child processes for tests: Ctrl-C's default meaning, and never a child left running.

A process started in the background by a non-interactive shell (`cmd &`, nohup, a CI
step's background job) inherits SIGINT as ignored, and so do its children; Python then
installs no KeyboardInterrupt handler. A test sending SIGINT to such a child waited out its
timeout while the child went on (a 2000-token generation). subprocess's
`restore_signals` resets only SIGPIPE, SIGXFZ and SIGXFSZ, so every child started here
gets SIGINT's default disposition explicitly, and is killed and reaped when its test ends,
passed, failed or timed out.
"""

from __future__ import annotations

import os
import platform
import select
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    import pexpect

# Seconds after which a child counts as hung rather than slow, for the real models: their
# runs took minutes each while other work kept the 2 cores busy (a cost curve measured
# again per run included), and a limit here only has to end a hang, never to time a run.
HANG = 900


def default_sigint() -> None:
    """preexec_fn: the child reacts to Ctrl-C as from a terminal, whatever its parent ignores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(argv: str | Sequence[str | bytes], *, timeout: float = HANG, **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` with the default SIGINT and always a timeout (on which it kills and reaps the child)."""
    return subprocess.run(argv, preexec_fn=default_sigint, timeout=timeout, **kwargs)


@contextmanager
def spawned(argv: Sequence[str | bytes], **kwargs: Any) -> Iterator[subprocess.Popen]:
    """`subprocess.Popen` with the default SIGINT; on leaving, the child is killed if still
    running, its pipes closed and it is reaped, whatever the test did meanwhile."""
    with subprocess.Popen(argv, preexec_fn=default_sigint, **kwargs) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
    # Popen's own exit closed the pipes and waited for it.


@contextmanager
def in_terminal(argv: Sequence[str], **kwargs: Any) -> Iterator["pexpect.spawn"]:
    """`pexpect.spawn` (a pseudo-terminal) with the default SIGINT, so `sendintr` is Ctrl-C;
    on leaving, the child is closed, by force if it still runs."""
    import pexpect

    child = pexpect.spawn(argv[0], list(argv[1:]), preexec_fn=default_sigint, **kwargs)
    try:
        yield child
    finally:
        child.close(force=True)


@contextmanager
def ignoring_sigint() -> Iterator[None]:
    """This process ignoring SIGINT for a while, as a background job of a non-interactive
    shell does from its start: what its children inherit unless told otherwise."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


_READ_SYSCALL = {"x86_64": 0, "aarch64": 63}  # the read(2) system call's number, per architecture


def wait_until_reading(proc: subprocess.Popen, fd: int = 0, timeout: float = 60) -> None:
    """Until `proc` blocks reading file descriptor `fd` (Linux: /proc/PID/syscall names the
    call it waits in). A signal sent earlier may come before Python installed its handlers,
    or while it imports, not where the test means it. Where /proc cannot tell, a fixed wait."""
    number = _READ_SYSCALL.get(platform.machine())
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the child ended (exit {proc.returncode}) before reading fd {fd}"
        try:
            fields = Path(f"/proc/{proc.pid}/syscall").read_text().split()
        except OSError:
            fields = []
        if number is None or not fields:
            time.sleep(3)  # no way to tell here: what the startup of a Python CLI takes, with room
            return
        if fields[:2] == [str(number), hex(fd)]:
            return
        assert time.monotonic() < deadline, f"the child did not read fd {fd} within {timeout} s"
        time.sleep(0.01)


def read_some(stream: IO[bytes], timeout: float = 60) -> bytes:
    """What a child has written to `stream` so far (at least a byte), without waiting past `timeout`."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return os.read(stream.fileno(), 4096)
