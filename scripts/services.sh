#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer.
# Uses running servers as they are; starts installed-but-stopped ones; installs them with apt
# only when they are missing. Idempotent: run it as often as you like.
set -euo pipefail

PGHOST_=${PGHOST_:-127.0.0.1}
PGPORT_=${PGPORT_:-5432}
REDIS_PORT=${REDIS_PORT:-6379}

log() { printf '[services] %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then echo sudo; else
            log "need root to install packages; run as root or install sudo"; exit 1; fi
    fi
}

apt_install() {
    local sudo; sudo=$(need_root)
    log "installing $*"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h "$PGHOST_" -p "$PGPORT_" 2>/dev/null; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]; }

# --- PostgreSQL -------------------------------------------------------------
if ! command -v pg_isready >/dev/null 2>&1; then apt_install postgresql postgresql-client; fi
if pg_up; then
    log "PostgreSQL already running on $PGHOST_:$PGPORT_"
else
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql; fi
    ver=$(ls /etc/postgresql | sort -V | tail -1)
    conf=/etc/postgresql/$ver/main
    # Local development only: trust on loopback, so `postgres` needs no password.
    if ! grep -q 'tokenwarden-local' "$conf/pg_hba.conf" 2>/dev/null; then
        sed -i '1i host all all 127.0.0.1/32 trust # tokenwarden-local\nhost all all ::1/128 trust # tokenwarden-local\nlocal all all trust # tokenwarden-local' "$conf/pg_hba.conf"
    fi
    log "starting PostgreSQL $ver"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || pg_ctlcluster "$ver" main start
    for _ in $(seq 1 100); do pg_up && break; sleep 0.2; done
    pg_up || { log "PostgreSQL did not come up"; exit 1; }
fi

# --- Redis ------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then apt_install redis-server; fi
if redis_up; then
    log "Redis already running on 127.0.0.1:$REDIS_PORT"
else
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir /tmp --logfile /tmp/tokenwarden-redis.log
    for _ in $(seq 1 100); do redis_up && break; sleep 0.1; done
    redis_up || { log "Redis did not come up"; exit 1; }
fi
