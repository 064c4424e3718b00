#!/usr/bin/env bash
# Put Prometheus' promtool (which evaluates PromQL, for the test of the KEDA query in
# deploy/kubernetes) into DIR, from Debian's prometheus package: the package is downloaded and
# unpacked, not installed, so no Prometheus server is set up or started.
#
# Usage: scripts/promtool.sh DIR      (nothing to do when DIR/promtool or a promtool on PATH runs)
set -euo pipefail

dir=${1:?usage: scripts/promtool.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
log() { echo "promtool: $*" >&2; }

if "$dir/promtool" --version >/dev/null 2>&1 || promtool --version >/dev/null 2>&1; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! timeout 300 apt-get download prometheus >/dev/null 2>&1; then
    log "package lists may be stale: apt-get update"
    timeout 600 apt-get update -qq
    timeout 300 apt-get download prometheus >/dev/null
fi
dpkg-deb -x prometheus_*.deb unpacked
install -m 0755 unpacked/usr/bin/promtool "$dir/promtool"
log "installed $("$dir/promtool" --version 2>&1 | head -1) in $dir"
