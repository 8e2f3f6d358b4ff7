#!/usr/bin/env bash
# Installs what Tern's demo, tests and benchmarks need on a fresh Debian 12 machine (run as root).
# Idempotent: a second run installs nothing new.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: must run as root (apt-get, /dev/kvm, network namespaces)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# QEMU, the peer we measure against, comes from bookworm-backports (10.x): Debian 12's own 7.2 corrupts
# guest memory during migration of busy guests, and installing it alone removes qemu-utils 10.
backports=/etc/apt/sources.list.d/tern-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

packages=(
    qemu-system-x86 qemu-utils   # the VMM and NBD peers (bookworm-backports, installed together)
    qemu-system-data             # qboot.rom: QEMU's fast microvm firmware, the boot peer's -bios
    etcd-server                  # cluster membership and coordinator election for shared volumes
    libnbd-bin nbdkit            # standard NBD clients and server used in interop tests
    iproute2 bridge-utils        # network namespaces, veth pairs and bridges as hosts and switches
    iputils-ping iputils-arping  # reachability checks across those namespaces
    binutils                     # objdump: the test guest's build checks its CPL0 code for SSE
    protobuf-compiler            # etcd-client's build
    xz-utils                     # unpacking the Linux kernel package for the banner test
    linux-image-amd64            # a stock kernel (/boot/vmlinuz-*, initrd) for the Linux boot tests
    openipmi ipmitool            # ipmi_sim serves each test host's BMC; ipmitool drives host power
    chromium                     # headless browser for the dashboard tests
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils qemu-system-data >/dev/null
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# cargo-fuzz drives the fuzz targets in fuzz/ (cargo xtask fuzz): pinned, built from its own lock file.
cargo_fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $cargo_fuzz_version"; then
    echo "install-deps: installing cargo-fuzz $cargo_fuzz_version"
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --quiet
fi

qemu_version=$(qemu-system-x86_64 --version | head -n1)
echo "install-deps: ready ($qemu_version)"
