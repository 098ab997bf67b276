# Shared by Tapir's shell scripts: logging, package installation and the cache directory.
# Source it; it defines functions only.

TAPIR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TAPIR_CACHE=${TAPIR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tapir}

log() { printf '%s: %s\n' "${TAPIR_PROG:-tapir}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ensure_packages PKG...: installs the Debian packages that are missing, with apt-get, without asking.
# TAPIR_NO_INSTALL=1 turns a missing package into an error instead (for machines you do not own).
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "${TAPIR_NO_INSTALL:-0}" = 1 ]; then
        die "missing Debian packages: ${missing[*]} (TAPIR_NO_INSTALL=1 forbids installing them)"
    fi
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]}; run as root or install them with apt-get"
    log "installing ${missing[*]}"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# apt_update_once: `apt-get update` at most once an hour on this machine (apt-cache needs fresh lists too).
apt_update_once() {
    local stamp=/var/lib/apt/periodic/tapir-update-stamp
    if [ -z "$(find "$stamp" -mmin -60 2>/dev/null)" ]; then
        apt-get update -q >&2 || die "apt-get update failed"
        mkdir -p "$(dirname "$stamp")" && touch "$stamp"
    fi
}

# with_lock FILE CMD...: runs CMD holding an exclusive lock on FILE, so that parallel builds share a cache.
with_lock() {
    local file=$1; shift
    mkdir -p "$(dirname "$file")"
    ( flock 9 || exit 1; "$@" ) 9>"$file"
}

# cpu_model: this machine's CPU model name; memory_gib: its memory, as "N.N GiB".
cpu_model() { awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo; }
memory_gib() { awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo; }
