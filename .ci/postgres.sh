# Sourced by .ci/run: installs (if needed) and starts a throwaway local PostgreSQL server for
# the memory store's tests, then exports MINDSET_TEST_POSTGRES_URL. Safe to source twice.
# Listens on 127.0.0.1 only, trusts local connections, keeps its data under /tmp.

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    echo "postgres.sh: installing Debian's postgresql package" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

MINDSET_PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
MINDSET_PG_ROOT="${MINDSET_PG_ROOT:-/tmp/mindset-postgres}"
MINDSET_PG_PORT="${MINDSET_PG_PORT:-55432}"
mkdir -p "$MINDSET_PG_ROOT"
chown postgres:postgres "$MINDSET_PG_ROOT"

if [ ! -f "$MINDSET_PG_ROOT/data/PG_VERSION" ]; then
    runuser -u postgres -- "$MINDSET_PG_BIN/initdb" -D "$MINDSET_PG_ROOT/data" -A trust \
        -U postgres --no-sync >/dev/null
fi

if ! runuser -u postgres -- "$MINDSET_PG_BIN/pg_ctl" -D "$MINDSET_PG_ROOT/data" status >/dev/null 2>&1; then
    runuser -u postgres -- "$MINDSET_PG_BIN/pg_ctl" -D "$MINDSET_PG_ROOT/data" \
        -l "$MINDSET_PG_ROOT/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $MINDSET_PG_PORT -k $MINDSET_PG_ROOT -c fsync=off" \
        start >/dev/null
fi

mindset_psql() {
    runuser -u postgres -- "$MINDSET_PG_BIN/psql" -h 127.0.0.1 -p "$MINDSET_PG_PORT" \
        -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}
if [ "$(mindset_psql -c "SELECT 1 FROM pg_roles WHERE rolname = 'mindset'")" != "1" ]; then
    mindset_psql -c "CREATE ROLE mindset LOGIN" >/dev/null
fi
if [ "$(mindset_psql -c "SELECT 1 FROM pg_database WHERE datname = 'mindset_test'")" != "1" ]; then
    mindset_psql -c "CREATE DATABASE mindset_test OWNER mindset" >/dev/null
fi
unset -f mindset_psql

export MINDSET_TEST_POSTGRES_URL="postgresql://mindset@127.0.0.1:${MINDSET_PG_PORT}/mindset_test"
export MINDSET_REQUIRE_POSTGRES=1
