#!/usr/bin/env bash
# Make sure Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672, guest/guest) are running for
# development and CI: leave a server that answers alone, start one that is installed but
# stopped, install (Debian packages) and start one that is missing. Every wait is bounded.
#
# Usage: scripts/brokers.sh [redis] [rabbitmq]      (default: both)
# Environment:
#   BROKERS_TIMEOUT_S   how long to wait for each server to answer after starting it (default 90)
#   BROKERS_APT_TIMEOUT_S  bound on apt-get update + install (default 900)
#   BROKERS_NO_INSTALL  set to 1 to fail instead of installing missing packages
set -euo pipefail

REDIS_HOST=127.0.0.1
REDIS_PORT=6379
RABBITMQ_HOST=127.0.0.1
RABBITMQ_PORT=5672
TIMEOUT_S=${BROKERS_TIMEOUT_S:-90}

log() { echo "brokers: $*" >&2; }
die() {
    echo "brokers: ERROR: $*" >&2
    exit 1
}

# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# systemd is managing services when /run/systemd/system exists (sd_booted(3)).
have_systemd() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; }

# PING over a raw socket, so the check works before redis-cli is installed.
redis_answers() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r -t 2 reply <&3 || exit 1
        [[ $reply == "+PONG"* ]]' "$REDIS_HOST" "$REDIS_PORT" 2>/dev/null
}

