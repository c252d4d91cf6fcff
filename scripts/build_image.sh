#!/usr/bin/env bash
# Build the Docker image with no registry at all, and check that it serves. Run as root.
#
#   scripts/build_image.sh [build|verify|all] [OPTIONS]          (default: build)
#
#   build   start a private dockerd unless one answers on --socket; make --base-image with debootstrap
#           (minbase, from the Debian mirror) and `docker import` when the daemon lacks it; `docker build`
#           with --network=host, pip's configuration and CA bundle passed as build secrets
#   verify  run the image without a network, wait until Docker reports it healthy, read the keys inside it,
#           POST README section 1's three requests from inside its network namespace and check each answer
#           is a PNG that Pillow decodes, check every process runs as uid 10001 and that no pip configuration
#           or secret is in the image; then remove the container
#   all     build, then verify
#   A dockerd started here is stopped on exit (unless --keep-daemon).
#
# Options:
#   --image NAME           image to build and verify                          [generators:latest]
#   --base-image NAME      Debian bookworm image to build FROM; made with debootstrap when the daemon lacks it
#                                                                             [generators-base:bookworm]
#   --suite NAME           Debian release debootstrap installs                [bookworm]
#   --mirror URL           Debian mirror for debootstrap and the base's apt sources
#                                                                             [this machine's apt source for --suite]
#   --torch-index-url URL  index for torch and torchvision; https://download.pytorch.org/whl/cpu gives the small
#                          CPU-only wheels                                    ['' = pip's index: CUDA wheels]
#   --pip-conf FILE        pip configuration for the build, as a secret       [this machine's `pip config list`,
#                          without the settings that name files on this machine]
#   --ca-bundle FILE       CA bundle pip checks its index with, as a secret   [$PIP_CERT, pip's cert setting,
#                                                                              else /etc/ssl/certs/ca-certificates.crt]
#   --socket PATH          dockerd socket; a daemon already answering there is used as it is
#                                                                             [/run/generators-docker/docker.sock]
#   --data-root DIR        the private dockerd's images, containers, cache   [/var/lib/generators-docker]
#   --docker-cli PATH      Docker client whose `build` has BuildKit's --secret [docker when it has buildx,
#                                                                              else /usr/bin/docker (Debian's docker.io)]
#   --health-timeout SEC   verify: how long to wait for "healthy"            [600]
#   --keep-daemon          leave a dockerd that this script started running
#   -h, --help             this text
set -euo pipefail
cd "$(dirname "$0")/.."

STEP=build
IMAGE=generators:latest
BASE_IMAGE=generators-base:bookworm
SUITE=bookworm
MIRROR=
TORCH_INDEX_URL=
PIP_CONF=
CA_BUNDLE=
SOCKET=/run/generators-docker/docker.sock
DATA_ROOT=/var/lib/generators-docker
DOCKER_CLI=
HEALTH_TIMEOUT=600
KEEP_DAEMON=
UID_EXPECTED=10001

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "build_image.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    build|verify|all) STEP=$1 ;;
    --image) IMAGE=$2; shift ;;
    --base-image) BASE_IMAGE=$2; shift ;;
    --suite) SUITE=$2; shift ;;
    --mirror) MIRROR=$2; shift ;;
    --torch-index-url) TORCH_INDEX_URL=$2; shift ;;
    --pip-conf) PIP_CONF=$2; shift ;;
    --ca-bundle) CA_BUNDLE=$2; shift ;;
    --socket) SOCKET=$2; shift ;;
    --data-root) DATA_ROOT=$2; shift ;;
    --docker-cli) DOCKER_CLI=$2; shift ;;
    --health-timeout) HEALTH_TIMEOUT=$2; shift ;;
    --keep-daemon) KEEP_DAEMON=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

RUN_DIR=$(dirname "$SOCKET")
SCRATCH=$(mktemp -d)
DAEMON_PID=
CONTAINER=
ROOTFS=

cleanup() {
  [ -n "$CONTAINER" ] && docker rm -f "$CONTAINER" >/dev/null 2>&1
  [ -n "$ROOTFS" ] && rm -rf "$ROOTFS"
  rm -rf "$SCRATCH"
  if [ -n "$DAEMON_PID" ] && [ -z "$KEEP_DAEMON" ]; then
    echo "stopping the dockerd started here (pid $DAEMON_PID)"
    kill "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" || true
  fi
}
trap cleanup EXIT

if [ -z "$DOCKER_CLI" ]; then
  if docker buildx version >/dev/null 2>&1; then DOCKER_CLI=$(command -v docker)
  elif [ -x /usr/bin/docker ]; then DOCKER_CLI=/usr/bin/docker
  else die "no Docker client with BuildKit: install docker.io (Debian) or docker-buildx, or pass --docker-cli"
  fi
fi
docker() { "$DOCKER_CLI" --host "unix://$SOCKET" "$@"; }

