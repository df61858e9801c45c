"""The SandboxFusion client against a SandboxFusion-compatible service on this machine: a real HTTP server (the
standard library's) that runs the code in the local sandbox and answers in SandboxFusion's format, failing on
purpose where a test asks it to. The real SandboxFusion service is not available here (no containers)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.tools.remote import RemoteSandbox
from spo_cli.tools.sandbox import LocalSandbox, SandboxLimits

LIMITS = SandboxLimits(wall_seconds=3.0, cpu_seconds=2.0, memory_mb=256, output_bytes=200)


class Service(ThreadingHTTPServer):
    """POST /run_code as SandboxFusion answers it; `failures` requests first get HTTP 503."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.local = LocalSandbox(SandboxLimits(wall_seconds=3.0, cpu_seconds=2.0, memory_mb=256, output_bytes=10_000))
        self.failures = 0
        self.requests: list[dict] = []
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        server: Service = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(request)
            fail = server.failures > 0
            server.failures -= fail
        if self.path != "/run_code":
            return self._send(404, {"detail": "Not Found"})
        if fail:
            return self._send(503, {"detail": "busy"})
        result = server.local.run(request["code"])
        timed_out = result.status == "timeout"
        status = "TimeLimitExceeded" if timed_out else "Finished"
        code = 0 if result.status == "ok" else 1
        self._send(200, {"status": "Success" if code == 0 else "Failed", "message": "", "compile_result": None,
                         "run_result": {"status": status, "execution_time": result.seconds, "return_code": code,
                                        "stdout": result.output, "stderr": ""}, "files": {}})  # fmt: skip

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def service():
    server = Service()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def client(service, **kwargs) -> RemoteSandbox:
    return RemoteSandbox(f"http://127.0.0.1:{service.server_address[1]}", LIMITS, backoff_s=0.05, **kwargs)


def test_a_call_goes_out_in_sandboxfusions_format(service):
    result = client(service).run("print(6 * 7)")
    assert (result.status, result.output) == ("ok", "42\n")
    request = service.requests[-1]
    assert request == {"code": "print(6 * 7)", "language": "python", "run_timeout": 3.0, "memory_limit_MB": 256}


def test_errors_timeouts_and_long_output_map_like_the_local_sandbox(service):
    sandbox = client(service)
    error, timeout, long = sandbox.run_many(["1/0", "import time\ntime.sleep(60)", "print('x' * 5000)"])
    assert error.status == "error" and "ZeroDivisionError" in error.output
    assert timeout.status == "timeout"
    assert long.status == "ok" and "bytes of output cut" in long.output and len(long.output) < 260


def test_a_busy_service_is_retried(service):
    service.failures = 2
    result = client(service, retries=3).run("print('after two 503s')")
    assert (result.status, result.output) == ("ok", "after two 503s\n")


def test_a_failing_service_ends_the_call_not_the_run(service):
    service.failures = 10
    result = client(service, retries=2).run("print(1)")
    service.failures = 0
    assert result.status == "sandbox_error" and "failed 3 times (HTTP 503)" in result.output


def test_nobody_listening_is_a_sandbox_error():
    sandbox = RemoteSandbox("http://127.0.0.1:9", LIMITS, retries=1, backoff_s=0.01)
    result = sandbox.run("print(1)")
    assert result.status == "sandbox_error" and "refused" in result.output.lower()


def test_a_wrong_url_is_the_users_error(service):
    sandbox = RemoteSandbox(f"http://127.0.0.1:{service.server_address[1]}/nothing-here", LIMITS)
    with pytest.raises(SpoUserError, match="HTTP 404"):
        sandbox.run("print(1)")
