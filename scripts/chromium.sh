#!/usr/bin/env bash
# Make sure headless Chromium (Debian's `chromium` package) runs, for the test that renders the
# status page (tests/integration/test_status_page.py): install it where it is missing, as
# scripts/brokers.sh installs Redis and RabbitMQ. Where it cannot be installed (no apt-get, no
# root, BROKERS_NO_INSTALL=1) that test skips, so this only warns, unless CI is set: then it
# fails, as the test would.
#
# Environment:
#   CHROMIUM               the browser to check (default chromium)
#   BROKERS_APT_TIMEOUT_S  bound on apt-get update + install (default 900)
#   BROKERS_NO_INSTALL     set to 1 to fail instead of installing
set -euo pipefail

CHROMIUM=${CHROMIUM:-chromium}

log() { echo "chromium: $*" >&2; }
die() {
    echo "chromium: ERROR: $*" >&2
    exit 1
}

# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# The flags the test uses: --no-sandbox because CI containers run as root.
chromium_runs() {
    timeout 60 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
        --dump-dom 'data:text/html,<p>ok</p>' 2>/dev/null </dev/null | grep -q '<p>ok</p>'
}

if ! command -v "$CHROMIUM" >/dev/null 2>&1; then
    if can_install || [[ -n ${CI:-} ]]; then
        apt_install chromium
    else
        log "WARNING: $CHROMIUM not installed and cannot be installed here; the status page" \
            "test will skip"
        exit 0
    fi
fi
if ! chromium_runs; then
    [[ -n ${CI:-} ]] && die "$CHROMIUM does not render a page headless"
    log "WARNING: $CHROMIUM does not render a page headless; the status page test will skip"
    exit 0
fi
log "$("$CHROMIUM" --version 2>/dev/null | head -n 1) renders headless"
