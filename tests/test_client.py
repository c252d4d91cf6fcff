"""The client scripts against a real TorchServe whose keys expire after 3 seconds, and with no server at all.

An expired key must be renewed (with the API key) and the request retried; every failure a person can
meet must be one line on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from scripts.serving_api import INVALID_KEY, ServerUnreachable, TorchServeClient
from tests.conftest import HTTP_TIMEOUT, ROOT, free_ports, running_server

KEY_LIFETIME_MIN = 0.05  # TorchServe 0.12 reads token_expiration_min as a double: 3 seconds


@pytest.fixture(scope="module")
def short_lived_keys(tmp_path_factory):
    """TorchServe serving only gan (quick to archive and start), whose inference and management keys expire fast."""
    with running_server(tmp_path_factory.mktemp("short-keys"), ["gan"],
                        {"token_expiration_min": str(KEY_LIFETIME_MIN)}) as server:
        yield server


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def client(server, *args: str, key_file: Path | None = None) -> subprocess.CompletedProcess:
    return run_script("client.py", "--inference-url", server.inference_url, "--management-url", server.management_url,
                      "--key-file", str(key_file or server.key_file), *args)


def assert_one_line_failure(result: subprocess.CompletedProcess, status: int, *words: str) -> None:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def wait_until_expired(server, kind: str) -> str:
    """Sleep past the expiry written in key_file.json; returns the key that has expired."""
    entry = json.loads(server.key_file.read_text())[kind]
    expires = datetime.fromisoformat(entry["expiration time"]).timestamp()
    time.sleep(max(0.0, expires - time.time()) + 0.5)
    return entry["key"]


# ---------------------------------------------------------------- no server


@pytest.mark.parametrize("command", [["describe", "diffusion"], ["health"], ["scale", "gan", "2"],
                                     ["generate", "gan", "-o", os.devnull]])
def test_client_with_the_server_down_says_so_in_one_line(command):
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    result = run_script("client.py", "--inference-url", url, "--management-url", url, *command)
    assert_one_line_failure(result, 3, "cannot connect", url, "make serve")
    assert result.stdout == ""


def test_archive_register_with_the_server_down_says_so_in_one_line(tmp_path):
    (port,) = free_ports(1)
    result = run_script("archive.py", "checkpoints/gan", "--version", "9.9", "--model-store", str(tmp_path),
                        "--register", "--management-url", f"http://127.0.0.1:{port}")
    assert_one_line_failure(result, 3, "cannot connect")


def test_a_server_that_does_not_answer_in_time_is_a_timeout():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServerUnreachable, match="no answer .* within 0.5 s"):
            TorchServeClient(url, url, key_file=None, timeout=0.5).ping()


# ---------------------------------------------------------------- key file and refused requests


@pytest.mark.server
def test_missing_key_file(short_lived_keys, tmp_path):
    result = client(short_lived_keys, "describe", "gan", key_file=tmp_path / "key_file.json")
    assert_one_line_failure(result, 2, "no key file at", "--key-file")


@pytest.mark.server
@pytest.mark.parametrize("content", ["not json", '{"inference": {"key": "x"}}', "[]"],
                         ids=["not-json", "no-management-key", "not-an-object"])
def test_unreadable_key_file(short_lived_keys, tmp_path, content):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(content)
    result = client(short_lived_keys, "describe", "gan", key_file=key_file)
    assert_one_line_failure(result, 2, "cannot read the keys in", "--key-file")


@pytest.mark.server
def test_keys_from_another_server_cannot_be_renewed(short_lived_keys, tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({kind: {"key": "not-this-servers"} for kind in ("inference", "management", "API")}))
    result = client(short_lived_keys, "describe", "gan", key_file=key_file)
    assert_one_line_failure(result, 2, "renewing it with the API key failed", "--key-file")


@pytest.mark.server
@pytest.mark.parametrize("command,words", [
    (["generate", "gan", "-p", "digit=10", "-o", os.devnull], ["400", "digit: must be in [0, 9]"]),
    (["describe", "no_such_model"], ["404", "no_such_model"]),
], ids=["bad-parameter", "unknown-model"])
def test_a_refused_request_shows_the_servers_message(short_lived_keys, command, words):
    result = client(short_lived_keys, *command)
    assert_one_line_failure(result, 2, *words)
    assert result.stdout == ""


# ---------------------------------------------------------------- renewal of expired keys


@pytest.mark.server
def test_expired_keys_are_renewed_and_the_request_retried(short_lived_keys, tmp_path):
    server = short_lived_keys
    expired = wait_until_expired(server, "inference")
    refused = requests.post(f"{server.inference_url}/predictions/gan", json={}, timeout=HTTP_TIMEOUT,
                            headers={"Authorization": f"Bearer {expired}"})
    assert refused.status_code == 400 and refused.json()["type"] == INVALID_KEY  # it really has expired

    response = server.client().generate("gan", {"seed": 3})
    assert response.headers["Content-Type"].startswith("image/png")
    assert server.key("inference") != expired  # renewed, and TorchServe rewrote key_file.json

    for kind in ("inference", "management"):  # the same through the command line, for both kinds of key
        wait_until_expired(server, kind)
    output = tmp_path / "three.png"
    generated = client(server, "generate", "gan", "-p", "digit=3", "-o", str(output))
    assert generated.returncode == 0, generated.stderr
    assert output.read_bytes().startswith(b"\x89PNG")
    described = client(server, "describe", "gan")
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)[0]["modelName"] == "gan"


@pytest.mark.server
def test_a_key_renewed_by_another_client_is_taken_not_renewed_again(short_lived_keys):
    server = short_lived_keys
    expired = wait_until_expired(server, "management")
    server.client().describe("gan")  # renews the management key
    renewed = server.key("management")
    assert renewed != expired
    # A client whose request went out with the expired key just before takes the file's new key: renewing
    # again would invalidate that key under the client that renewed it.
    assert server.client()._renewed_key("management", expired) == renewed == server.key("management")
