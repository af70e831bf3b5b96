#!/usr/bin/env bash
# `sam local` against the local stack (DynamoDB Local and moto), offline, with nothing
# listening outside this machine. See docs/deploy.md, "Run a function locally with Docker".
#
#   infra/scripts/sam-local.sh up                 Docker, arm64 emulation, the base image and
#                                                 the relay to moto (what `invoke` needs);
#                                                 prints DOCKER_HOST=..., STARTED_DOCKERD=0|1
#                                                 and STARTED_RELAY=0|1
#   infra/scripts/sam-local.sh env                up, the local services, and
#                                                 .local/sam/{env.json,template.yaml}
#   infra/scripts/sam-local.sh invoke FN EVENT    env, then `sam local invoke FN -e EVENT`
#   infra/scripts/sam-local.sh down [dockerd|sam-relay]...
#                                                 stop the dockerd and relay started here
#   infra/scripts/sam-local.sh docker-host        print the DOCKER_HOST in use
#
# Docker: a daemon that already answers (DOCKER_HOST, or the default socket: Docker Desktop,
# a laptop's dockerd) is used as it is. Otherwise docker.io is installed from Debian's
# packages if missing, and a dockerd of this project's own runs under .local/docker (data
# and exec roots there, API on the unix socket .local/docker/docker.sock and no TCP port),
# with --ip-forward=false --ip-masq=false (containers get no route off this machine) and
# --userland-proxy=false (needed for arm64 under qemu). Its pid is .local/pids/dockerd.pid:
# `make stop` (saga-local stop) and `down` stop it.
#
# arm64: the functions deploy as arm64 and run here as built (.aws-sam/build). On an x86_64
# machine, qemu-user-static runs them; its binfmt handler is registered if it is not.
#
# Base image: SAM runs public.ecr.aws/lambda/provided:al2023-arm64. If Docker has no such
# image and cannot pull it (offline), a stand-in with that tag is built: busybox-static and
# glibc for arm64 from Debian's packages (about 10 MB, a few seconds).
#
# Reaching the services: the container calls host.docker.internal (mapped to the Docker
# bridge's gateway address with --add-host host.docker.internal:host-gateway). DynamoDB Local
# already listens on every interface; moto listens on 127.0.0.1 only, so `saga-local
# sam-relay` listens on the bridge's gateway address (which only this machine and its
# containers reach) and forwards to it; pid .local/pids/sam-relay.pid. Docker Desktop
# forwards host.docker.internal to the host's loopback by itself: no relay there.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LOCAL="$REPO/.local"
DOCKER_DIR="$LOCAL/docker"
SOCK="$DOCKER_DIR/docker.sock"
PIDS="$LOCAL/pids"
LOGS="$LOCAL/logs"
SAM_DIR="$LOCAL/sam"
ARCH=arm64
IMAGE="public.ecr.aws/lambda/provided:al2023-$ARCH"
SQS_PORT="${SAGA_SQS_PORT:-9324}"
DYNAMODB_PORT="${SAGA_DYNAMODB_PORT:-8000}"
export PATH="$REPO/.venv/bin:$PATH"
export SAM_CLI_TELEMETRY=0 DEBIAN_FRONTEND=noninteractive
# The saga-local binary (the tests pass the one they built); else cargo builds and runs it.
SAGA_LOCAL="${SAGA_LOCAL:-}"

log() { printf 'sam-local: %s\n' "$*" >&2; }
die() {
    printf 'sam-local: ERROR: %s\n' "$*" >&2
    exit 1
}

saga_local() {
    if [ -n "$SAGA_LOCAL" ]; then
        (cd "$REPO" && "$SAGA_LOCAL" "$@")
    else
        (cd "$REPO" && cargo run -q -p local-runner --bin saga-local -- "$@")
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "'sudo $*' failed (it must work without a password)"
    else
        die "not root and no sudo: cannot run $*"
    fi
}

apt_install() {
    log "apt-get install --no-install-recommends $*"
    as_root apt-get update -q >/dev/null
    as_root apt-get install -y -q --no-install-recommends "$@" </dev/null >/dev/null
}

# A pid recorded in FILE that is alive and whose command line contains MARKER.
live_pid() {
    local file="$1" marker="$2" pid
    [ -s "$file" ] || return 1
    pid="$(tr -dc 0-9 <"$file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$marker" || return 1
    printf '%s\n' "$pid"
}

