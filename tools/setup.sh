#!/usr/bin/env bash
# Installs what the suite needs and is missing: redis-server (unless --no-redis-server) and the Python packages of
# requirements.txt in the project's own virtual environment, .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" != "--no-redis-server" ] && ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing redis-server from the system packages" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server is missing: run 'sudo apt-get install -y redis-server', then run this again" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
fi
wanted=$(sha1sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/requirements.sha1 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
    echo "$wanted" > .venv/requirements.sha1
fi
