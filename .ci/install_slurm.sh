#!/bin/bash
# The packages the `slurm` test tier needs (tests/slurm: a real two-node Slurm 22.05 in
# network namespaces on this machine): Debian's munge, slurmctld, slurmd, slurm-client.
# Idempotent; always exits 0. Where they cannot be installed (not root, no apt, no
# network) it says why, and the slurm tests skip naming what is missing. The tests start
# and stop their own munged and Slurm daemons: nothing is started here.
set -uo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client)
TOOLS=(munged mungekey slurmctld slurmd sbatch scontrol nsenter unshare ip)

have_all() {
    local tool
    for tool in "${TOOLS[@]}"; do
        command -v "$tool" >/dev/null || return 1
    done
}

if have_all; then
    echo "install_slurm.sh: Slurm and munge already installed"
    exit 0
fi
if (( EUID != 0 )); then
    echo "install_slurm.sh: not root: cannot install ${PACKAGES[*]}; the slurm tests will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm.sh: no apt-get: install ${PACKAGES[*]} (Slurm 22.05+) yourself;" \
         "the slurm tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}" iproute2 util-linux; } >/tmp/install_slurm.log 2>&1; then
    echo "install_slurm.sh: apt-get failed (see /tmp/install_slurm.log):"
    tail -n 5 /tmp/install_slurm.log
    echo "install_slurm.sh: the slurm tests will skip"
    exit 0
fi
if have_all; then
    echo "install_slurm.sh: installed ${PACKAGES[*]}"
else
    echo "install_slurm.sh: installed, but still missing some of: ${TOOLS[*]}"
fi
exit 0
