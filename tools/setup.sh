#!/usr/bin/env bash
# Installs what is missing: redis-server (unless --no-redis-server) and, in the project's own virtual environment
# .venv, the Python packages a download host needs (requirements.txt), or with --dev those of the tests, benchmarks
# and lint as well (requirements-dev.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

redis_server=yes
requirements=requirements.txt
for arg in "$@"; do
    case "$arg" in
        --no-redis-server) redis_server=no ;;
        --dev) requirements=requirements-dev.txt ;;
        *) echo "usage: bash tools/setup.sh [--no-redis-server] [--dev]" >&2; exit 2 ;;
    esac
done

if [ "$redis_server" = yes ] && ! command -v redis-server >/dev/null 2>&1; then
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
# Keyed on every file pip reads (requirements-dev.txt includes requirements.txt), so an edit to either reinstalls.
wanted=$(cat "$requirements" requirements.txt | sha1sum | cut -d' ' -f1)
if [ "$(cat .venv/requirements.sha1 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
    echo "$wanted" > .venv/requirements.sha1
fi