start_daemon() {
  if docker version >/dev/null 2>&1; then
    echo "using the dockerd on $SOCKET"
    return
  fi
  [ "$(id -u)" = 0 ] || die "no dockerd answers on $SOCKET, and starting one needs root"
  command -v dockerd >/dev/null || die "dockerd is missing: apt-get install docker.io"
  mkdir -p "$RUN_DIR" "$DATA_ROOT"
  # No bridge, no iptables: the daemon leaves the machine's network alone; builds use --network=host
  # and containers --network=none.
  nice -n 10 dockerd --host "unix://$SOCKET" --data-root "$DATA_ROOT" --exec-root "$RUN_DIR/exec" \
    --pidfile "$RUN_DIR/dockerd.pid" --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
    >"$RUN_DIR/dockerd.log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 60); do
    docker version >/dev/null 2>&1 && { echo "started dockerd on $SOCKET (log: $RUN_DIR/dockerd.log)"; return; }
    kill -0 "$DAEMON_PID" 2>/dev/null || { DAEMON_PID=; tail -20 "$RUN_DIR/dockerd.log" >&2; die "dockerd exited"; }
    sleep 1
  done
  die "dockerd did not answer on $SOCKET within 60 s (log: $RUN_DIR/dockerd.log)"
}

apt_source() {  # the URI this machine's apt uses for a Debian release, or nothing
  command -v apt-get >/dev/null || return 0
  # shellcheck disable=SC2016  # $(RELEASE) and $(REPO_URI) are apt's own fields, not shell
  apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Created-By: Packages' |
    awk -v r="$1" '$1 == r && !found {print $2; found = 1}'
}

make_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "base image $BASE_IMAGE: present"
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
  local mirror=${MIRROR:-$(apt_source "$SUITE")}
  [ -n "$mirror" ] || die "no apt source for $SUITE on this machine: pass --mirror"
  echo "base image $BASE_IMAGE: debootstrap --variant=minbase $SUITE from $mirror"
  local started=$SECONDS
  ROOTFS=$(mktemp -d /var/tmp/generators-base.XXXXXX)
  nice -n 10 debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$mirror"
  # The image's apt takes the release from the same mirror and, where this machine has them, its updates.
  local release uri
  : >"$ROOTFS/etc/apt/sources.list"
  for release in "$SUITE" "$SUITE-updates" "$SUITE-security"; do
    uri=$(apt_source "$release")
    [ "$release" = "$SUITE" ] && uri=$mirror
    [ -n "$uri" ] && echo "deb $uri $release main" >>"$ROOTFS/etc/apt/sources.list"
  done
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin
  tar --numeric-owner -C "$ROOTFS" -c . |
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$ROOTFS"
  ROOTFS=
  echo "made $BASE_IMAGE in $((SECONDS - started)) s"
  docker images "$BASE_IMAGE"
}

write_pip_conf() {  # $1: file. The machine's effective pip settings that mean the same inside a build.
  python3 - "$1" <<'PY'
import ast, subprocess, sys
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
sections, left_out = {}, set()
for line in listing.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.partition(".")
    section = "global" if section == ":env:" else section  # PIP_* variables, which override the files
    # The CA bundle is a secret of its own; paths and file:// indexes name this machine's disk.
    words = [w for w in ast.literal_eval(value).split() if not w.startswith(("/", "~", ".", "file:"))]
    if name in ("cert", "client-cert") or not words:
        left_out.add(name)
        continue
    sections.setdefault(section, {})[name] = " ".join(words)
with open(sys.argv[1], "w") as out:
    for section, settings in sections.items():
        out.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
kept = sorted(f"{s}.{k}" for s, settings in sections.items() for k in settings)
print(f"pip settings passed to the build: {', '.join(kept) or 'none'}; left out: {', '.join(sorted(left_out)) or 'none'}")
PY
}

resolve_secrets() {
  if [ -z "$PIP_CONF" ]; then
    PIP_CONF=$SCRATCH/pip.conf
    write_pip_conf "$PIP_CONF"
  fi
  if [ -z "$CA_BUNDLE" ]; then
    CA_BUNDLE=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
    CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
  fi
  [ -f "$PIP_CONF" ] || die "pip configuration not found: $PIP_CONF"
  [ -f "$CA_BUNDLE" ] || die "CA bundle not found: $CA_BUNDLE"
}

build() {
  make_base_image
  resolve_secrets
  echo "building $IMAGE from $BASE_IMAGE (torch from: ${TORCH_INDEX_URL:-the default index}; CA bundle: $CA_BUNDLE)"
  local started=$SECONDS
  DOCKER_BUILDKIT=1 docker build --network=host --progress=plain \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    --secret "id=pip_conf,src=$PIP_CONF" --secret "id=ca_bundle,src=$CA_BUNDLE" \
    --tag "$IMAGE" .
  echo "built $IMAGE in $((SECONDS - started)) s"
  docker images "$IMAGE"
  docker run --rm --network=none "$IMAGE" sh -c 'cd /opt/venv/lib/python3*/site-packages &&
    echo "of which CUDA packages (nvidia, triton): $(du -sch nvidia triton 2>/dev/null | tail -1 | cut -f1)"'
}

