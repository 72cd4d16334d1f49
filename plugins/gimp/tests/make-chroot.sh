#!/bin/sh
# Build (once) a Debian trixie chroot holding GIMP 3 and its Python plug-in support, for the GIMP tests.
#
# usage: make-chroot.sh [ROOT]   (default: $STYLEKIT_GIMP_ROOT or /var/cache/stylekit/gimp3-root)
# Needs root and Debian's package archive. A root in which GIMP 3 and its Python bindings already run
# is reused; a missing or broken one is built afresh beside it and moved into place only when whole.
# Xvfb and xdotool drive the plug-in's dialog; STYLEKIT_GIMP_EXTRA="x11-apps netpbm" adds packages
# (the screenshot script uses those).
set -eu
ROOT=${1:-${STYLEKIT_GIMP_ROOT:-/var/cache/stylekit/gimp3-root}}

# the Debian mirror this machine's apt already uses (MIRROR=URL overrides)
host_mirror() {
    { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's|^URIs: *\([^ ]*/debian\)/*$|\1|p'
      sed -n 's|^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*/debian\)/* .*|\2|p' /etc/apt/sources.list 2>/dev/null
    } | head -n 1
}
MIRROR=${MIRROR:-$(host_mirror)}
PACKAGES="gimp python3-gi gir1.2-gimp-3.0 xvfb xdotool ${STYLEKIT_GIMP_EXTRA:-}"
PYCHECK="import gi; gi.require_version('Gimp', '3.0'); gi.require_version('GimpUi', '3.0')"

works() {
    [ -x "$1/usr/bin/gimp-console-3.0" ] &&
        chroot "$1" gimp-console-3.0 --version >/dev/null 2>&1 &&
        chroot "$1" python3 -c "$PYCHECK" >/dev/null 2>&1
}

# run a step quietly, showing its log only when it fails
step() {
    log=$1; shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "make-chroot.sh: '$*' failed (log: $log)" >&2
        exit 1
    fi
}

install_packages() {
    step "$1/var/log/stylekit-apt.log" chroot "$1" apt-get update
    step "$1/var/log/stylekit-apt.log" chroot "$1" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends $PACKAGES
    chroot "$1" apt-get clean
}

if [ "$(id -u)" != 0 ]; then
    echo "make-chroot.sh: needs root (debootstrap and chroot)" >&2
    exit 1
fi
if works "$ROOT"; then
    chroot "$ROOT" dpkg-query -W $PACKAGES >/dev/null 2>&1 || install_packages "$ROOT"
    echo "GIMP 3 chroot ready: $ROOT ($(chroot "$ROOT" gimp-console-3.0 --version))"
    exit 0
fi
[ -n "$MIRROR" ] || { echo "make-chroot.sh: no Debian mirror in this machine's apt sources; set MIRROR=URL" >&2; exit 1; }
command -v debootstrap >/dev/null || step /tmp/stylekit-debootstrap-apt.log \
    sh -c "apt-get update && apt-get install -y debootstrap"
BUILD="$ROOT.building"
rm -rf "$BUILD"
mkdir -p "$BUILD"
echo "building the GIMP 3 chroot in $ROOT (Debian trixie; a few minutes, about 950 MB)"
step "$BUILD.debootstrap.log" debootstrap --variant=minbase trixie "$BUILD" "$MIRROR"
rm -f "$BUILD.debootstrap.log"
install_packages "$BUILD"
works "$BUILD" || { echo "make-chroot.sh: GIMP 3 does not run in $BUILD" >&2; exit 1; }
rm -rf "$ROOT"
mv "$BUILD" "$ROOT"
echo "GIMP 3 chroot ready: $ROOT ($(chroot "$ROOT" gimp-console-3.0 --version))"