# Send the AMQP 0-9-1 protocol header; a broker answers with a Connection.Start method frame,
# whose first byte is the frame type 1.
rabbitmq_answers() {
    local first
    # shellcheck disable=SC2016 # expanded by the inner bash
    first=$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        head -c 1 <&3 | od -An -tx1' "$RABBITMQ_HOST" "$RABBITMQ_PORT" 2>/dev/null) || return 1
    [[ ${first// /} == "01" ]]
}

# wait_for SECONDS CHECK...: poll CHECK every half second until it succeeds or time runs out.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
}

# Start a systemd unit when systemd runs and knows it; false when it cannot or fails, so the
# caller starts the server directly.
systemd_start() {
    { have_root && have_systemd && systemctl cat "$1" >/dev/null 2>&1; } || return 1
    log "starting $1"
    timeout "$TIMEOUT_S" "${SUDO[@]}" systemctl --no-ask-password start "$1" && return 0
    log "systemctl start $1 failed; starting it directly"
    return 1
}

redis_start() {
    systemd_start redis-server.service && return 0
    # Debian's directories when we can use them, a private one otherwise (non-root developer).
    local dir=/var/lib/redis logdir=/var/log/redis
    if ! { mkdir -p "$dir" "$logdir" && [[ -w $dir && -w $logdir ]]; } 2>/dev/null; then
        dir="${TMPDIR:-/tmp}/esm-redis-$(id -u)"
        logdir=$dir
        mkdir -p "$dir"
    fi
    log "starting redis-server on $REDIS_HOST:$REDIS_PORT (log $logdir/ci.log)"
    redis-server --daemonize yes --bind "$REDIS_HOST" -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$dir" --logfile "$logdir/ci.log" ||
        die "redis-server failed to start; see $logdir/ci.log"
}

ensure_redis() {
    if redis_answers; then
        log "redis: answering on $REDIS_HOST:$REDIS_PORT"
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        apt_install redis-server
        # On systemd hosts the package starts its own service.
        if have_systemd && wait_for 10 redis_answers; then
            log "redis: installed and answering on $REDIS_HOST:$REDIS_PORT"
            return 0
        fi
    fi
    redis_start
    wait_for "$TIMEOUT_S" redis_answers ||
        die "redis did not answer on $REDIS_HOST:$REDIS_PORT within ${TIMEOUT_S}s"
    log "redis: started, answering on $REDIS_HOST:$REDIS_PORT"
}

rabbitmqctl_q() { timeout 30 "${SUDO[@]}" rabbitmqctl -q "$@" </dev/null; }

# A fresh install in a container often has a hostname the Erlang distribution cannot resolve,
# so the default node name rabbit@HOST fails to start. Before the package's postinst writes its
# defaults, pin the node to localhost and bind it to loopback (guest may only log in from there).
rabbitmq_preseed_env() {
    [[ -e /etc/rabbitmq/rabbitmq-env.conf ]] && return 0
    log "writing /etc/rabbitmq/rabbitmq-env.conf (node rabbit@localhost on 127.0.0.1)"
    as_root mkdir -p /etc/rabbitmq
    printf '%s\n' 'NODENAME=rabbit@localhost' 'NODE_IP_ADDRESS=127.0.0.1' \
        'ERL_EPMD_ADDRESS=127.0.0.1' | as_root tee /etc/rabbitmq/rabbitmq-env.conf >/dev/null
}

rabbitmq_start() {
    have_root || die "rabbitmq is stopped; starting it needs root (or passwordless sudo)"
    # The unit itself waits for the node to boot.
    systemd_start rabbitmq-server.service && return 0
    log "starting rabbitmq-server -detached"
    # The Debian wrapper switches to the rabbitmq user; -detached returns before the node boots.
    timeout 60 "${SUDO[@]}" rabbitmq-server -detached </dev/null >/dev/null 2>&1 ||
        die "rabbitmq-server -detached failed; see /var/log/rabbitmq/"
}

rabbitmq_ready() { rabbitmqctl_q await_startup >/dev/null 2>&1 && rabbitmq_answers; }

ensure_rabbitmq() {
    if rabbitmq_answers; then
        log "rabbitmq: answering on $RABBITMQ_HOST:$RABBITMQ_PORT"
    else
        local installed=0
        if ! command -v rabbitmq-server >/dev/null 2>&1; then
            have_root || die "rabbitmq-server not installed; installing needs root"
            rabbitmq_preseed_env
            apt_install rabbitmq-server
            installed=1
        fi
        # On systemd hosts the package starts its own service; the node takes a few seconds.
        if ((installed)) && have_systemd && wait_for "$TIMEOUT_S" rabbitmq_ready; then
            log "rabbitmq: installed and answering on $RABBITMQ_HOST:$RABBITMQ_PORT"
        else
            rabbitmq_start
            wait_for "$TIMEOUT_S" rabbitmq_ready ||
                die "rabbitmq did not answer on $RABBITMQ_HOST:$RABBITMQ_PORT within" \
                    "${TIMEOUT_S}s; see /var/log/rabbitmq/"
            log "rabbitmq: started, answering on $RABBITMQ_HOST:$RABBITMQ_PORT"
        fi
    fi
    # Tests drive the broker with rabbitmqctl (closing connections), so it must reach the node.
    # The Debian wrapper only runs for root or the rabbitmq user; others get a warning, and the
    # tests that need rabbitmqctl skip.
    command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl not found on PATH"
    if ! have_root; then
        log "WARNING: rabbitmqctl needs root (or passwordless sudo); tests using it will skip"
        return 0
    fi
    rabbitmqctl_q await_startup >/dev/null 2>&1 ||
        die "rabbitmqctl cannot reach the running node (check RABBITMQ_NODENAME in" \
            "/etc/rabbitmq/rabbitmq-env.conf and the Erlang cookie in /var/lib/rabbitmq/)"
    rabbitmqctl_q authenticate_user guest guest >/dev/null 2>&1 ||
        die "rabbitmq user guest/guest does not authenticate"
    log "rabbitmq: rabbitmqctl works, guest/guest authenticates"
}

main() {
    local targets=("$@")
    ((${#targets[@]})) || targets=(redis rabbitmq)
    for target in "${targets[@]}"; do
        case $target in
            redis) ensure_redis ;;
            rabbitmq) ensure_rabbitmq ;;
            *) die "unknown broker '$target' (expected redis or rabbitmq)" ;;
        esac
    done
}

main "$@"
