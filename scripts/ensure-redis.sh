#!/usr/bin/env bash
# Make sure Debian's redis-server is installed: integration tests and benchmarks start their
# own on a free loopback port. With --optional (the demo), a missing server is not an
# error: the demo falls back to an embedded fakeredis server.
set -euo pipefail
command -v redis-server >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  echo "installing redis-server (Debian package)..." >&2
  if $SUDO apt-get update -qq >/dev/null 2>&1 \
     && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null 2>&1; then
    command -v redis-server >/dev/null 2>&1 && exit 0
  fi
fi
if [ "${1:-}" = "--optional" ]; then
  echo "redis-server not available: the demo will use an embedded fakeredis server" >&2
  exit 0
fi
echo "redis-server is required: install it (Debian/Ubuntu: apt-get install redis-server)" >&2
exit 1
