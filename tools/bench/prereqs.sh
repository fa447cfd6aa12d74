# shellcheck shell=bash
# Sourced by scripts/bench: installs what the bench needs and is missing (Debian/Ubuntu: wrk,
# nginx and taskset with apt-get, as root or through sudo) and puts /usr/sbin on PATH.

missing=()
for tool in wrk nginx taskset; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    pkgs=()
    for tool in "${missing[@]}"; do
        case "$tool" in taskset) pkgs+=(util-linux) ;; *) pkgs+=("$tool") ;; esac
    done
    echo "==> installing ${pkgs[*]} (missing: ${missing[*]})"
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "error: installing ${pkgs[*]} needs root or sudo" >&2; exit 1; }
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 || { echo "error: no apt-get; install ${pkgs[*]} by hand" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
# Debian puts nginx in /usr/sbin, which a non-root PATH may lack.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin" ;; esac

