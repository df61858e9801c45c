"""A SandboxFusion-compatible HTTP service as the sandbox (docs/tools.md#a-remote-sandbox): what clusters use,
where the training nodes should not run model-written code themselves (verl's ReTool recipe does the same).

One `POST {url}/run_code` per call with SandboxFusion's request (`code`, `language`, `run_timeout`,
`memory_limit_MB`); its `run_result` (`status`, `return_code`, `stdout`, `stderr`) becomes a `ToolResult` like the
local sandbox's. A connection failure, an HTTP 5xx or 429, or the service's own `SandboxError` is retried with
exponential backoff; after `retries` the call ends as `sandbox_error`, so a flaky service never stops a run. At most
`workers` requests are in flight at once. Standard library only (urllib).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from spo_cli.errors import SpoUserError
from spo_cli.tools.sandbox import SandboxLimits, ToolResult

RETRIED_HTTP = {429, 500, 502, 503, 504}


class RemoteSandbox:
    def __init__(self, url: str, limits: SandboxLimits, workers: int = 8, retries: int = 3, backoff_s: float = 1.0):
        self.url = url.rstrip("/") + "/run_code"
        self.limits = limits
        self.workers = workers
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def isolation(self) -> str:
        return f"remote SandboxFusion-compatible service at {self.url} (its isolation is the service's)"

    def run(self, code: str) -> ToolResult:
        start = time.perf_counter()
        request = {
            "code": code, "language": "python", "run_timeout": self.limits.wall_seconds,
            "memory_limit_MB": self.limits.memory_mb,
        }  # fmt: skip
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            reply, problem = self._post(request)
            if reply is not None:
                output, status = self._result(reply)
                return ToolResult(output, status, time.perf_counter() - start)
        message = f"the code could not be run: the sandbox service failed {self.retries + 1} times ({problem})"
        return ToolResult(message, "sandbox_error", time.perf_counter() - start)

    def run_many(self, codes: list[str]) -> list[ToolResult]:
        if len(codes) <= 1 or self.workers <= 1:
            return [self.run(code) for code in codes]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.run, codes))

    def _post(self, request: dict) -> tuple[dict | None, str]:
        """The service's reply, or None and why it is worth another try."""
        body = json.dumps(request).encode()
        http = urllib.request.Request(self.url, body, {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(http, timeout=self.limits.wall_seconds + 30) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code in RETRIED_HTTP:
                return None, f"HTTP {exc.code}"
            problem = f"the sandbox service at {self.url} refused the call (HTTP {exc.code}): check its URL"
            raise SpoUserError(problem) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            return None, str(getattr(exc, "reason", exc))
        if reply.get("status") == "SandboxError":
            return None, f"SandboxError: {reply.get('message', '')}"
        return reply, ""

    def _result(self, reply: dict) -> tuple[str, str]:
        run = reply.get("run_result") or {}
        text = head_and_tail(((run.get("stdout") or "") + (run.get("stderr") or "")).encode(), self.limits.output_bytes)
        if run.get("status") == "TimeLimitExceeded":
            return text + f"\nTimeoutError: stopped after {self.limits.wall_seconds:g} s", "timeout"
        if run.get("return_code", 1) != 0 or reply.get("status") != "Success":
            return text, "error"
        return text, "ok"


def head_and_tail(data: bytes, cap: int) -> str:
    """`data` as text, its middle cut so that its first and last cap / 2 bytes remain (as the local sandbox does)."""
    if len(data) <= cap:
        return data.decode("utf-8", "replace")
    half = cap // 2
    head, tail = data[:half].decode("utf-8", "replace"), data[len(data) - (cap - half) :].decode("utf-8", "replace")
    return f"{head}\n[... {len(data) - cap} bytes of output cut ...]\n{tail}"
