#!/usr/bin/env bash
# Makes sure Redis and Postgres answer on 127.0.0.1:6379 and :5432, reusing them if they do.
# Otherwise starts them: with `docker compose` when a Docker engine answers, else with the
# local redis-server / PostgreSQL binaries, else says what to install. Then creates the
# `llmq` database if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() {
  for _ in $(seq 1 50); do answers "$1" && return 0; sleep 0.2; done
  echo "services: $2 did not start listening on port $1" >&2
  return 1
}
docker_ok() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

if answers 6379; then
  echo "services: reusing Redis on 127.0.0.1:6379"
elif docker_ok; then
  docker compose -f deploy/compose.yaml up -d redis
  wait_for 6379 Redis
elif command -v redis-server >/dev/null 2>&1; then
  echo "services: starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  wait_for 6379 Redis
else
  echo "services: Redis is not running and cannot be started here." >&2
  echo "  Install it (Debian/Ubuntu: apt-get install redis-server) or Docker, then run this again." >&2
  exit 1
fi

if answers 5432; then
  echo "services: reusing Postgres on 127.0.0.1:5432"
elif docker_ok; then
  docker compose -f deploy/compose.yaml up -d postgres
  wait_for 5432 Postgres
elif command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  echo "services: starting the local PostgreSQL cluster"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  wait_for 5432 Postgres
else
  echo "services: Postgres is not running and cannot be started here." >&2
  echo "  Install it (Debian/Ubuntu: apt-get install postgresql) or Docker, then run this again." >&2
  exit 1
fi

# The demo's database; the test suites create their own.
if command -v psql >/dev/null 2>&1; then
  if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'llmq'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE llmq" && echo "services: created database llmq"
  fi
fi
