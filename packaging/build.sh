#!/usr/bin/env bash
# Build dist/gridx: gridx.py and bundle_templates/ frozen into one file by
# PyInstaller, made fully static (no libc needed) by staticx, and
# dist/gridx.sha256 beside it. `make binary` runs this.
#
#   packaging/build.sh           build dist/gridx and dist/gridx.sha256
#   packaging/build.sh --twice   build, build again from scratch, and fail
#                                unless both gave the same bytes
#
# What it installs when missing (Debian/Ubuntu, apt-get, needs root):
#   patchelf, binutils (objcopy, strip), file, patch, python3-venv,
#   libpython3.X (the shared libpython PyInstaller bundles), musl-tools (the
#   static bootloader is built with musl-gcc), gcc.
# Then a virtual environment .venv-build/ made from Debian's /usr/bin/python3
# with the pinned tools of packaging/requirements-build.txt.
#
# Steps: staticx's bootloader is built from its pinned source with
# packaging/staticx-bootloader.patch (clear messages for a missing /proc and a
# noexec /tmp, and a fallback folder); PyInstaller builds a onefile program
# from packaging/gridx.spec; packaging/staticx_build.py makes it static.
#
# Same bytes from the same commit: PYTHONHASHSEED=0, SOURCE_DATE_EPOCH (the
# commit time of HEAD unless already set), fixed work and output folders
# (build/, dist/), the work folders emptied first, and the mtimes and owners
# in staticx's archive pinned.
#
# Environment:
#   BUILD_PYTHON       interpreter for .venv-build/ (default /usr/bin/python3;
#                      pyenv's does not work, see staticx issue #188)
#   SOURCE_DATE_EPOCH  timestamp written into the binary (default: HEAD's)
#   STATICX_COMPRESS=1 xz-compress the static archive: 6 MB smaller, but every
#                      start decompresses it (about 5x slower start-up)
#
# Exit status: 0 built, 1 the build failed (or --twice gave different bytes),
# 2 bad usage, 3 a prerequisite is missing and cannot be installed here.
set -euo pipefail
export LC_ALL=C TZ=UTC
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PACKAGING="$ROOT/packaging"
VENV="$ROOT/.venv-build"
BUILD="$ROOT/build"
DIST="$ROOT/dist"
BUILD_PYTHON=${BUILD_PYTHON:-/usr/bin/python3}
STATICX_VERSION=0.14.2
STATICX_SDIST_SHA256=bf7d5d35d5777a72b2d4c408eb25f9c61049b28b94a388a012122dba00fffa93