wait_healthy() {
  local started=$SECONDS status
  while :; do
    status=$(docker inspect --format '{{.State.Status}} {{.State.Health.Status}}' "$CONTAINER")
    case "$status" in
      "running healthy") echo "docker inspect: healthy after $((SECONDS - started)) s"; return ;;
      running\ *) ;;
      *) docker logs --tail 30 "$CONTAINER" >&2; die "container is $status" ;;
    esac
    if [ $((SECONDS - started)) -ge "$HEALTH_TIMEOUT" ]; then
      docker logs --tail 30 "$CONTAINER" >&2
      die "not healthy after $HEALTH_TIMEOUT s (status: $status)"
    fi
    sleep 5
  done
}

post_readme_requests() {  # README section 1's requests, sent from the container's own network namespace
  local token pid request model body answer size started
  token=$(docker exec "$CONTAINER" cat /app/key_file.json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["inference"]["key"])')
  pid=$(docker inspect --format '{{.State.Pid}}' "$CONTAINER")
  for request in 'diffusion {"n_images": 16, "class_label": "horse", "seed": 1}' \
                 'ebm {"n_images": 16}' \
                 'gan {"n_images": 16, "digit": 7}'; do
    model=${request%% *}
    body=${request#* }
    started=$SECONDS
    answer=$(nsenter --target "$pid" --net curl -sS --max-time 300 -H "Authorization: Bearer $token" \
      -H 'Content-Type: application/json' -d "$body" "http://127.0.0.1:8080/predictions/$model" \
      -o "$SCRATCH/$model.png" -w '%{http_code} %{content_type}')
    [ "$answer" = "200 image/png" ] || die "$model: expected 200 image/png, got '$answer': $(head -c 300 "$SCRATCH/$model.png")"
    size=$(docker exec -i "$CONTAINER" python -c \
      'import sys; from PIL import Image; im = Image.open(sys.stdin.buffer); im.load(); print(im.format, im.size, im.mode)' \
      <"$SCRATCH/$model.png")
    echo "POST /predictions/$model $body -> $answer in $((SECONDS - started)) s," \
      "$(stat -c %s "$SCRATCH/$model.png") bytes, $size"
  done
}

check_non_root() {
  local uids
  uids=$(docker top "$CONTAINER" -eo pid,uid,comm | awk 'NR > 1 {print $2}' | sort -u | tr '\n' ' ')
  docker top "$CONTAINER" -eo pid,uid,comm
  [ "$uids" = "$UID_EXPECTED " ] || die "processes run as uid(s) $uids, expected only $UID_EXPECTED"
  echo "every process runs as uid $UID_EXPECTED"
}

check_no_secrets() {  # neither build secret, nor any pip configuration, is left in the image
  resolve_secrets
  local secret digest found
  for secret in "$PIP_CONF" "$CA_BUNDLE"; do
    digest=$(sha256sum <"$secret" | cut -d' ' -f1)
    found=$(docker run --rm --network=none --user 0 "$IMAGE" sh -c \
      "find / -xdev -type f -size $(stat -c %s "$secret")c -exec sha256sum {} + | awk -v d=$digest '\$1 == d {print \$2}'")
    # The image's own bundle (from its ca-certificates package) equals a machine's stock Debian one.
    found=$(grep -vx /etc/ssl/certs/ca-certificates.crt <<<"$found" || true)
    [ -z "$found" ] || die "the image holds a copy of $secret: $found"
  done
  found=$(docker run --rm --network=none --user 0 "$IMAGE" sh -c \
    'find / -xdev \( -name pip.conf -o -name pip.ini \) -print; find /run/secrets -type f -size +0 2>/dev/null; pip config list')
  [ -z "$found" ] || die "pip configuration or secrets in the image: $found"
  found=$(docker history --no-trunc "$IMAGE")
  if grep -q 'BEGIN CERTIFICATE' <<<"$found"; then die "a certificate is in the image history"; fi
  echo "no copy of $PIP_CONF or $CA_BUNDLE, no pip.conf, no pip setting and no secret in $IMAGE"
}

verify() {
  docker image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run the build step first"
  local started=$SECONDS
  CONTAINER=generators-verify-$$
  docker run --detach --name "$CONTAINER" --network=none "$IMAGE" >/dev/null
  echo "verifying $IMAGE in container $CONTAINER (no network)"
  wait_healthy
  post_readme_requests
  check_non_root
  check_no_secrets
  docker rm -f "$CONTAINER" >/dev/null
  CONTAINER=
  echo "verify: OK in $((SECONDS - started)) s"
}

start_daemon
case "$STEP" in
  build) build ;;
  verify) verify ;;
  all) build; verify ;;
esac