# --- Docker -----------------------------------------------------------------------------
docker_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

ensure_docker() {
    # Our own daemon, if it runs.
    if live_pid "$PIDS/dockerd.pid" dockerd >/dev/null && [ -S "$SOCK" ]; then
        export DOCKER_HOST="unix://$SOCK"
        if docker_answers; then
            return
        fi
    fi
    # Someone else's (Docker Desktop, a laptop's dockerd), unless told to use ours.
    if [ -z "${SAGA_OWN_DOCKERD:-}" ] && command -v docker >/dev/null 2>&1 && docker_answers; then
        log "using the running Docker daemon (${DOCKER_HOST:-default socket})"
        return
    fi
    export DOCKER_HOST="unix://$SOCK"
    if ! command -v dockerd >/dev/null 2>&1; then
        apt_install docker.io
        hash -r
    fi
    command -v dockerd >/dev/null 2>&1 || die "dockerd not found after installing docker.io"
    mkdir -p "$DOCKER_DIR/data" "$DOCKER_DIR/exec" "$PIDS" "$LOGS"
    rm -f "$SOCK"
    log "starting dockerd (data and exec roots in .local/docker, API on .local/docker/docker.sock)"
    # setsid: its own session, so a terminal's Ctrl-C does not reach it; stopped by its pid.
    setsid dockerd \
        --storage-driver=overlay2 \
        --userland-proxy=false --ip-forward=false --ip-masq=false \
        --shutdown-timeout 10 \
        --data-root "$DOCKER_DIR/data" --exec-root "$DOCKER_DIR/exec" \
        --pidfile "$DOCKER_DIR/dockerd.pid" \
        -H "unix://$SOCK" \
        >>"$LOGS/dockerd.log" 2>&1 </dev/null &
    echo $! >"$PIDS/dockerd.pid"
    local deadline=$((SECONDS + 90))
    until docker_answers; do
        live_pid "$PIDS/dockerd.pid" dockerd >/dev/null ||
            die "dockerd exited; log: $LOGS/dockerd.log"$'\n'"$(tail -n 20 "$LOGS/dockerd.log")"
        [ "$SECONDS" -lt "$deadline" ] || die "dockerd did not answer within 90 s; log: $LOGS/dockerd.log"
        sleep 0.5
    done
    log "dockerd running (pid $(cat "$PIDS/dockerd.pid"))"
    STARTED_DOCKERD=1
}
STARTED_DOCKERD=0

# --- arm64 on another machine: qemu through binfmt -------------------------------------------
ensure_arm64() {
    case "$(uname -m)" in aarch64 | arm64) return ;; esac
    # Docker Desktop (and a daemon in a VM) emulates by itself: nothing to do on this side.
    [ "$(docker info --format '{{.OperatingSystem}}' 2>/dev/null)" != "Docker Desktop" ] || return 0
    local misc=/proc/sys/fs/binfmt_misc
    if [ -e "$misc/qemu-aarch64" ] && grep -q enabled "$misc/qemu-aarch64"; then
        return
    fi
    local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    if [ ! -e "$conf" ]; then
        apt_install qemu-user-static
    fi
    [ -e "$conf" ] || die "$conf missing after installing qemu-user-static"
    if [ ! -e "$misc/register" ]; then
        as_root mount -t binfmt_misc binfmt_misc "$misc"
    fi
    # Debian's entry has the F flag: the interpreter is opened now, so it works in containers.
    grep -v '^#' "$conf" | as_root tee "$misc/register" >/dev/null
    log "registered qemu-aarch64 with binfmt_misc"
}

# --- the base image ---------------------------------------------------------------------------
ensure_image() {
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        return
    fi
    log "pulling $IMAGE"
    if timeout 300 docker pull -q "$IMAGE" >/dev/null 2>&1; then
        return
    fi
    log "cannot pull $IMAGE (offline?): building a stand-in with that tag"
    build_stand_in
}

