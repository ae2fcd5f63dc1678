#!/usr/bin/env bash
# Start a local PostgreSQL for the service's store tests (Debian; run as root) and print its URL:
#
#   export VOXELDOSE_TEST_POSTGRES_URL="$(bash tests/service/postgres.sh)"
#
# Installs postgresql when missing, starts the cluster (creating one when there is none), and
# creates the role and database `voxeldose` (password `voxeldose`, TCP on 127.0.0.1 only).
# Idempotent: a second run only prints the URL.  Everything but the URL goes to stderr.
set -euo pipefail
# The URL goes to fd 3 (the caller's stdout); all the work runs with fd 3 *closed*, because a
# server started here (by pg_ctlcluster, or by the package's postinst) would otherwise inherit
# the caller's $(...) pipe, and the command substitution would wait for as long as it runs.
exec 3>&1 1>&2

setup() {
  PGUSER_NAME=voxeldose
  PGDB=voxeldose
  PGPASS=voxeldose

  if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    if [ "$(id -u)" != "0" ]; then echo "postgresql is not installed and this is not root" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  fi

  ver="$(ls /usr/lib/postgresql | sort -V | tail -1)"
  if ! pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main"' | grep -q .; then
    pg_createcluster "$ver" main >/dev/null
  fi
  port="$(pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" {print $3}')"
  status="$(pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" {print $4}')"
  if [ "$status" != "online" ]; then
    # listen on loopback only; no systemd in containers, pg_ctlcluster works without it
    pg_ctlcluster "$ver" main start -o "-c listen_addresses=127.0.0.1" \
      || pg_ctlcluster "$ver" main start
  fi
  for _ in $(seq 1 50); do
    su postgres -c "pg_isready -q -h 127.0.0.1 -p $port" && break
    sleep 0.2
  done
  su postgres -c "pg_isready -h 127.0.0.1 -p $port" >/dev/null

  psql_q() { su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
  if [ "$(psql_q "SELECT 1 FROM pg_roles WHERE rolname='$PGUSER_NAME'")" != "1" ]; then
    psql_q "CREATE ROLE $PGUSER_NAME LOGIN PASSWORD '$PGPASS'"
  fi
  if [ "$(psql_q "SELECT 1 FROM pg_database WHERE datname='$PGDB'")" != "1" ]; then
    psql_q "CREATE DATABASE $PGDB OWNER $PGUSER_NAME"
  fi
}
setup 3>&-

echo "postgresql+psycopg://$PGUSER_NAME:$PGPASS@127.0.0.1:$port/$PGDB" >&3
