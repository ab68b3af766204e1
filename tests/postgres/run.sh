#!/usr/bin/env bash
# Run the tiny workflow with its registry in a real PostgreSQL started on this machine, and check
# that the registry holds the same rows as an SQLite registry of the same results.
#
# Needs: root, Debian (apt-get installs postgresql when missing), the project's venv
# (PYTHON=.venv/bin/python by default; the psycopg driver is pip-installed into it when missing).
# Starts a throw-away cluster in WORKDIR/pgdata listening on a Unix socket only (no TCP), as the
# postgres user, and stops it on exit.
# Usage: tests/postgres/run.sh [WORKDIR]      (WORKDIR keeps the run, the logs and the cluster)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WORK=$(realpath -m "${1:-$(mktemp -d /tmp/histosynth-postgres.XXXXXX)}")
mkdir -p "$WORK"/{logs,run,tiny,pgdata}
say() { echo "[postgres-test] $*"; }
die() { echo "[postgres-test] ERROR: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (it installs packages and runs the server as user postgres)"
command -v apt-get > /dev/null || die "needs Debian's apt-get for postgresql"
[[ -x $PYTHON ]] || die "no Python at $PYTHON; run 'make venv' or set PYTHON"

if ! ls /usr/lib/postgresql/*/bin/pg_ctl > /dev/null 2>&1; then
    say "installing postgresql"
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql) > "$WORK/logs/apt.log" 2>&1 \
        || die "apt-get install failed; see $WORK/logs/apt.log"
fi
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)")
"$PYTHON" -c "import psycopg" 2> /dev/null || "$PYTHON" -m pip install -q "psycopg[binary]>=3.1"

# The server runs as postgres: it owns its data and socket folders and must be able to reach them
# (mktemp makes WORK private to root).
chmod 755 "$WORK"
chown -R postgres "$WORK/run" "$WORK/pgdata" "$WORK/logs"
chmod 700 "$WORK/pgdata"
as_postgres() { su postgres -s /bin/bash -c "$*"; }
as_postgres "$BIN/initdb -D $WORK/pgdata -U postgres --auth=trust" > "$WORK/logs/initdb.log" 2>&1 \
    || die "initdb failed; see $WORK/logs/initdb.log"
as_postgres "$BIN/pg_ctl -D $WORK/pgdata -l $WORK/logs/postgres.log -o \"-k $WORK/run -c listen_addresses=''\" -w start" \
    > /dev/null || die "the server did not start; see $WORK/logs/postgres.log"
trap 'as_postgres "$BIN/pg_ctl -D $WORK/pgdata -m fast stop" > /dev/null 2>&1 || true' EXIT
as_postgres "$BIN/createdb -h $WORK/run histosynth"
URL="postgresql+psycopg://postgres@/histosynth?host=$WORK/run"
say "server up; registry at $URL"

cat > "$WORK/overlay.yaml" <<YAML
registry: {url: "$URL"}
YAML
say "running the tiny workflow"
"$PYTHON" -m snakemake --snakefile "$REPO/Snakefile" --directory "$WORK/tiny" \
    --configfile "$REPO/config/config.yaml" "$REPO/config/tiny.yaml" "$WORK/overlay.yaml" \
    --cores 2 --resources gpu=1 > "$WORK/logs/snakemake.log" 2>&1 || die "the workflow failed; see $WORK/logs/snakemake.log"

cd "$WORK/tiny"
"$PYTHON" - "$URL" <<'PY'
import sys

from histosynth.registry import connect, lineage, register_results, table_rows

postgres, sqlite = connect(sys.argv[1], create=False), connect("sqlite:///sqlite-copy.sqlite")
register_results(sqlite, ".")
for name in ("models", "sets", "images", "datasets", "runs", "metrics"):
    ours, theirs = table_rows(postgres, name), table_rows(sqlite, name)
    drop = [c for c in ("id", "registered_at", "set_id", "model_id", "run_id", "parent_id", "dataset_id") if c in ours]
    key = [c for c in ("kind", "name", "path", "image_id", "ratio", "seed", "fold", "metric", "class") if c in ours]
    left = ours.drop(columns=drop).sort_values(key).reset_index(drop=True)
    right = theirs.drop(columns=drop).sort_values(key).reset_index(drop=True)
    assert left.astype(str).equals(right.astype(str)), f"table {name} differs between PostgreSQL and SQLite"
    print(f"{name}: {len(ours)} rows, the same in PostgreSQL and SQLite")
[model] = table_rows(postgres, "models", kind="diffusion").to_dict("records")
found = lineage(postgres, model["id"])
print(f"lineage of the diffusion model: {len(found['sets'])} sets, {len(found['datasets'])} datasets, "
      f"{len(found['runs'])} runs, {len(found['verdicts'])} verdict rows")
PY
say "OK: the tiny workflow's registry in PostgreSQL matches SQLite"
