#!/usr/bin/env bash
# Start Debian's PostgreSQL on loopback with a database and user for the distributed-study tests, and
# print the storage URL. Idempotent: safe to run when the cluster or the database already exist.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
command -v pg_lsclusters >/dev/null || { apt-get update -q && apt-get install -y -q postgresql >&2; }
read -r version cluster _ < <(pg_lsclusters --no-header | head -n 1)
if ! pg_lsclusters --no-header | grep -q online; then
    pg_ctlcluster "$version" "$cluster" start >&2
fi
psql_as_postgres() { su postgres -c "psql -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
[ "$(psql_as_postgres "SELECT 1 FROM pg_roles WHERE rolname='vmoe'")" = 1 ] ||
    psql_as_postgres "CREATE ROLE vmoe LOGIN CREATEDB PASSWORD 'vmoe'" >&2
[ "$(psql_as_postgres "SELECT 1 FROM pg_database WHERE datname='vmoe_nas'")" = 1 ] ||
    psql_as_postgres "CREATE DATABASE vmoe_nas OWNER vmoe" >&2
port=$(pg_lsclusters --no-header | awk 'NR==1 {print $3}')
echo "postgresql://vmoe:vmoe@127.0.0.1:${port}/vmoe_nas"
