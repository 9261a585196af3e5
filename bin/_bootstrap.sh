# Sourced by the bin/ entry points: make sure FUSE and the project venv exist,
# then export ROOT and PY. Idempotent and quiet once everything is in place.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

_replfs_apt() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "replfs: installing fuse3 libfuse3-dev pkg-config (once)" >&2
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fuse3 libfuse3-dev pkg-config >/dev/null
}

if ! command -v fusermount3 >/dev/null 2>&1 || ! pkg-config --exists fuse3 2>/dev/null; then
    _replfs_apt || { echo "replfs: could not install fuse3; install fuse3 libfuse3-dev pkg-config and retry" >&2; exit 1; }
fi

_replfs_stamp="$(sha1sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$PY" ] || [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$_replfs_stamp" ]; then
    echo "replfs: preparing $VENV (once)" >&2
    python3 -m venv "$VENV" >/dev/null &&
        "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" >/dev/null 2>"$VENV/.install.log" ||
        { echo "replfs: installing the project failed; see $VENV/.install.log" >&2; exit 1; }
    echo "$_replfs_stamp" > "$VENV/.stamp"
fi
export ROOT PY
