#!/usr/bin/env bash
# Makes sure the operations tools the tests use are installed: promtool (Debian package
# `prometheus`), which `cargo test --test deploy` runs on deploy/prometheus/. Installs with apt
# only when missing (no recommends: the Prometheus server is not started or needed).
# Idempotent: run it as often as you like (`make test` does).
set -euo pipefail

log() { printf '[ops-tools] %s\n' "$*" >&2; }

if command -v promtool >/dev/null 2>&1; then
    log "promtool already installed ($(promtool --version 2>&1 | head -1))"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=sudo; else
        log "need root to install the Debian package prometheus (promtool)"; exit 1; fi
fi
log "installing promtool (Debian package prometheus)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package enables a Prometheus server; the tests need only promtool.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $sudo systemctl stop prometheus || true
fi
command -v promtool >/dev/null 2>&1 || { log "promtool still missing after installing prometheus"; exit 1; }
log "promtool installed ($(promtool --version 2>&1 | head -1))"
