#!/usr/bin/env bash
# A throwaway PostgreSQL for benchmarks: a fresh cluster in ${PGB_DIR:-/tmp/tessera-pg} on
# 127.0.0.1:${PGB_PORT:-25432}, user tessera, trust authentication (local use only). Prints the URL
# to give --store. Run again for an empty database; `scripts/pg.sh stop` stops it.
# Needs PostgreSQL (scripts/test-deps.sh installs it) and root (the server runs as postgres).
set -euo pipefail
dir=${PGB_DIR:-/tmp/tessera-pg}
port=${PGB_PORT:-25432}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
if [ -f "$dir/data/postmaster.pid" ]; then
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
fi
[ "${1:-}" = stop ] && exit 0
rm -rf "$dir"
mkdir -p "$dir"
chown postgres:postgres "$dir"
runuser -u postgres -- "$bin/initdb" -D "$dir/data" -A trust -U tessera >/dev/null
runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -l "$dir/log" -w start >/dev/null
echo "postgresql://tessera@127.0.0.1:$port/postgres"
