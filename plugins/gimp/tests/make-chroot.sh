#!/bin/sh
# Build (once) a Debian trixie chroot holding GIMP 3 and its Python plug-in support, for the GIMP tests.
#
# usage: make-chroot.sh [ROOT]   (default: $STYLEKIT_GIMP_ROOT or /var/cache/stylekit/gimp3-root)
# Needs root and Debian's package archive. A root that already runs gimp-console-3.0 is reused; a
# missing or broken one is built afresh in a temporary folder and moved into place only when whole.
# STYLEKIT_GIMP_EXTRA="xvfb x11-apps" adds packages (used for the dialog screenshot).
set -eu
ROOT=${1:-${STYLEKIT_GIMP_ROOT:-/var/cache/stylekit/gimp3-root}}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES="gimp python3-gi gir1.2-gimp-3.0 ${STYLEKIT_GIMP_EXTRA:-}"

works() { [ -x "$1/usr/bin/gimp-console-3.0" ] && chroot "$1" gimp-console-3.0 --version >/dev/null 2>&1; }

install_packages() {
    chroot "$1" apt-get update -qq
    chroot "$1" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
    chroot "$1" apt-get clean
}

if [ "$(id -u)" != 0 ]; then
    echo "make-chroot.sh: needs root (debootstrap and chroot)" >&2
    exit 1
fi
if works "$ROOT"; then
    if [ -n "${STYLEKIT_GIMP_EXTRA:-}" ]; then install_packages "$ROOT"; fi
    echo "GIMP 3 chroot ready: $ROOT ($(chroot "$ROOT" gimp-console-3.0 --version))"
    exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
BUILD="$ROOT.building"
rm -rf "$BUILD"
mkdir -p "$(dirname "$ROOT")"
echo "building the GIMP 3 chroot in $ROOT (Debian trixie, a few minutes, about 750 MB)"
debootstrap --variant=minbase trixie "$BUILD" "$MIRROR" >/dev/null
install_packages "$BUILD"
works "$BUILD" || { echo "make-chroot.sh: gimp-console-3.0 does not run in $BUILD" >&2; exit 1; }
rm -rf "$ROOT"
mv "$BUILD" "$ROOT"
echo "GIMP 3 chroot ready: $ROOT ($(chroot "$ROOT" gimp-console-3.0 --version))"
