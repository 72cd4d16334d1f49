#!/bin/sh
# Capture the real Style Transfer dialog (GUI GIMP 3 under Xvfb in the test chroot) as docs/gimp-dialog.png.
# usage, as root from the repository root: sh plugins/gimp/tests/screenshot.sh
set -eu
ROOT=${STYLEKIT_GIMP_ROOT:-/var/cache/stylekit/gimp3-root}
WORK=/tmp/stylekit-screenshot  # inside the chroot
PORT=${PORT:-8766}
DISPLAY_NUMBER=:97
STYLEKIT_GIMP_EXTRA="x11-utils x11-apps netpbm" sh plugins/gimp/tests/make-chroot.sh "$ROOT"
rm -rf "$ROOT$WORK"
mkdir -p "$ROOT$WORK/home" "$ROOT$WORK/profile"
SERVER= XVFB= GIMP=
trap 'kill $GIMP $XVFB $SERVER 2>/dev/null || true' EXIT
XDG_CONFIG_HOME="$ROOT$WORK/config" STYLEKIT_CACHE_DIR="$ROOT$WORK/cache" \
    .venv/bin/stylekit serve --port "$PORT" --weights random >"$ROOT$WORK/serve.log" 2>&1 &
SERVER=$!
.venv/bin/stylekit gimp install --gimp-dir "$ROOT$WORK/profile" --url "http://127.0.0.1:$PORT" >/dev/null
cat >"$ROOT$WORK/open-dialog.py" <<'PY'
import gi
gi.require_version("Gimp", "3.0")
from gi.repository import Gimp
image = Gimp.Image.new(320, 240, Gimp.ImageBaseType.RGB)
layer = Gimp.Layer.new(image, "Photo", 320, 240, Gimp.ImageType.RGB_IMAGE, 100, Gimp.LayerMode.NORMAL)
image.insert_layer(layer, None, 0)
Gimp.Display.new(image)
procedure = Gimp.get_pdb().lookup_procedure("plug-in-stylekit-style-transfer")
config = procedure.create_config()
config.set_property("run-mode", Gimp.RunMode.INTERACTIVE)
config.set_property("image", image)
config.set_core_object_array("drawables", [layer])
procedure.run(config)
PY
chroot "$ROOT" Xvfb "$DISPLAY_NUMBER" -screen 0 1280x900x24 -nolisten tcp >/dev/null 2>&1 &
XVFB=$!
chroot "$ROOT" env -i PATH=/usr/bin:/bin HOME="$WORK/home" GIMP3_DIRECTORY="$WORK/profile" \
    DISPLAY="$DISPLAY_NUMBER" gimp-3.0 --no-splash --batch-interpreter=python-fu-eval \
    -b "exec(open('$WORK/open-dialog.py').read())" >"$ROOT$WORK/gimp.log" 2>&1 &
GIMP=$!
waited=0
until chroot "$ROOT" env DISPLAY="$DISPLAY_NUMBER" xwininfo -name "Style Transfer" >/dev/null 2>&1; do
    waited=$((waited + 1))
    [ "$waited" -lt 180 ] || { echo "screenshot.sh: no dialog after 180 s (see $ROOT$WORK)" >&2; exit 1; }
    sleep 1
done
sleep 2  # let it finish drawing
chroot "$ROOT" sh -c "DISPLAY=$DISPLAY_NUMBER xwd -name 'Style Transfer' -silent | xwdtopnm 2>/dev/null | pnmtopng" \
    >docs/gimp-dialog.png
echo "wrote docs/gimp-dialog.png"
