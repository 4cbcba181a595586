# Debian packages the tests need, one per line in tests/apt-packages.txt.
_aegis_apt_missing=()
while read -r _pkg; do
    case "$_pkg" in ''|'#'*) continue ;; esac
    dpkg-query -W -f='${Status}' "$_pkg" 2>/dev/null | grep -q 'install ok installed' \
        || _aegis_apt_missing+=("$_pkg")
done < tests/apt-packages.txt
if [ "${#_aegis_apt_missing[@]}" -gt 0 ]; then
    log "apt-get install ${_aegis_apt_missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${_aegis_apt_missing[@]}" >/dev/null
fi
unset _aegis_apt_missing _pkg