info() { printf 'info: %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
fatal() {
	local code=$1
	shift
	printf 'error: %s\n' "$*" >&2
	exit "$code"
}
# cmd ARGV...: echo a command, as wg-quick does, then run it.
cmd() {
	printf '[#] %s\n' "$*" >&2
	"$@"
}

# --- prerequisites ----------------------------------------------------------

APT_UPDATED=0
apt_install() {
	command -v apt-get >/dev/null 2>&1 \
		|| fatal 3 "missing: $*; install them with your package manager and run this again"
	[ "$(id -u)" -eq 0 ] || fatal 3 "missing: $*; run: sudo apt-get install $*"
	if [ "$APT_UPDATED" -eq 0 ]; then
		cmd apt-get update -qq >/dev/null
		APT_UPDATED=1
	fi
	DEBIAN_FRONTEND=noninteractive cmd apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

python_version() {
	"$BUILD_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

install_system_deps() {
	local missing=()
	command -v patchelf >/dev/null 2>&1 || missing+=(patchelf)
	{ command -v objcopy && command -v strip; } >/dev/null 2>&1 || missing+=(binutils)
	command -v file >/dev/null 2>&1 || missing+=(file)
	command -v patch >/dev/null 2>&1 || missing+=(patch)
	command -v musl-gcc >/dev/null 2>&1 || missing+=(musl-tools)
	command -v gcc >/dev/null 2>&1 || missing+=(gcc)
	if [ ! -x "$BUILD_PYTHON" ]; then
		[ "$BUILD_PYTHON" = /usr/bin/python3 ] || fatal 3 "BUILD_PYTHON=$BUILD_PYTHON is not an executable"
		missing+=(python3)
	fi
	if [ "${#missing[@]}" -gt 0 ]; then
		apt_install "${missing[@]}"
		missing=()
	fi
	local version
	version=$(python_version)
	"$BUILD_PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
	/sbin/ldconfig -p | grep -qF "libpython$version.so.1.0" || missing+=("libpython$version")
	if [ "${#missing[@]}" -gt 0 ]; then
		apt_install "${missing[@]}"
	fi
}

# The venv is remade when BUILD_PYTHON changed, and the pinned tools are
# installed again when packaging/requirements-build.txt changed.
make_venv() {
	local requirements="$PACKAGING/requirements-build.txt" stamp="$VENV/.gridx-requirements"
	local want
	want="$(readlink -f "$BUILD_PYTHON") $(sha256sum <"$requirements" | cut -d' ' -f1)"
	if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
		return 0
	fi
	if [ ! -x "$VENV/bin/python" ] \
		|| [ "$(readlink -f "$VENV/bin/python")" != "$(readlink -f "$BUILD_PYTHON")" ]; then
		rm -rf "$VENV"
		cmd "$BUILD_PYTHON" -m venv "$VENV"
	fi
	cmd "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
	printf '%s\n' "$want" >"$stamp"
}

source_date_epoch() {
	if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
		printf '%s\n' "$SOURCE_DATE_EPOCH"
	elif git -C "$ROOT" log -1 --format=%ct 2>/dev/null; then
		:
	else
		warn "no commit to take SOURCE_DATE_EPOCH from: using 315532800 (1980-01-01)"
		printf '315532800\n'
	fi
}

# --- build steps ------------------------------------------------------------

# staticx's bootloader, built from its pinned source with our patch. The
# source is downloaded once into build/ and checked against its sha256.
build_bootloader() {
	local sdist="$BUILD/downloads/staticx-$STATICX_VERSION.tar.gz"
	local src="$BUILD/staticx-$STATICX_VERSION"
	if [ ! -f "$sdist" ] || ! sha256sum <"$sdist" | grep -q "^$STATICX_SDIST_SHA256 "; then
		rm -f "$sdist"
		cmd "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
			--no-binary :all: -d "$BUILD/downloads" "staticx==$STATICX_VERSION"
	fi
	sha256sum <"$sdist" | grep -q "^$STATICX_SDIST_SHA256 " \
		|| fatal 1 "$sdist does not have the pinned sha256 $STATICX_SDIST_SHA256"
	rm -rf "$src"
	tar -C "$BUILD" --no-same-owner -xzf "$sdist"
	(cd "$src" && cmd patch -s -p1 <"$PACKAGING/staticx-bootloader.patch")
	(cd "$src" && PATH="$VENV/bin:$PATH" cmd scons -Q -s BOOTLOADER_CC=musl-gcc \
		"STATICX_VERSION=$STATICX_VERSION" staticx/assets/release/bootloader)
	BOOTLOADER="$src/staticx/assets/release/bootloader"
}

build_onefile() {
	rm -rf "$BUILD/pyinstaller"
	cmd "$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
		--workpath "$BUILD/pyinstaller/work" --distpath "$BUILD/pyinstaller/dist" \
		"$PACKAGING/gridx.spec"
}

build_static() {
	local compress=()
	[ "${STATICX_COMPRESS:-0}" = 1 ] && compress=(--compress)
	rm -rf "$BUILD/staticx"
	mkdir -p "$BUILD/staticx" "$DIST"
	cmd "$VENV/bin/python" "$PACKAGING/staticx_build.py" --bootloader "$BOOTLOADER" "${compress[@]}" \
		"$BUILD/pyinstaller/dist/gridx" "$BUILD/staticx/gridx"
	mv -f "$BUILD/staticx/gridx" "$DIST/gridx"
	(cd "$DIST" && sha256sum gridx >gridx.sha256)
}

verify_binary() {
	file -b "$DIST/gridx" | grep -q 'statically linked' \
		|| fatal 1 "dist/gridx is not statically linked: $(file -b "$DIST/gridx")"
	local version
	version=$("$DIST/gridx" --version) || fatal 1 "dist/gridx --version failed"
	info "dist/gridx --version: $version"
}

build_once() {
	# Only what the build needs from the environment: a LD_LIBRARY_PATH or
	# PYTHONPATH of the caller's would change what ldd and PyInstaller find.
	unset LD_LIBRARY_PATH PYTHONPATH PYTHONHOME PYTHONSTARTUP
	export PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1
	SOURCE_DATE_EPOCH=$(source_date_epoch)
	export SOURCE_DATE_EPOCH
	info "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"
	mkdir -p "$BUILD"
	build_bootloader
	build_onefile
	build_static
	verify_binary
}

# --- main -------------------------------------------------------------------

TWICE=0
case "${1:-}" in
"") ;;
--twice) TWICE=1 ;;
-h | --help)
	sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
	exit 0
	;;
*) fatal 2 "unknown argument: $1 (usage: packaging/build.sh [--twice])" ;;
esac

started=$(date +%s)
cd "$ROOT"
[ -f "$ROOT/gridx.py" ] || fatal 3 "gridx.py not found in $ROOT"
install_system_deps
make_venv
build_once
if [ "$TWICE" -eq 1 ]; then
	first=$(cut -d' ' -f1 "$DIST/gridx.sha256")
	info "first build: $first; building again from scratch"
	build_once
	second=$(cut -d' ' -f1 "$DIST/gridx.sha256")
	[ "$first" = "$second" ] || fatal 1 "two builds differ: $first then $second"
	info "both builds gave the same bytes"
fi

size=$(stat -c %s "$DIST/gridx")
printf '\nBuilt dist/gridx (%s bytes, %s.%s MB) in %ss\n' "$size" "$((size / 1000000))" "$((size / 100000 % 10))" \
	"$(($(date +%s) - started))"
cat "$DIST/gridx.sha256"
printf 'Next: python3 -m pytest -q tests/test_binary.py   (or copy dist/gridx and dist/gridx.sha256 to a release)\n'
