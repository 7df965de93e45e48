#!/usr/bin/env bash
# Installs the Debian 12 packages bulkhead needs to build, test and run,
# and only those that are missing; `apt-get update` runs only if something is.
set -euo pipefail

packages=(
  clang llvm libbpf-dev bpftool libelf-dev zlib1g-dev
  libyaml-cpp-dev libcli11-dev libfmt-dev libspdlog-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev libpcap-dev libcpp-httplib-dev
  xdp-tools nftables iproute2 iputils-ping
  cmake g++ make pkg-config
)

if [[ $(id -u) -ne 0 ]]; then
  echo "deps.sh: installing packages needs root; run it with sudo" >&2
  exit 1
fi
if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
  echo "deps.sh: this script is for Debian 12 (dpkg and apt-get); install the packages" \
       "listed in it with your distribution's tools" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "deps.sh: all ${#packages[@]} packages are installed"
  exit 0
fi

echo "deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
