#!/usr/bin/env bash
# The psycopg2 driver's own test suite (from its source distribution on PyPI) and a Python
# environment with the psycopg2 binary wheel, cached in /var/cache/pgbalancer/psycopg2 (or
# $PGBALANCER_DRIVER_DIR). The native balancer's tests run it direct and through the balancer.
set -euo pipefail
version=2.9.10
dir=${PGBALANCER_DRIVER_DIR:-/var/cache/pgbalancer/psycopg2}
if [ -x "$dir/venv/bin/python" ] && [ -f "$dir/psycopg2-$version/tests/__init__.py" ]; then
  exit 0
fi
python3 -c 'import venv, ensurepip' 2>/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
python3 -m venv "$dir.tmp/venv"
"$dir.tmp/venv/bin/pip" install -q --disable-pip-version-check "psycopg2-binary==$version"
"$dir.tmp/venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
  -d "$dir.tmp" "psycopg2==$version"
tar -xzf "$dir.tmp/psycopg2-$version.tar.gz" -C "$dir.tmp"
rm -rf "$dir" && mv "$dir.tmp" "$dir"
