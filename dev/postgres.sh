#!/usr/bin/env bash
# Starts the machine's PostgreSQL 15 cluster (idempotently) and makes sure the test role
# exists. Prints the base URL (without password) on stdout; the password is in the file
# named by $1 (created with mode 600 if missing).
set -euo pipefail
pwfile="${1:?usage: postgres.sh PASSWORD_FILE}"
if [ ! -s "$pwfile" ]; then
  umask 077
  head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$pwfile"
fi
password="$(cat "$pwfile")"
if ! pg_lsclusters -h | grep -q '^15 \+main '; then
  pg_createcluster 15 main >/dev/null
fi
if ! pg_lsclusters -h | grep -q '^15 \+main .* online'; then
  pg_ctlcluster 15 main start >&2  # its chatter (e.g. "Removed stale pid file") must not pollute the URL on stdout
fi
for _ in $(seq 1 50); do
  pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 0.2
done
as_postgres() { (cd / && runuser -u postgres -- "$@"); }
as_postgres psql -q -v ON_ERROR_STOP=1 -d postgres <<SQL >/dev/null
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'offload_test') THEN
    CREATE ROLE offload_test LOGIN CREATEDB;
  END IF;
END \$\$;
ALTER ROLE offload_test PASSWORD '$password';
SQL
echo "postgres://offload_test@127.0.0.1:5432"
