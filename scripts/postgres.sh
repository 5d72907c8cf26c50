#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the tuning tests (Debian's package,
# installed when missing). Prints the database URL on stdout; `scripts/postgres.sh stop DIR` stops it.
set -euo pipefail
if [ "${1:-}" = stop ]; then
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  su postgres -c "$pgbin/pg_ctl -D $2/data -m fast -w stop" >/dev/null 2>&1 || true
  rm -rf "$2"
  exit 0
fi
if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
port="${EXAGGERATE_PG_PORT:-55432}"
dir=$(mktemp -d /tmp/exaggerate-pg.XXXXXX)
chown postgres:postgres "$dir"
su postgres -c "$pgbin/initdb -D $dir/data -A trust -U postgres" >/dev/null
su postgres -c "$pgbin/pg_ctl -D $dir/data -l $dir/server.log -w -o '-p $port -k $dir -c listen_addresses=127.0.0.1' start" >/dev/null
su postgres -c "$pgbin/createdb -h 127.0.0.1 -p $port -U postgres exaggerate_test"
echo "$dir" > /tmp/exaggerate-pg.dir
echo "postgresql://postgres@127.0.0.1:$port/exaggerate_test"
