#!/usr/bin/env bash
# One command: install what is missing, then run the whole suite on this machine until every task is accounted for.
# With no parquet files under parquet_dir (or with --demo) it first makes a sample served by a local image server.
# Options: --demo, --workers N, --demo-rows N, --demo-dir DIR (see: bash run.sh --help).
set -euo pipefail
cd "$(dirname "$0")"
redis_ip=$(python3 -c 'import os, setting; print(os.environ.get("LAION_REDIS_IP", setting.redis_ip))')
case "$redis_ip" in
    127.*|localhost|::1) bash tools/setup.sh ;;
    *) bash tools/setup.sh --no-redis-server ;;
esac
exec .venv/bin/python -m tools.run_local "$@"
