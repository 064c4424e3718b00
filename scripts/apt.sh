# Installing missing Debian packages, for scripts/brokers.sh and scripts/chromium.sh. Sourced,
# not run: the caller defines log MESSAGE and die MESSAGE first.
# Environment:
#   BROKERS_APT_TIMEOUT_S  bound on apt-get update + install (default 900)
#   BROKERS_NO_INSTALL     set to 1 to fail instead of installing missing packages
# shellcheck shell=bash

APT_TIMEOUT_S=${BROKERS_APT_TIMEOUT_S:-900}
NO_INSTALL=${BROKERS_NO_INSTALL:-0}

# Privileged commands (apt-get, rabbitmq-server, rabbitmqctl) need root; use sudo when it works
# without a password, otherwise leave them to fail with a clear message.
SUDO=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
fi
as_root() { "${SUDO[@]}" "$@"; }
have_root() { [[ $(id -u) -eq 0 || ${#SUDO[@]} -gt 0 ]]; }

# can_install: whether apt_install can work here (apt-get, root, installing allowed).
can_install() { [[ $NO_INSTALL != 1 ]] && command -v apt-get >/dev/null 2>&1 && have_root; }

APT_UPDATED=0
apt_install() {
    [[ $NO_INSTALL == 1 ]] && die "$* not installed and BROKERS_NO_INSTALL=1"
    command -v apt-get >/dev/null 2>&1 ||
        die "$* not installed and apt-get is not available; install it with your package manager"
    have_root || die "$* not installed; installing needs root (or passwordless sudo)"
    export DEBIAN_FRONTEND=noninteractive
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        timeout "$APT_TIMEOUT_S" "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get update -q </dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    timeout "$APT_TIMEOUT_S" "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "$@" </dev/null || die "apt-get install $* failed"
}
