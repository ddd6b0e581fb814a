#!/usr/bin/env bash
# Install what tests/test_pgstac.py needs: PostgreSQL 15 + PostGIS 3 (Debian packages) and
# pypgstac (with psycopg) in the venv given as $1. Idempotent: already-installed parts are
# skipped, so running it twice (or on a machine that has them) is cheap and never fails.
#   usage: bash .ci/pgstac.sh .venv
set -euo pipefail
VENV="${1:?usage: $0 VENV_DIR}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "pgstac.sh: no python at $PY" >&2; exit 2; }
export DEBIAN_FRONTEND=noninteractive

have_pg() {
  [ -x /usr/lib/postgresql/15/bin/initdb ] && [ -x /usr/lib/postgresql/15/bin/pg_ctl ] &&
    ls /usr/share/postgresql/15/extension/postgis.control >/dev/null 2>&1
}

if have_pg; then
  echo "pgstac.sh: PostgreSQL 15 + PostGIS already installed"
else
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # postgresql-15 brings initdb/pg_ctl; no cluster is needed (tests make throwaway ones).
  $SUDO apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    postgresql-15 postgresql-15-postgis-3 >/dev/null
  have_pg || { echo "pgstac.sh: PostgreSQL 15 + PostGIS not found after apt-get install" >&2; exit 1; }
  echo "pgstac.sh: installed PostgreSQL 15 + PostGIS"
fi

if "$PY" -c "import pypgstac, psycopg, psycopg_pool" >/dev/null 2>&1; then
  echo "pgstac.sh: pypgstac already installed in $VENV"
else
  CONSTRAINTS=()
  [ -f constraints.txt ] && CONSTRAINTS=(-c constraints.txt)
  "$PY" -m pip install -q "${CONSTRAINTS[@]}" "pypgstac[psycopg]>=0.9,<0.11"
  echo "pgstac.sh: installed pypgstac in $VENV"
fi
