#!/usr/bin/env bash
# Installs what is missing, builds everything and runs the whole ctest suite:
# unit, BPF (BPF_PROG_TEST_RUN) and namespace integration tests.
# Needs root and a Linux kernel with BPF (5.15 or later, with BTF).
# Extra arguments go to ctest (e.g. -L bpf, -R cli).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "test.sh: the BPF and integration tests need root; run it with sudo" >&2
  exit 1
fi

cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j2

if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

# One test at a time: the integration tests each build namespaces and load
# programs, and their timeouts assume an otherwise idle machine.
ctest --test-dir build --output-on-failure -j1 "$@"
