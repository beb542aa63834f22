"""Servers on real sockets for the tests: an app in a uvicorn thread, or the real `lm serve api_server`."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

LM = Path(sys.executable).parent / "lm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 60, step: float = 0.1):
    """condition()'s first true result, asked every step seconds; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)
    return result


@contextlib.contextmanager
def serve_in_thread(app):
    """Yield the base URL of app served by uvicorn on a free port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class LmServer:
    """`lm serve api_server WORKSPACE ...` in a subprocess (command: what stands for `lm`); stderr goes to a file the
    test can read."""

    def __init__(self, workspace, *args, env=None, log_dir=None, scheme="http", port=None, command=(LM,)):
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = Path(log_dir or "/tmp") / f"lm-server-{self.port}.log"
        self.args = [*map(str, command), "serve", "api_server", str(workspace), "--server-name", "127.0.0.1",
                     "--server-port", str(self.port), *map(str, args)]
        self.env = {**os.environ, **(env or {})}
        self.start()

    def start(self) -> "LmServer":
        """Start the process (again, on the same port, after stop() or kill())."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(self.log, "a"),
                                     env=self.env, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 240, path: str = "/health") -> "LmServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited:\n{self.stderr()}"
            try:
                if httpx.get(self.url + path, timeout=5, verify=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server was not ready in {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the process dies mid-work, as in a crash."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def workers(self) -> list[int]:
        """The pids of this server's tensor-parallel workers."""
        found = subprocess.run(["pgrep", "-f", "lmcli.engine.distributed"], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split() if self.proc.pid in ancestors(int(pid))]


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone meanwhile
            break
        chain.append(pid)
    return chain


class LmProxy(LmServer):
    """`lm serve proxy ...` in a subprocess."""

    def __init__(self, *args, log_dir=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir or "/tmp") / f"lm-proxy-{self.port}.log"
        self.args = [str(LM), "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(self.port),
                     *map(str, args)]
        self.env = dict(os.environ)
        self.start()
