#!/usr/bin/env bash
# Start TorchServe in the foreground with the three generators from model_store/. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${VERSION:-1.0}"
VENV="${VENV:-.venv}"
models=()
for name in diffusion ebm gan; do
  models+=("${name}=${name}-${VERSION}.mar")
done
cat <<MSG
Starting TorchServe with ${models[*]}
  inference:  http://127.0.0.1:8080/predictions/{diffusion,ebm,gan}
  management: http://127.0.0.1:8081/models
  metrics:    http://127.0.0.1:8082/metrics
Token authorization is on. Once started, the keys are in $(pwd)/key_file.json:
  TOKEN=\$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
  curl -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' -d '{"n_images": 16}' \\
       http://127.0.0.1:8080/predictions/gan -o digits.png
or use: ${VENV}/bin/python scripts/client.py generate gan --n-images 16 -o digits.png
MSG
# A restart brings back what the management API changed. TorchServe writes a snapshot of its models
# (versions, default version, workers, batch settings) to $LOG_LOCATION/config/ at start, after every
# management call that changes them, and at stop. When one is there, its model_snapshot line is added to
# config.properties and TorchServe restores those models instead of loading the archives above; every
# other setting still comes from config.properties. Delete logs/config/ to start from the archives again.
logs="${LOG_LOCATION:-logs}"
start=(--ts-config config.properties --models "${models[@]}")
shopt -s nullglob
snapshots=("${logs}/config/"*.cfg)  # named yyyyMMddHHmmssSSS-<event>.cfg: in time order
for ((i = ${#snapshots[@]} - 1; i >= 0; i--)); do
  line=$(grep -m 1 '^model_snapshot=' "${snapshots[i]}" || true)
  if [[ "${line}" == *"}" ]]; then  # a complete snapshot (one cut short by a crash ends elsewhere)
    { cat config.properties; printf '%s\n' "${line}"; } > "${logs}/restore.properties.tmp"
    mv "${logs}/restore.properties.tmp" "${logs}/restore.properties"
    start=(--ts-config "${logs}/restore.properties")
    echo "Restoring the models of ${snapshots[i]} (VERSION is not used; delete ${logs}/config/ to start afresh)"
    break
  fi
done
stop() { "${VENV}/bin/torchserve" --stop >/dev/null 2>&1 || true; }
trap stop INT TERM EXIT
"${VENV}/bin/torchserve" --start --foreground "${start[@]}"
