# Sourced by .ci/image and .ci/k8s: die, apt_install, and the virtualenv with the pinned linters.
# shellcheck shell=bash

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

# Installs Debian packages (as root; otherwise says what to install). apt-get update once per script.
apt_install() {
    [[ $(id -u) == 0 ]] || die "needs Debian packages: sudo apt-get install -y $*"
    if [[ -z ${_apt_updated:-} ]]; then
        apt-get update -qq
        _apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Sets VENV to a virtualenv holding .ci/deploy-requirements.txt, made (or remade, when the pins change)
# under ~/.cache unless MCP_CI_VENV names another place.
deploy_venv() {
    VENV=${MCP_CI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mcp-tenant-proxy/deploy-venv}
    local req=.ci/deploy-requirements.txt stamp
    stamp=$(sha256sum "$req" | cut -d' ' -f1)
    if [[ $(cat "$VENV/.requirements" 2>/dev/null) == "$stamp" ]]; then
        return
    fi
    command -v python3 >/dev/null || apt_install python3 python3-venv
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    echo "$stamp" >"$VENV/.requirements"
}
