# shellcheck shell=bash
# Shared virtualenv bootstrap, sourced by scripts/start and scripts/test:
#
#     source scripts/_venv.sh requirements-dev.txt
#
# Creates .venv with a Python >= 3.11 when it is missing (or broken), installs the given
# requirements file only when it (or a file it includes with -r) changed since the last
# install, then activates the venv. The hash of every installed requirements file is kept in
# .venv/.req-hash, one "<file> <sha256>" line each, so that scripts/start (requirements.txt)
# and scripts/test (requirements-dev.txt) do not undo each other's work.
#
# Quiet when nothing needs doing; pip's errors are shown. Returns non-zero on failure.
# Override the interpreter with NTONIX_PYTHON=/path/to/python3.x.

_ntonix_venv_main() {
    local req="${1:-requirements.txt}"
    local root venv py
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    case "$req" in /*) ;; *) req="$root/$req" ;; esac
    if [ ! -f "$req" ]; then
        echo "error: requirements file not found: $req" >&2
        return 1
    fi

    if ! _ntonix_python_ok "$venv/bin/python"; then
        py="$(_ntonix_find_python)" || {
            echo "error: NTONIX needs Python >= 3.11 (tried: ${NTONIX_PYTHON:-} python3 python3.13 python3.12 python3.11)." >&2
            echo "       Install one (Debian 12: apt-get install python3 python3-venv) or set NTONIX_PYTHON." >&2
            return 1
        }
        _ntonix_make_venv "$py" "$venv" || return 1
    fi

    local hash_file="$venv/.req-hash" key want
    key="${req#"$root"/}"
    want="$(_ntonix_req_hash "$venv/bin/python" "$req")" || return 1
    if ! grep -qxF "$key $want" "$hash_file" 2>/dev/null; then
        echo "==> installing $key into .venv"
        local log="$venv/.pip-install.log" rc=0
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            --requirement "$req" >"$log" 2>&1 || rc=$?
        # Show pip's messages except the machine's pip.conf naming index folders that do not exist.
        grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$" "$log" || true
        if [ "$rc" != 0 ]; then
            echo "error: pip install -r $key failed (exit $rc)" >&2
            return 1
        fi
        # Keep the other files' lines, replace this one.
        { grep -v "^$key " "$hash_file" 2>/dev/null || true; echo "$key $want"; } > "$hash_file.tmp"
        mv -f "$hash_file.tmp" "$hash_file"
    fi

    # activate reads variables that may be unset; tolerate callers running with set -u.
    local had_u=0
    case $- in *u*) had_u=1; set +u ;; esac
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    [ "$had_u" = 1 ] && set -u
    return 0
}

# True when $1 runs and is Python >= 3.11.
_ntonix_python_ok() {
    [ -x "$1" ] && "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

_ntonix_find_python() {
    local cand path
    for cand in ${NTONIX_PYTHON:-} python3 python3.13 python3.12 python3.11; do
        path="$(command -v "$cand" 2>/dev/null)" || continue
        if _ntonix_python_ok "$path"; then
            echo "$path"
            return 0
        fi
    done
    return 1
}

_ntonix_make_venv() {
    local py="$1" venv="$2" out
    echo "==> creating .venv with $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    rm -rf "$venv"
    if out="$("$py" -m venv "$venv" 2>&1)"; then
        return 0
    fi
    # Debian/Ubuntu ship venv's pip bootstrap (ensurepip) in a separate package.
    if [[ "$out" == *ensurepip* ]] && command -v apt-get >/dev/null 2>&1; then
        local ver sudo=""
        ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        [ "$(id -u)" = 0 ] || sudo="sudo"
        if [ -z "$sudo" ] || command -v sudo >/dev/null 2>&1; then
            echo "==> installing python$ver-venv (venv's pip bootstrap is missing)"
            rm -rf "$venv"
            export DEBIAN_FRONTEND=noninteractive
            $sudo apt-get update -qq >/dev/null \
                && $sudo apt-get install -y -qq --no-install-recommends "python$ver-venv" >/dev/null \
                && out="$("$py" -m venv "$venv" 2>&1)" && return 0
        fi
    fi
    echo "$out" >&2
    echo "error: could not create .venv with $py" >&2
    rm -rf "$venv"
    return 1
}

# sha256 over the requirements file and, recursively, every file it includes with -r.
_ntonix_req_hash() {
    local python="$1" files
    files="$(_ntonix_req_files "$2" 0)" || return 1
    {
        "$python" -c 'import sys; print(sys.version)'
        while IFS= read -r f; do echo "# $f"; cat "$f"; done <<< "$files"
    } | sha256sum | cut -d' ' -f1
}

_ntonix_req_files() {
    local file="$1" depth="$2" dir inc line
    [ "$depth" -lt 10 ] || { echo "error: -r nesting too deep at $file" >&2; return 1; }
    [ -f "$file" ] || { echo "error: requirements file not found: $file" >&2; return 1; }
    echo "$file"
    dir="$(dirname "$file")"
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in
            "-r "*|"--requirement "*|"-c "*|"--constraint "*)
                inc="${line#* }"; inc="${inc#"${inc%%[![:space:]]*}"}"; inc="${inc%%[[:space:]#]*}"
                case "$inc" in /*) ;; *) inc="$dir/$inc" ;; esac
                _ntonix_req_files "$inc" $((depth + 1)) || return 1
                ;;
        esac
    done < "$file"
}

_ntonix_venv_main "$@"
_ntonix_venv_status=$?
unset -f _ntonix_venv_main _ntonix_python_ok _ntonix_find_python _ntonix_make_venv _ntonix_req_hash _ntonix_req_files
# shellcheck disable=SC2317
return "$_ntonix_venv_status" 2>/dev/null || exit "$_ntonix_venv_status"
