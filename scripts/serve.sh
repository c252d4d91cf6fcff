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
stop() { "${VENV}/bin/torchserve" --stop >/dev/null 2>&1 || true; }
trap stop INT TERM EXIT
"${VENV}/bin/torchserve" --start --foreground --ncs --ts-config config.properties --models "${models[@]}"
