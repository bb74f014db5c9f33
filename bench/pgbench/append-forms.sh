#!/usr/bin/env bash
# A one-event append's statement forms under pgbench, against a plain INSERT of the same row
# (docs/benchmarks.md, "A one-event append without arrays"):
#   C=16 scripts/with-postgres --durable bench/pgbench/append-forms.sh
# Each client appends to its own stream (`:v` counts its versions across transactions).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
P="$ANNAL_PG_BINDIR/psql $DATABASE_URL -q -X"
for f in "$here"/../../eventstore/migrations/postgres/*.sql; do $P -f "$f" >/dev/null; done
clients=${C:-1}
for round in 1 2 3; do
    for form in raw arrays scalar; do
        echo -n "round $round, $clients clients, $form: "
        "$ANNAL_PG_BINDIR/pgbench" -n -M prepared -T 5 -c "$clients" -j "$clients" -D v=-1 -D run="$round" \
            -f "$here/append-$form.sql" "$DATABASE_URL" 2>&1 | grep "tps ="
    done
done
