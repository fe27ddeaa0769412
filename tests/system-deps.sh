#!/usr/bin/env bash
# Installs the system programs the test suite drives for real, when they are missing.
# Runs apt-get only as root; otherwise says what is missing and carries on (tests that need a
# missing program skip with that reason).
set -euo pipefail
declare -A wanted=(
  [ffmpeg]=ffmpeg
  [tinyproxy]=tinyproxy
  [microsocks]=microsocks
  [redis-server]=redis-server
  [nginx]=nginx
  [wrk]=wrk
  [promtool]=prometheus
  [prometheus]=prometheus
  [yq]=yq
  [ss]=iproute2
)
missing=()
for bin in "${!wanted[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${wanted[$bin]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "system-deps: missing ${missing[*]} (not root or no apt-get); tests that need them will skip"
fi
