#!/bin/sh
# vgw offline installer: run from the unpacked bundle (tar xzf vgw-bundle-<version>-<arch>.tar.gz).
#
#   sudo ./install.sh                 install on this device: /opt/vgw/venv, units, udev rule, user vgw
#   ./install.sh --root DIR           stage the same tree under DIR (an image being built; no systemctl)
#
# Needs no network: pip runs with --no-index on the wheels shipped in wheels/ (checked against BUNDLE.txt).
# Needs python3 (3.11 on Raspberry Pi OS Bookworm); not python3-venv or pip: the venv is made --without-pip
# and the bundled pip wheel installs into it. The interpreter must be one the agent's user (vgw, no rights)
# can run: without --python, the first of `python3` on PATH, /usr/bin/python3 and /usr/local/bin/python3 that
# fits the bundle and runs unprivileged is taken (not a pyenv under /root, mode 0700); --python EXE is checked. Paths written under DIR are the device's own (/opt/vgw/...),
# so a staged tree can be copied onto a car as it is. Re-running replaces the venv (stop the agent first:
# systemctl stop vgw-agent). See docs/install-raspberry-pi.md, "Offline install".
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=/
PYTHON=
NOBODY=65534  # an account with no rights, like the agent's: what it can run, the agent can run
SYSTEMCTL=--systemctl

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a folder"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#--root=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#--python=}; shift ;;
        --no-systemctl) SYSTEMCTL=--no-systemctl; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (try --help)" ;;
    esac
done

[ -f "$HERE/BUNDLE.txt" ] || die "$HERE/BUNDLE.txt missing: run install.sh from the unpacked bundle"
ARCH=$(sed -n 's/^arch //p' "$HERE/BUNDLE.txt")
PYVER=$(sed -n 's/^python //p' "$HERE/BUNDLE.txt")

# The wheels are built for one CPU and one Python: say so plainly instead of a pip resolver error.
fits() {
    HAVE=$("$1" -c 'import sys, sysconfig; print(sysconfig.get_platform(), "%d.%d" % sys.version_info[:2])' \
        2>/dev/null) && [ "$HAVE" = "linux-$ARCH $PYVER" ]
}
# The venv's python is a link to this interpreter: the agent (User=vgw) runs it with no rights. Checked by
# running it as NOBODY (from a shell that already is NOBODY: the exec itself is what is checked).
runs_unprivileged() {
    [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null 2>&1 || return 0  # not root: it runs as us
    setpriv --reuid=$NOBODY --regid=$NOBODY --clear-groups /bin/sh -c 'exec "$0" -c "import encodings"' "$1" \
        >/dev/null 2>&1
}
unprivileged_hint() {
    echo "$1 ($(readlink -f "$1")) cannot be run by an unprivileged user, so neither by the agent's" \
        "user vgw (is it in a folder only root may enter, such as a pyenv under /root?); pass --python with" \
        "a system interpreter, e.g. --python /usr/bin/python3"
}
if [ -n "$PYTHON" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (install python3 $PYVER)"
    PYTHON=$(command -v "$PYTHON")  # the file the venv will link to, not whatever a PATH search finds later
    fits "$PYTHON" || die "this bundle is for linux-$ARCH with Python $PYVER; $PYTHON is ${HAVE:-not runnable}"
    runs_unprivileged "$PYTHON" || die "$(unprivileged_hint "$PYTHON")"
else
    FIRST=
    for candidate in python3 /usr/bin/python3 /usr/local/bin/python3; do
        candidate=$(command -v "$candidate") || continue
        [ -n "$FIRST" ] || FIRST=$candidate
        fits "$candidate" || continue
        if runs_unprivileged "$candidate"; then PYTHON=$candidate; break; fi
        UNRUNNABLE=$candidate
    done
    if [ -z "$PYTHON" ]; then
        [ -n "${UNRUNNABLE:-}" ] && die "$(unprivileged_hint "$UNRUNNABLE")"
        [ -n "$FIRST" ] || die "python3 not found (install python3 $PYVER)"
        fits "$FIRST" || true
        die "this bundle is for linux-$ARCH with Python $PYVER; $FIRST is ${HAVE:-not runnable}"
    fi
fi

# Integrity: every wheel is the one the bundle was built with (a truncated copy fails here, not in pip).
(cd "$HERE/wheels" && sed -n 's/^sha256 \([0-9a-f]*\) \(.*\)$/\1  \2/p' ../BUNDLE.txt | sha256sum --quiet -c -) \
    || die "wheels do not match BUNDLE.txt (damaged copy?)"

mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
[ "$ROOT" = / ] && PREFIX="" || PREFIX=$ROOT
VENV=$PREFIX/opt/vgw/venv
PIP_WHEEL=$(ls "$HERE"/wheels/pip-*.whl | head -n 1)

echo "$PYTHON -m venv --without-pip --clear /opt/vgw/venv${PREFIX:+ (under $ROOT)}"
mkdir -p "$PREFIX/opt/vgw"
"$PYTHON" -m venv --without-pip --clear "$VENV"

echo "pip install --no-index --find-links wheels/ vgw (offline)"
# No pip config of this machine applies (an index or a wheel folder there must not change what installs).
env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$VENV/bin/python" "$PIP_WHEEL/pip" install --quiet --no-index --find-links "$HERE/wheels" --no-compile \
    pip vgw

if [ -n "$PREFIX" ]; then
    # A staged tree: the venv's scripts and pyvenv.cfg name the staging folder; give them the device's path.
    for f in "$VENV"/bin/* "$VENV/pyvenv.cfg"; do
        if [ -f "$f" ] && [ ! -L "$f" ] && grep -q "$PREFIX/opt/vgw" "$f"; then
            sed -i "s|$PREFIX/opt/vgw|/opt/vgw|g" "$f"
        fi
    done
    # Byte code records the path of its source: the device's, not the staging folder's.
    "$VENV/bin/python" -m compileall -q -s "$PREFIX" -p / "$VENV/lib"
else
    "$VENV/bin/python" -m compileall -q "$VENV/lib"
fi

# Units, network file, udev rule, DBC, guide, /etc/vgw, user and systemctl: the same code as `vgw install`.
"$VENV/bin/python" "$VENV/bin/vgw" install --no-venv --source "$HERE" --prefix "$ROOT" \
    $( [ "$SYSTEMCTL" = --no-systemctl ] && echo --no-systemctl )

echo "Installed vgw $(sed -n 's/^vgw //p' "$HERE/BUNDLE.txt") for $ARCH into $PREFIX/opt/vgw."
echo "Next: sudo vgw provision --help   (then vgw doctor; /usr/local/bin/vgw links to /opt/vgw/venv/bin/vgw)"
