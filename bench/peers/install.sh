#!/usr/bin/env bash
# Installs the benchmark's peers from their lock files (make bench runs it):
#   node/node_modules   npm ci from node/package-lock.json (AWS SDK v3)
#   .venv               python3 venv with requirements.txt (boto3, awslambdaric, Powertools)
# Skips a part whose lock file has not changed since it was installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
started=$SECONDS

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

node_sum=$(sha256sum node/package-lock.json | cut -d' ' -f1)
if stamp_ok node/node_modules/.installed "$node_sum"; then
  echo "peers: node/node_modules up to date ($(node --version))"
else
  echo "peers: npm ci in bench/peers/node ($(node --version), AWS SDK v3 from package-lock.json)"
  npm ci --prefix node --no-audit --no-fund --loglevel=error
  echo "$node_sum" > node/node_modules/.installed
fi

py_sum=$(sha256sum requirements.txt | cut -d' ' -f1)
if stamp_ok .venv/.installed "$py_sum"; then
  echo "peers: .venv up to date ($(.venv/bin/python --version))"
else
  echo "peers: python3 -m venv bench/peers/.venv; pip install -r requirements.txt ($(python3 --version))"
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  echo "$py_sum" > .venv/.installed
fi
echo "peers: installed in $((SECONDS - started)) s"
