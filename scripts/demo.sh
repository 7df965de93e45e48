#!/usr/bin/env bash
# Installs what is missing, builds the bulkhead CLI and runs `bulkhead demo`.
# Needs root and a Linux kernel with BPF (5.15 or later, with BTF).
# Extra arguments go to `bulkhead demo` (e.g. --keep-going).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "demo.sh: the demo creates network namespaces and loads BPF programs; run it" \
       "with sudo" >&2
  exit 1
fi

cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j2 --target bulkhead_cli

if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

exec ./build/tools/bulkhead demo "$@"
