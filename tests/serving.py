"""Start the real app (`python app.py`), and llama.cpp's real `llama-server`, on loopback for the tests that talk to
them over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every call to the app has a deadline, so that a stuck server fails its test with a message instead of hanging CI.
# Generous: they guard against hangs and are no measure of speed.
READ_TIMEOUT = 300  # seconds without a byte from the server (while it works it streams updates, or its heartbeat)
CALL_TIMEOUT = 600  # seconds for one whole answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, process: subprocess.Popen, url: str, log: Path, env: dict[str, str]):
        self.process, self.url, self.log, self.env = process, url, log, env

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, httpx_kwargs={"timeout": READ_TIMEOUT})


@contextmanager
def app_server(tmp_path: Path, env: dict[str, str], timeout: float = 300):
    """Yield an AppServer once it answers HTTP; stop it afterwards. `env` adds to a clean offline environment (a
    GRADIO_SERVER_PORT there keeps the address, e.g. to restart the same Space)."""
    port = int(env.get("GRADIO_SERVER_PORT") or free_port())
    log = tmp_path / f"app-{port}.log"
    full_env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        # The test machine also runs the test process and other servers: 1 decode thread never spins on a busy core.
        "N_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    server = AppServer(process, f"http://127.0.0.1:{port}/", log, env)
    try:
        wait_until_up(process, server.url + "config", timeout, "app.py", server.output)
        yield server
    finally:
        stop(process)


def wait_until_up(process: subprocess.Popen, url: str, timeout: float, what: str, output) -> None:
    """Return once `url` answers; fail with the process's output if it exits or does not answer within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{output()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not answer in {timeout} s:\n{output()[-3000:]}") from None
            time.sleep(0.3)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stream_call(server: AppServer, data_json: str, api_name: str = "chat"):
    """POST a hand-written JSON `data` list to /gradio_api/call/<api_name> and yield its events as (kind, payload),
    read with blocking reads as a browser's are (gradio_client's Job polls every millisecond: beside a server on the
    same two cores that is not free). Closing the generator hangs up."""
    import http.client
    import json

    host, port = server.url.split("//")[1].strip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=READ_TIMEOUT)
    try:
        connection.request("POST", f"/gradio_api/call/{api_name}", body='{"data": %s}' % data_json,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        event_id = json.loads(response.read())["event_id"]
        connection.request("GET", f"/gradio_api/call/{api_name}/{event_id}")
        stream, kind = connection.getresponse(), None
        while line := stream.fp.readline():
            if line.startswith(b"event:"):
                kind = line.split(b":", 1)[1].strip().decode()
            elif line.startswith(b"data:"):
                yield kind, json.loads(line[5:])
                if kind in ("complete", "error"):
                    return
    finally:
        connection.close()


def stream_answer(server: AppServer, data: list):
    """The chat endpoint's answer as it grows (each event's first output), in a new session."""
    import json

    for kind, payload in stream_call(server, json.dumps(data)):
        if kind == "error":
            raise RuntimeError(f"server error event: {payload}")
        if kind in ("generating", "complete") and payload:
            yield payload[0]


def call_raw(server: AppServer, data_json: str, api_name: str = "chat", read_events: int | None = None):
    """POST a hand-written JSON `data` list to /gradio_api/call/<api_name> and follow its event stream.

    Returns the last streamed value, or, with `read_events`, disconnects after that many events and returns None
    (unless the answer was complete by then).
    """
    last = None
    with closing(stream_call(server, data_json, api_name)) as events:
        for n, (kind, payload) in enumerate(events, 1):
            if read_events is not None and n >= read_events and kind != "complete":
                return None  # leave without a word: closing the stream is a disconnect
            if kind == "error":
                raise RuntimeError(f"server error event: {payload}")
            if isinstance(payload, list) and payload:
                last = payload[0]
    return last


def run_app(env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python app.py` to completion (for start-up failures); returns the finished process."""
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_PORT": str(free_port()), **env}
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py")], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def llama_server_binary() -> Path:
    """llama-server built from the installed llama-cpp-python's sdist (tests/setup.sh builds it; else it is built now)."""
    out = subprocess.run(["bash", str(ROOT / "tests" / "build_llama_server.sh")], check=True, capture_output=True,
                         text=True, timeout=3600)
    return Path(out.stdout.strip().splitlines()[-1])


class LlamaServer:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """A counter from /metrics (llama-server --metrics), e.g. "tokens_predicted_total"."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(f"llamacpp:{name} ")))


@contextmanager
def llama_server(model: Path, tmp_path: Path, slots: int = 4, ctx_per_slot: int = 1024, threads: int = 1,
                 extra: tuple[str, ...] = (), timeout: float = 120):
    """Yield a running llama-server for `model` with `slots` parallel slots; stop it afterwards."""
    port = free_port()
    log = tmp_path / f"llama-server-{port}.log"
    command = [str(llama_server_binary()), "-m", str(model), "--port", str(port), "--host", "127.0.0.1",
               "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
               "--metrics", *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = LlamaServer(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_up(process, server.url + "/health", timeout, "llama-server", server.output)
        yield server
    finally:
        stop(process)
