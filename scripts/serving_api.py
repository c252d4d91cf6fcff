"""A small client for TorchServe's inference and management APIs, with token auth from key_file.json.

Used by `client.py`, `archive.py --register` and the end-to-end tests. An expired key is renewed with
the API key and the request retried once; every other failure is a `ServingFailure` whose message says
what happened and what to do, which scripts print as one line (`reports_failures`).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import requests

# TorchServe 0.12 answers a missing, wrong or expired key with 400 and this error type.
INVALID_KEY = "InvalidKeyException"
KEY_KINDS = ("inference", "management", "API")
# A request with "progress": true is answered by JSON lines that start with this, then the usual body: a PNG, or
# JSON that TorchServe indents ("{\n  ..."), the error object for a failure after the first line. The handler
# sends each line as one chunk; the split below holds however chunks are cut or merged on the way.
PROGRESS_LINE_START = b'{"progress"'


class ServingFailure(RuntimeError):
    """A failure a script reports as one line and `exit_status`, not as a traceback."""

    exit_status = 1


class ServerUnreachable(ServingFailure):
    """No answer: nothing listens at the address, or the server did not answer in time."""

    exit_status = 3


class KeyFileError(ServingFailure):
    """key_file.json is missing, unreadable, or holds keys the running server does not accept."""

    exit_status = 2


class ServerError(ServingFailure):
    """The server answered with an error status; a 4xx is the request's fault (exit 2), a 5xx the server's."""

    def __init__(self, response: requests.Response):
        self.response = response
        self.exit_status = 2 if response.status_code < 500 else 1
        if response.status_code == 404:
            advice = "check the model name and version (GET /models on the management port lists them)"
        elif response.status_code < 500:
            advice = "fix the request (GET /models/<model>?customized=true lists the accepted parameters)"
        else:
            advice = "see the server's logs/model_log.log"
        super().__init__(f"{response.request.method} {response.url} -> {response.status_code}: "
                         f"{server_message(response)}; {advice}")


def server_message(response: requests.Response) -> str:
    """The one-line message in an error body: the handler's `error`, TorchServe's `message`, else the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = (body.get("error") or body.get("message")) if isinstance(body, dict) else None
    return " ".join(str(message or response.text[:300] or response.reason).split())


def split_progress(chunks: Iterable[bytes], on_event: Callable[[dict], None]) -> bytes:
    """Read a progress response as it arrives: `on_event` gets each progress line parsed; returns the body after them."""
    buffer = bytearray()
    in_events = True
    for chunk in chunks:
        buffer += chunk
        while in_events:
            if len(buffer) < len(PROGRESS_LINE_START) and PROGRESS_LINE_START.startswith(buffer):
                break  # too short to tell yet
            if not buffer.startswith(PROGRESS_LINE_START):
                in_events = False
                break
            line, newline, rest = bytes(buffer).partition(b"\n")
            if not newline:
                break  # the rest of the line is still on its way
            on_event(json.loads(line))
            buffer = bytearray(rest)
    return bytes(buffer)


def failure_after_progress(body: bytes) -> str | None:
    """The error of a request that failed after its progress lines went out (the status, sent with the first
    line, says 200 then), else None."""
    if not body.startswith(b"{"):
        return None  # a PNG
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return str(answer["error"]) if isinstance(answer, dict) and "error" in answer and "images" not in answer else None


def key_refused(response: requests.Response) -> bool:
    """TorchServe's answer to a missing, wrong or expired key (not the handler's 400 for a bad parameter)."""
    if response.status_code != 400:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("type") == INVALID_KEY


