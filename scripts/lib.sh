# Shell helpers shared by setup.sh and build_guest.sh (sourced, not run).

# ensure_packages WHO PKG...: apt-get install the Debian packages that are missing (as root),
# or say which ones and how to get them, and fail.  Messages go to stderr, prefixed WHO.
ensure_packages() {
  local who=$1 p
  shift
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "$who: missing system packages: ${missing[*]} - run as root, or: sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
  echo "$who: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
