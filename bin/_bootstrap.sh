# Sourced by the bin/ entry points: make sure FUSE and the project venv exist,
# then export ROOT and PY. Idempotent and quiet once everything is in place.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# pyfuse3 is built from its sdist with bin/pyfuse3-threads.patch applied
# (pyfuse3.main_threads; fallocate, copy_file_range and lseek handlers),
# re-cythonized with a pinned Cython.
_REPLFS_PYFUSE3="pyfuse3==3.5.0 --hash=sha256:88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"
_REPLFS_PYFUSE3_BUILD="Cython==3.2.4 setuptools==80.9.0 setuptools_scm==8.3.1"
_REPLFS_PATCH="$ROOT/bin/pyfuse3-threads.patch"

# ... and linked to libfuse 3.17 or newer, with which the daemon clears set-ID bits
# itself (FUSE_CAP_HANDLE_KILLPRIV_V2), so that the kernel stops asking for
# security.capability before each write(2). Where the system's libfuse is older
# (Debian 12 has 3.14), Debian's source of 3.17.2 is built into the venv.
_REPLFS_LIBFUSE_URL="http://deb.debian.org/debian/pool/main/f/fuse3/fuse3_3.17.2.orig.tar.gz"
_REPLFS_LIBFUSE_SHA256="3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f"
_REPLFS_LIBFUSE_BUILD="meson==1.12.1 ninja==1.13.2"

_replfs_apt() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "replfs: installing $* (once)" >&2
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

if ! command -v fusermount3 >/dev/null 2>&1 || ! pkg-config --exists fuse3 2>/dev/null; then
    _replfs_apt fuse3 libfuse3-dev pkg-config ||
        { echo "replfs: could not install fuse3; install fuse3 libfuse3-dev pkg-config and retry" >&2; exit 1; }
fi

# iSCSI checked against implementations replfs did not write: libiscsi's tools probe
# the target, tgtd is a target for the initiator, tshark decodes captures of both.
if ! command -v iscsi-inq >/dev/null 2>&1 || ! command -v tgtd >/dev/null 2>&1 ||
        ! command -v tshark >/dev/null 2>&1; then
    _replfs_apt libiscsi-bin tgt tshark ||
        echo "replfs: could not install libiscsi-bin tgt tshark; the iSCSI interop tests skip" >&2
fi

# etcd, which a cluster of nodes elects its primary through (replfs node): the tests and
# the demo start their own.
if ! command -v etcd >/dev/null 2>&1; then
    _replfs_apt etcd-server ||
        { echo "replfs: could not install etcd-server; install it and retry" >&2; exit 1; }
fi

# What building pyfuse3 needs beyond libfuse: a C compiler, Python's headers, git apply.
_replfs_build_tools() {
    local need=() include
    command -v cc >/dev/null 2>&1 || need+=(gcc)
    command -v git >/dev/null 2>&1 || need+=(git)
    include="$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))')"
    [ -f "$include/Python.h" ] || need+=(python3-dev)
    [ ${#need[@]} = 0 ] || _replfs_apt "${need[@]}" ||
        { echo "replfs: could not install ${need[*]}; install them and retry" >&2; return 1; }
}

# Steps of the install, with their output in $VENV/.install.log; on failure,
# _replfs_step says which one failed.
_replfs_install() {
    local pip=("$PY" -m pip --disable-pip-version-check --no-input) tmp src link=()
    _replfs_step="creating the venv"
    python3 -m venv "$VENV" || return 1
    _replfs_step="installing the tools that build pyfuse3"
    "${pip[@]}" install $_REPLFS_PYFUSE3_BUILD || return 1
    if ! pkg-config --atleast-version=3.17 fuse3; then
        _replfs_step="building libfuse 3.17.2 (from $_REPLFS_LIBFUSE_URL)"
        _replfs_libfuse || return 1
        link=(PKG_CONFIG_PATH="$VENV/libfuse/lib/pkgconfig" LDFLAGS="-Wl,-rpath,$VENV/libfuse/lib")
    fi
    _replfs_step="building pyfuse3 with bin/pyfuse3-threads.patch"
    tmp="$(mktemp -d)" || return 1
    {
        echo "$_REPLFS_PYFUSE3" > "$tmp/requirements.txt" &&
            "${pip[@]}" download --no-deps --no-binary :all: --no-build-isolation \
                --require-hashes -r "$tmp/requirements.txt" -d "$tmp" &&
            tar -xzf "$tmp"/pyfuse3-*.tar.gz -C "$tmp" &&
            src="$(echo "$tmp"/pyfuse3-*/)" &&
            (cd "$src" && git apply "$_REPLFS_PATCH") &&
            rm -f "$src/src/pyfuse3/__init__.c" && # generated from the unpatched source
            env "${link[@]}" "${pip[@]}" install --no-build-isolation --no-deps --force-reinstall \
                --no-cache-dir "$src"
    }
    local status=$?
    rm -rf "$tmp"
    [ $status = 0 ] || return 1
    _replfs_step="installing the project"
    "${pip[@]}" install -e "$ROOT[test]"
}

# libfuse from Debian's source into $VENV/libfuse, for pyfuse3 to build against and load.
_replfs_libfuse() {
    local tmp
    tmp="$(mktemp -d)" || return 1
    {
        "$PY" -m pip --disable-pip-version-check --no-input install $_REPLFS_LIBFUSE_BUILD &&
            "$PY" -c 'import sys, urllib.request; urllib.request.urlretrieve(*sys.argv[1:])' \
                "$_REPLFS_LIBFUSE_URL" "$tmp/fuse3.tar.gz" &&
            echo "$_REPLFS_LIBFUSE_SHA256  $tmp/fuse3.tar.gz" | sha256sum -c - &&
            tar -xzf "$tmp/fuse3.tar.gz" -C "$tmp" &&
            (cd "$tmp"/fuse-*/ && PATH="$VENV/bin:$PATH" &&
                meson setup build --prefix="$VENV/libfuse" --libdir=lib --buildtype=release \
                    -Dutils=false -Dexamples=false -Dtests=false &&
                ninja -C build install)
    }
    local status=$?
    rm -rf "$tmp"
    return $status
}

_replfs_stamp="$({ cat "$ROOT/pyproject.toml" "$_REPLFS_PATCH"
                   echo "$_REPLFS_PYFUSE3 $_REPLFS_PYFUSE3_BUILD"
                   echo "$_REPLFS_LIBFUSE_URL $_REPLFS_LIBFUSE_BUILD"; } | sha1sum | cut -d' ' -f1)"
if [ ! -x "$PY" ] || [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$_replfs_stamp" ]; then
    echo "replfs: preparing $VENV with pyfuse3 patched for threads (once)" >&2
    _replfs_build_tools || exit 1
    mkdir -p "$VENV"
    _replfs_install >"$VENV/.install.log" 2>&1 ||
        { echo "replfs: $_replfs_step failed; see $VENV/.install.log" >&2; exit 1; }
    echo "$_replfs_stamp" > "$VENV/.stamp"
fi
export ROOT PY