# busybox-static and glibc for arm64, from Debian's packages through apt-get with an apt state
# of its own (this machine's dpkg architectures and lists stay as they are).
build_stand_in() {
    local work="$LOCAL/sam/stand-in" apt="$LOCAL/sam/stand-in/apt"
    rm -rf "$work"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$work/debs" "$work/root"
    local opts=(
        -o "APT::Architecture=$ARCH" -o "APT::Architectures::=$ARCH"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
        -o "Dir::State::status=/dev/null" -o Debug::NoLocking=1
        -o APT::Sandbox::User=root
    )
    apt-get "${opts[@]}" update -q >/dev/null
    (cd "$work/debs" && apt-get "${opts[@]}" download busybox-static libc6 libgcc-s1 >/dev/null)
    local deb
    for deb in "$work/debs"/*.deb; do
        dpkg-deb -x "$deb" "$work/deb-root"
    done
    local root="$work/root" libs=lib/aarch64-linux-gnu
    mkdir -p "$root/bin" "$root/$libs" "$root/etc" "$root/tmp" "$root/var/task" \
        "$root/var/runtime" "$root/opt"
    cp "$work/deb-root/bin/busybox" "$root/bin/busybox"
    local applet
    for applet in sh mv chmod cp ls cat env mkdir rm ln echo sleep; do
        ln -s busybox "$root/bin/$applet"
    done
    # What a Rust binary for aarch64-unknown-linux-gnu loads, and name resolution through
    # /etc/hosts (where --add-host writes host.docker.internal).
    local lib
    for lib in ld-linux-aarch64.so.1 libc.so.6 libm.so.6 libgcc_s.so.1 libpthread.so.0 \
        libdl.so.2 librt.so.1 libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
        cp -L "$work/deb-root/$libs/$lib" "$root/$libs/$lib"
    done
    ln -s "aarch64-linux-gnu/ld-linux-aarch64.so.1" "$root/lib/ld-linux-aarch64.so.1"
    echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
    # This machine's CA bundle, where Amazon Linux and Debian keep theirs (only HTTPS would
    # need it; the local endpoints are plain HTTP).
    if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
        mkdir -p "$root/etc/pki/tls/certs" "$root/etc/ssl/certs"
        cp /etc/ssl/certs/ca-certificates.crt "$root/etc/pki/tls/certs/ca-bundle.crt"
        ln -s ../../pki/tls/certs/ca-bundle.crt "$root/etc/ssl/certs/ca-certificates.crt"
    fi
    chmod 1777 "$root/tmp"
    tar -C "$root" -c . | docker import \
        -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=en_US.UTF-8 TZ=:/etc/localtime LAMBDA_TASK_ROOT=/var/task LAMBDA_RUNTIME_DIR=/var/runtime' \
        -c 'WORKDIR /var/task' \
        --platform "linux/$ARCH" - "$IMAGE" >/dev/null
    rm -rf "$work"
    log "built the stand-in $IMAGE ($(docker image inspect "$IMAGE" --format '{{.Size}}') bytes)"
}

# --- the relay to moto --------------------------------------------------------------------------
# The address `host-gateway` stands for: the default bridge's address (dockerd's default
# --host-gateway-ip). A fresh daemon's IPAM config often names no gateway: then the address of
# the bridge interface itself.
bridge_gateway() {
    local gw name
    gw="$(docker network inspect bridge --format '{{range .IPAM.Config}}{{.Gateway}}{{end}}' 2>/dev/null || true)"
    if [ -z "$gw" ]; then
        name="$(docker network inspect bridge \
            --format '{{index .Options "com.docker.network.bridge.name"}}' 2>/dev/null || true)"
        gw="$(ip -4 -o addr show dev "${name:-docker0}" 2>/dev/null | awk '{ print $4 }' | cut -d/ -f1 | head -n1)"
    fi
    printf '%s\n' "$gw"
}

ensure_relay() {
    local gw
    gw="$(bridge_gateway)"
    # Docker Desktop, or a daemon elsewhere: the gateway is not an address of this machine,
    # and the daemon forwards host.docker.internal by itself.
    if [ -z "$gw" ] || ! ip -4 -o addr show 2>/dev/null | grep -q " $gw/"; then
        [ "${DOCKER_HOST:-}" != "unix://$SOCK" ] ||
            die "cannot find the Docker bridge's address on this machine (found '${gw}')"
        log "the Docker bridge is not on this machine: no relay to moto"
        return
    fi
    if live_pid "$PIDS/sam-relay.pid" sam-relay >/dev/null; then
        return
    fi
    if (exec 3<>"/dev/tcp/$gw/$SQS_PORT") 2>/dev/null; then
        return # something there already (moto started on every interface)
    fi
    mkdir -p "$PIDS" "$LOGS"
    if [ -z "$SAGA_LOCAL" ]; then
        (cd "$REPO" && cargo build -q -p local-runner --bin saga-local)
        SAGA_LOCAL="$REPO/target/debug/saga-local"
    fi
    setsid "$SAGA_LOCAL" sam-relay --listen "$gw:$SQS_PORT" --to "127.0.0.1:$SQS_PORT" \
        >>"$LOGS/sam-relay.log" 2>&1 </dev/null &
    echo $! >"$PIDS/sam-relay.pid"
    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/$gw/$SQS_PORT") 2>/dev/null; do
        live_pid "$PIDS/sam-relay.pid" sam-relay >/dev/null ||
            die "sam-relay exited; log: $LOGS/sam-relay.log"$'\n'"$(tail -n 5 "$LOGS/sam-relay.log")"
        [ "$SECONDS" -lt "$deadline" ] || die "sam-relay did not listen on $gw:$SQS_PORT"
        sleep 0.2
    done
    log "relaying $gw:$SQS_PORT (Docker bridge) -> 127.0.0.1:$SQS_PORT (moto)"
    STARTED_RELAY=1
}
STARTED_RELAY=0

# --- commands -----------------------------------------------------------------------------------
up() {
    ensure_docker
    ensure_arm64
    ensure_image
    ensure_relay
    # For callers (the tests stop only what they started).
    printf 'DOCKER_HOST=%s\nSTARTED_DOCKERD=%s\nSTARTED_RELAY=%s\n' \
        "${DOCKER_HOST:-}" "$STARTED_DOCKERD" "$STARTED_RELAY"
}

# The sam build output, rebuilt only when a source is newer than it.
ensure_built() {
    local built="$REPO/.aws-sam/build/template.yaml"
    if [ -e "$built" ] && [ -z "$(cd "$REPO" && find template.yaml Cargo.toml Cargo.lock functions \
        -newer "$built" -type f -print -quit)" ]; then
        return
    fi
    log "sam build (the arm64 bootstrap of every function, as it deploys)"
    (cd "$REPO" && sam build)
}

env_files() {
    ensure_built
    saga_local sam-env >&2
}

# What SAM itself needs: credentials and a region for the container (SAM passes its own into
# the function), no retries of STS offline, its state inside the project.
sam_environment() {
    export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1 \
        AWS_DEFAULT_REGION=us-east-1 AWS_MAX_ATTEMPTS=1 AWS_EC2_METADATA_DISABLED=true
    unset AWS_SESSION_TOKEN AWS_PROFILE
}

invoke() {
    [ $# -ge 2 ] || die "usage: $0 invoke FUNCTION EVENT_FILE [sam local invoke options]"
    local fn="$1" event="$2"
    shift 2
    [ -e "$event" ] || [ -e "$REPO/$event" ] || die "$event: no such event file"
    up >/dev/null
    env_files
    sam_environment
    cd "$REPO"
    local cmd=(sam local invoke "$fn" -t .local/sam/template.yaml -e "$event"
        --env-vars .local/sam/env.json --add-host host.docker.internal:host-gateway
        --skip-pull-image "$@")
    log "DOCKER_HOST=${DOCKER_HOST:-} ${cmd[*]}"
    "${cmd[@]}"
}

# Stops what `up` started here (both, or the ones named), by the pids in .local/pids.
down() {
    local name marker pid names=("$@")
    [ ${#names[@]} -gt 0 ] || names=(sam-relay dockerd)
    for name in "${names[@]}"; do
        case "$name" in sam-relay | dockerd) ;; *) die "down: unknown $name" ;; esac
        marker="$name"
        if pid="$(live_pid "$PIDS/$name.pid" "$marker")"; then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + 30))
            while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$PIDS/$name.pid"
    done
}

case "${1:-}" in
    up) up ;;
    env) up >/dev/null && env_files ;;
    invoke)
        shift
        invoke "$@"
        ;;
    down)
        shift
        down "$@"
        ;;
    docker-host)
        ensure_docker >/dev/null 2>&1 || true
        printf '%s\n' "${DOCKER_HOST:-}"
        ;;
    *)
        sed -n '2,12p' "$0" >&2
        exit 2
        ;;
esac
