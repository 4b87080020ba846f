#!/usr/bin/env bash
# ensure-services.sh: start PostgreSQL and Redis on loopback, only if not already running.
#
# Idempotent: each service is probed first (pg_isready, redis-cli ping) and left alone when
# it answers. Needs root (or sudo) to start them.
# Security: both listen on loopback only (Debian's PostgreSQL default listen_addresses is
# localhost; Redis is bound to 127.0.0.1 and ::1 explicitly); Redis keeps nothing on disk.
set -euo pipefail

SUDO=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
fi

wait_for() { # wait_for DESCRIPTION COMMAND...: poll up to ~30 s
  local what=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "ensure-services: $what did not come up" >&2
  return 1
}

# Probed over the Unix socket: that is how the tests reach it (tests/support/postgres.py),
# from a network namespace where 127.0.0.1:5432 is not this server.
PG_SOCKET=${MAILWARDEN_TEST_PG_SOCKET:-/var/run/postgresql}
if pg_isready -q -h "$PG_SOCKET" >/dev/null 2>&1; then
  echo "ensure-services: PostgreSQL already running"
else
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_for PostgreSQL pg_isready -q -h "$PG_SOCKET"
  echo "ensure-services: PostgreSQL $version started"
fi

if redis-cli -h 127.0.0.1 ping 2>/dev/null | grep -q PONG; then
  echo "ensure-services: Redis already running"
else
  "${SUDO[@]}" mkdir -p /var/lib/redis /var/log/redis
  if id redis >/dev/null 2>&1; then
    "${SUDO[@]}" chown redis:redis /var/lib/redis /var/log/redis || true
  fi
  "${SUDO[@]}" redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis sh -c 'redis-cli -h 127.0.0.1 ping | grep -q PONG'
  echo "ensure-services: Redis started"
fi
