"""A small client for TorchServe's inference and management APIs, with token auth from key_file.json.

Used by `client.py`, `archive.py --register` and the end-to-end tests.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests


class ServerError(RuntimeError):
    def __init__(self, response: requests.Response):
        super().__init__(f"{response.request.method} {response.url} -> {response.status_code}: {response.text[:500]}")
        self.response = response


class TorchServeClient:
    """`key_file` is the key_file.json TorchServe writes in its working directory; None when auth is off."""

    def __init__(self, inference_url: str = "http://127.0.0.1:8080", management_url: str = "http://127.0.0.1:8081",
                 key_file: Path | None = Path("key_file.json"), timeout: float = 600):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.key_file = Path(key_file) if key_file else None
        self.timeout = timeout

    def _key(self, kind: str) -> str | None:
        """Read the key fresh each call: TorchServe rewrites the file when keys are renewed."""
        if self.key_file is None or not self.key_file.exists():
            return None
        return json.loads(self.key_file.read_text())[kind]["key"]

    def _request(self, method: str, url: str, kind: str, check: bool = True, **kwargs: Any) -> requests.Response:
        key = self._key(kind)
        headers = kwargs.pop("headers", {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        response = requests.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
        if check and not response.ok:
            raise ServerError(response)
        return response

    # ---- inference
    def generate(self, model: str, params: dict[str, Any], version: str | None = None,
                 check: bool = True) -> requests.Response:
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self._request("POST", self.inference_url + path, "inference", check=check, json=params)

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
