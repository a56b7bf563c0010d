"""The target split over llama.cpp RPC workers (`specrun worker`, `--rpc`), on loopback.

Two workers started here hold the tiny f32 model's layers; their logits, and greedy
speculative output, must equal local evaluation. Failures are one line each: a worker
killed mid-generation, a port in use, a bad --rpc value, a port with nothing listening.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.engines.rpc import parse_endpoints
from specrun.errors import UsageError
from specrun.session import others_load as real_others_load  # (conftest idles the module's)
from tests import processes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_COLOR": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"no worker on port {port}")


def start_worker(port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "specrun", "worker", "--port", str(port), "--threads", "1",
                             "--no-cache", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            cwd=ROOT, preexec_fn=processes.default_sigint)


@pytest.fixture(scope="module")
def workers() -> Iterator[str]:
    """Two workers on loopback: the --rpc value naming them."""
    ports = [free_port(), free_port()]
    procs = [start_worker(p) for p in ports]
    try:
        for port, proc in zip(ports, procs):
            wait_listening(port, proc)
        yield ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return processes.run([sys.executable, "-m", "specrun", *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env=ENV)


def one_line_error(done: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert done.returncode == code and done.stdout == "", (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and needle in lines[0], done.stderr
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint:")), done.stderr


def test_a_model_split_over_two_workers_gives_the_local_logits(tiny_model: Path, workers: str) -> None:
    prompt = [1, 5, 9, 12, 7, 3]
    tree = ([20, 21, 22, 23], [-1, 0, 0, 1], [0, 1, 1, 2])
    rows = []
    for rpc in ((), tuple(workers.split(","))):
        with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=8, rpc=rpc)) as e:
            c = e.new_cache(64)
            got = [e.eval(c, prompt).row(0)]
            logits = e.eval_tree(c, *tree)
            rows.append(got + [logits.row(i) for i in range(4)])
    for local, remote in zip(*rows):
        assert np.allclose(local, remote, rtol=1e-4, atol=1e-4)


def test_layers_kept_here_with_gpu_layers_give_the_same_logits(tiny_model: Path, workers: str) -> None:
    """--gpu-layers 1 with --rpc: one layer on the workers, the others on this CPU."""
    rows = []
    for rpc, layers in (((), None), (tuple(workers.split(",")), 1)):
        with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, n_gpu_layers=layers, rpc=rpc)) as e:
            rows.append(e.eval(e.new_cache(64), [1, 5, 9, 12]).row(0))
    assert np.allclose(rows[0], rows[1], rtol=1e-4, atol=1e-4)


def test_greedy_speculation_over_rpc_prints_what_plain_local_decoding_does(tiny_model: Path, workers: str) -> None:
    args = ["run", str(tiny_model), "def fib(n):\n    return fib(n - 1) + fib(n - 2)\n\ndef fib", "-n", "40", "-t", "0",
            "--json"]
    local = cli(*args, "--spec", "none")
    remote = cli(*args, "--spec", "ngram", "--rpc", workers)
    assert local.returncode == 0 and remote.returncode == 0, (local.stderr, remote.stderr)
    assert json.loads(remote.stdout)["text"] == json.loads(local.stdout)["text"]


KILLED = """
import sys
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
e = LlamaCppEngine(__import__("pathlib").Path(sys.argv[1]), LlamaCppConfig(n_threads=1, rpc=(sys.argv[2],)))
c = e.new_cache(64)
e.eval(c, [1, 2, 3])
print("ready", flush=True)
sys.stdin.readline()
e.eval(c, [4, 5, 6])
print("still here")
"""


def test_a_worker_killed_mid_generation_is_one_line_naming_it(tiny_model: Path) -> None:
    port = free_port()
    worker = start_worker(port)
    try:
        wait_listening(port, worker)
        with processes.spawned([sys.executable, "-c", KILLED, str(tiny_model), f"127.0.0.1:{port}"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=ENV) as client:
            assert client.stdout.readline().strip() == "ready"
            worker.kill()
            worker.wait()
            out, err = client.communicate("go\n", timeout=60)
        assert client.returncode == 1 and "still here" not in out
        lines = [ln for ln in err.strip().splitlines() if ln.startswith(("error:", "hint:"))]
        assert lines[0] == f"error: lost the RPC worker at 127.0.0.1:{port}", err
        assert "Traceback" not in err and "ggml_abort" not in err
    finally:
        worker.kill()
        worker.wait()


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        one_line_error(cli("worker", "--port", str(held.getsockname()[1])), 2, "Address already in use")


@pytest.mark.parametrize("value, needle", [
    ("nohost", "--rpc takes HOST:PORT, not 'nohost'"),
    ("127.0.0.1:0", "--rpc takes HOST:PORT"),
    ("127.0.0.1:70000", "--rpc takes HOST:PORT"),
    ("127.0.0.1:5,127.0.0.1:5", "names a worker twice"),
    ("127.0.0.1:x", "--rpc takes HOST:PORT"),
])
def test_bad_rpc_values_are_one_line(tiny_model: Path, value: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        parse_endpoints(value)
    one_line_error(cli("run", str(tiny_model), "hi", "-n", "2", "--rpc", value), 2, needle)


def test_a_port_with_nothing_listening_is_one_line(tiny_model: Path) -> None:
    port = free_port()
    one_line_error(cli("run", str(tiny_model), "hi", "-n", "2", "--rpc", f"127.0.0.1:{port}"), 2,
                   f"no RPC worker at 127.0.0.1:{port}")


def test_rpc_does_not_combine_with_the_torch_engine_or_every_layer_here(tiny_model: Path) -> None:
    one_line_error(cli("run", str(tiny_model), "hi", "--engine", "torch", "--rpc", "127.0.0.1:5"), 2,
                   "does not combine with the torch engine")
    one_line_error(cli("run", str(tiny_model), "hi", "--gpu-layers", "0", "--rpc", "127.0.0.1:5"), 2,
                   "--gpu-layers 0 keeps every layer on this machine")


def test_a_worker_beyond_loopback_says_once_what_the_protocol_does_not_protect() -> None:
    port = free_port()
    worker = start_worker(port, "--host", "0.0.0.0")
    try:
        wait_listening(port, worker)
        worker.terminate()
        out, err = worker.communicate(timeout=30)
        assert worker.returncode == 0 and out == b""  # its banner and connection lines are log lines
        assert err.decode().count("no authentication or encryption") == 1
    finally:
        worker.kill()
        worker.wait()


def test_calibrating_over_workers_here_does_not_count_their_cpu_as_other_processes() -> None:
    """Loopback workers compute the pass: their CPU time is its own, not a sign the machine is busy."""
    from specrun import calibrate
    from specrun.engines import Placement

    assert real_others_load(Placement()).read is calibrate.cpu_ticks
    assert real_others_load(Placement(rpc=("127.0.0.1:5",))).read is not calibrate.cpu_ticks
    assert real_others_load(Placement(rpc=("192.168.1.20:5",))).read is calibrate.cpu_ticks


@pytest.fixture
def namespace() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (its name, the worker's address
    in it). Skipped where the machine does not let the test make one (not root, no `ip`)."""
    import shutil

    name, host, peer = f"specrun{os.getpid()}", "10.231.77.1", "10.231.77.2"
    veth = f"sr{os.getpid() % 100000}"
    setup = [["ip", "netns", "add", name],
             ["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"],
             ["ip", "link", "set", veth + "p", "netns", name],
             ["ip", "addr", "add", f"{host}/30", "dev", veth], ["ip", "link", "set", veth, "up"],
             ["ip", "netns", "exec", name, "ip", "addr", "add", f"{peer}/30", "dev", veth + "p"],
             ["ip", "netns", "exec", name, "ip", "link", "set", veth + "p", "up"],
             ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("making a network namespace needs root and iproute2")
    try:
        for argv in setup:
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()}")
        yield name, peer
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_a_worker_in_another_network_namespace_serves_the_same_logits(tiny_model: Path,
                                                                      namespace: tuple[str, str]) -> None:
    """Across a real (virtual) link and a non-loopback address, as between two machines."""
    name, address = namespace
    port = free_port()
    worker = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-m", "specrun", "worker", "--host", address,
                               "--port", str(port), "--threads", "1", "--no-cache"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=ENV, cwd=ROOT, preexec_fn=processes.default_sigint)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read() if worker.stderr else ""
            try:
                socket.create_connection((address, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        rows = []
        for rpc in ((), (f"{address}:{port}",)):
            with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, rpc=rpc)) as e:
                rows.append(e.eval(e.new_cache(64), [1, 5, 9, 12]).row(0))
        assert np.allclose(rows[0], rows[1], rtol=1e-4, atol=1e-4)
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
        assert err.decode().count("no authentication or encryption") == 1


def test_something_else_on_the_port_is_one_line_naming_it(tiny_model: Path) -> None:
    """A port that answers, but not as an RPC worker (an HTTP server, say): llama.cpp aborts
    the handshake; the user sees which worker and why, in one line."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        done = cli("run", str(tiny_model), "hi", "-n", "2", "--rpc", f"127.0.0.1:{port}")
    finally:
        listener.close()
    one_line_error(done, 1, f"the RPC worker at 127.0.0.1:{port}: ")
