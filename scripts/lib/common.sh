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

# debian_kernel FLAVOUR: unpacks Debian's current kernel of FLAVOUR (amd64, cloud-amd64, rt-amd64:
# the package linux-image-FLAVOUR depends on) into $TAPIR_CACHE/debian/<package> once, never
# installing it, runs depmod there, and prints that directory. Dies with the package's name and apt's
# words when it cannot be resolved or downloaded.
debian_kernel() {
    local flavour=$1 meta=linux-image-$1 root=$TAPIR_CACHE/debian
    mkdir -p "$root"
    with_lock "$root/fetch.lock" _debian_kernel_fetch "$flavour" "$meta" "$root" >&2 || exit 1
    cat "$root/current-$flavour"
}
_debian_kernel_package() { # META FLAVOUR: the package META depends on now; empty when apt's lists lack it
    apt-cache depends "$1" 2>/dev/null | sed -n "s/^ *Depends: \(linux-image-[^ ]*-$2\)\$/\1/p" | head -n1
}
_debian_kernel_fetch() {
    local flavour=$1 meta=$2 root=$3 pkg dir dl why
    pkg=$(_debian_kernel_package "$meta" "$flavour")
    if [ -z "$pkg" ]; then
        apt_update_once
        pkg=$(_debian_kernel_package "$meta" "$flavour")
    fi
    if [ -z "$pkg" ]; then
        why=$(apt-cache show "$meta" 2>&1 >/dev/null | head -n 3 | tr '\n' ' ')
        die "apt-cache cannot resolve $meta to a kernel package: ${why:-it names no linux-image-*-$flavour}"
    fi
    dir=$root/$pkg
    if [ ! -f "$dir/.tapir-unpacked" ]; then
        log "fetching $pkg (once; cached in $dir)"
        dl=$(mktemp -d)
        chmod 0755 "$dl"
        if ! (cd "$dl" && apt-get download -q "$pkg" >&2 2>"$dl/err"); then
            apt_update_once
            if ! (cd "$dl" && apt-get download -q "$pkg" >&2 2>"$dl/err"); then
                why=$(grep -v '^$' "$dl/err" | tail -n 3 | tr '\n' ' ')
                rm -rf "$dl"
                die "apt-get download $pkg failed: $why"
            fi
        fi
        rm -rf "$dir" && mkdir -p "$dir"
        dpkg-deb -x "$dl"/*.deb "$dir" || { rm -rf "$dl"; die "unpacking $pkg failed"; }
        rm -rf "$dl"
        depmod -b "$dir" "$(ls "$dir/lib/modules")" || die "depmod on $dir failed"
        touch "$dir/.tapir-unpacked"
    fi
    echo "$dir" >"$root/current-$flavour"
}