def reports_failures(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a script's main: a ServingFailure becomes one line on stderr and its exit status."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs) or 0
        except ServingFailure as failure:
            print(f"error: {failure}", file=sys.stderr)
            return failure.exit_status

    return wrapper


class TorchServeClient:
    """`key_file` is the key_file.json TorchServe writes in its working directory; None when auth is off.
    The default timeout outlasts the longest responseTimeout in handlers/model-config/*.yaml (a full batch).
    With keep_alive the client reuses its connections (one requests.Session: use it from one thread only)."""

    def __init__(self, inference_url: str = "http://127.0.0.1:8080", management_url: str = "http://127.0.0.1:8081",
                 key_file: Path | None = Path("key_file.json"), timeout: float = 1300, keep_alive: bool = False):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.key_file = Path(key_file) if key_file else None
        self.timeout = timeout
        self._http = requests.Session() if keep_alive else requests

    def close(self) -> None:
        if isinstance(self._http, requests.Session):
            self._http.close()

    def _keys(self) -> dict[str, str]:
        """kind -> key, read fresh each time: TorchServe rewrites the file when a key is renewed."""
        advice = "pass the key_file.json from the running TorchServe's working directory (--key-file)"
        if self.key_file is None or not self.key_file.exists():
            where = f"at {self.key_file}" if self.key_file else "given"
            raise KeyFileError(f"the server wants a key and there is no key file {where}; {advice}")
        try:
            entries = json.loads(self.key_file.read_text())
            keys = {kind: entries[kind]["key"] for kind in KEY_KINDS}
            if not all(isinstance(key, str) and key for key in keys.values()):
                raise ValueError("a key is empty or not a string")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise KeyFileError(f"cannot read the keys in {self.key_file} ({type(error).__name__}: {error}); "
                               f"{advice}") from None
        return keys

    def _key(self, kind: str) -> str | None:
        """None without a key file: the request goes without a key (a server with auth off takes it)."""
        if self.key_file is None or not self.key_file.exists():
            return None
        return self._keys()[kind]

    def _send(self, method: str, url: str, key: str | None, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            return self._http.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise ServerUnreachable(f"cannot connect to TorchServe at {url}; is it running? Start it with "
                                    f"`make serve`, or point the script at its address") from None
        except requests.Timeout:
            raise ServerUnreachable(f"no answer from {url} within {self.timeout:g} s; the server is busy or "
                                    f"stuck: retry later, ask for less work, or check its logs") from None
        except requests.RequestException as error:
            raise ServingFailure(f"{method} {url} failed: {error}") from None

    def _renewed_key(self, kind: str, refused_key: str | None) -> str:
        """A key of `kind` to retry with after `refused_key` was refused (it expires after token_expiration_min).

        TorchServe 0.12's `GET /token?type=<kind>` on the management port, authorised with the API key
        (which never expires), makes a new key, rewrites key_file.json and answers with an empty body, so the
        new key is read back from the file. If the file already holds another key, someone else renewed it:
        that one is used rather than renewing again, which would invalidate it under them."""
        keys = self._keys()
        if keys[kind] != refused_key:
            return keys[kind]
        response = self._send("GET", f"{self.management_url}/token", keys["API"], params={"type": kind})
        if not response.ok:
            raise KeyFileError(f"the {kind} key in {self.key_file} was refused and renewing it with the API key "
                               f"failed ({response.status_code}: {server_message(response)}); the file is not "
                               f"from the running server: pass the one in its working directory (--key-file)")
        return self._keys()[kind]

    def _request(self, method: str, url: str, kind: str, check: bool = True, **kwargs: Any) -> requests.Response:
        key = self._key(kind)
        response = self._send(method, url, key, **kwargs)
        if key_refused(response):
            response = self._send(method, url, self._renewed_key(kind, key), **kwargs)
        if check and not response.ok:
            raise ServerError(response)
        return response

    # ---- inference
    def generate(self, model: str, params: dict[str, Any], version: str | None = None,
                 check: bool = True, stream: bool = False) -> requests.Response:
        """With stream, the body is read as it arrives (`response.iter_content`), e.g. with `split_progress`."""
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self._request("POST", self.inference_url + path, "inference", check=check, json=params, stream=stream)

    def generate_with_progress(self, model: str, params: dict[str, Any], on_event: Callable[[dict], None],
                               version: str | None = None) -> tuple[requests.Response, bytes]:
        """Ask with "progress": true; `on_event` gets each progress line as it arrives. Returns the response
        (headers) and the final body; a failure after the progress lines is a ServingFailure like any other."""
        response = self.generate(model, dict(params, progress=True), version=version, stream=True)
        try:
            body = split_progress(response.iter_content(chunk_size=None), on_event)
        except requests.RequestException as error:
            raise ServerUnreachable(f"the answer from {response.url} broke off: {error}; retry, or check the "
                                    f"server's logs") from None
        error = failure_after_progress(body)
        if error is not None:
            raise ServingFailure(f"POST {response.url} failed after its progress: {error}; see the server's "
                                 f"logs/model_log.log")
        return response, body

    def ping(self) -> dict:
        return self._request("GET", self.inference_url + "/ping", "inference").json()

    # ---- management
    def describe(self, model: str, version: str | None = None, customized: bool = False) -> list[dict]:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._request("GET", self.management_url + path, "management",
                             params={"customized": "true"} if customized else None).json()

    def healthy(self) -> bool:
        """Every registered model has at least one READY worker (`/ping` does not look at workers)."""
        models = self._request("GET", self.management_url + "/models", "management").json()["models"]
        return bool(models) and all(
            any(w["status"] == "READY" for w in self.describe(m["modelName"])[0]["workers"]) for m in models)

    def scale(self, model: str, workers: int, version: str | None = None) -> dict:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._request("PUT", self.management_url + path, "management",
                             params={"min_worker": workers, "max_worker": workers, "synchronous": "true"}).json()

    def register(self, archive_name: str, workers: int = 1) -> dict:
        return self._request("POST", self.management_url + "/models", "management",
                             params={"url": archive_name, "initial_workers": workers, "synchronous": "true"}).json()

    def set_default(self, model: str, version: str) -> dict:
        return self._request("PUT", f"{self.management_url}/models/{model}/{version}/set-default", "management").json()

    def unregister(self, model: str, version: str) -> dict:
        return self._request("DELETE", f"{self.management_url}/models/{model}/{version}", "management").json()
