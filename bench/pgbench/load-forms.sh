#!/usr/bin/env bash
# The aggregate-load statement's forms under pgbench, no snapshot stored (docs/benchmarks.md,
# "Loads in one statement"):
#   scripts/with-postgres --durable bench/pgbench/load-forms.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
P="$ANNAL_PG_BINDIR/psql $DATABASE_URL -q -X"
for f in "$here"/../../eventstore/migrations/postgres/*.sql; do $P -f "$f" >/dev/null; done
$P -f "$here/setup.sql"
for round in 1 2; do
    for form in plain cte nocte; do
        echo -n "round $round, $form: "
        "$ANNAL_PG_BINDIR/pgbench" -n -M prepared -T 5 -c 1 -f "$here/$form.sql" "$DATABASE_URL" 2>&1 | grep "tps ="
    done
done
