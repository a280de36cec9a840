#!/usr/bin/env bash
# Python 3.11 and Tiered on a `ray up` node (head and workers), run by setup_commands in
# cluster/aws-gpu.yaml, gcp-gpu.yaml and local.yaml; `ray up` runs it again on every
# start, so each step is idempotent.
#
# The stock Ubuntu 22.04 GPU images (AWS Deep Learning AMI, GCP's common-cu124) ship
# Python 3.10, and Tiered needs 3.11: this installs python3.11 from the deadsnakes PPA
# when it is missing, makes a venv (TIERED_VENV, default ~/tiered-venv), installs
# torch==2.13.0 (PyPI's Linux build, with CUDA) and Tiered from ~/tiered (the synced
# repository) as a package, and puts the venv first on PATH in ~/.bashrc, which Ray
# sources before every later command (ray start, tiered, serve).
set -euo pipefail

venv="${TIERED_VENV:-$HOME/tiered-venv}"
if ! command -v python3.11 > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    sudo -E apt-get update -q
    sudo -E apt-get install -y -q software-properties-common
    sudo -E add-apt-repository -y ppa:deadsnakes/ppa
    sudo -E apt-get install -y -q python3.11 python3.11-venv
fi
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q "$HOME/tiered"
line="export PATH=\"$venv/bin:\$PATH\"  # Tiered (cluster/node-setup.sh)"
grep -qxF "$line" "$HOME/.bashrc" 2> /dev/null || echo "$line" >> "$HOME/.bashrc"
