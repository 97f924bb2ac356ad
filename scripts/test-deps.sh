#!/usr/bin/env bash
# What the test suite needs beyond the Rust toolchain, on Debian 12 as root: CRIU 4.x (built from
# source, see install-criu.sh), Prometheus (the suite scrapes the controller with a real one),
# PyTorch in /opt/tessera-torch (torchrun tests), Chromium with ChromeDriver (the dashboard's
# end-to-end test drives it headless), Slurm with munge (the smoke run of
# bench/slurm-vs-tessera.sh puts a few jobs through both), Schemathesis from PyPI (it checks the
# API document against a live controller), and for container images a real registry (docker-registry), umoci and skopeo to build and push test
# images, busybox-static for their shell, runc to run them, containerd (the image
# benchmark's smoke run pulls beside it), and PostgreSQL (the store's tests start throwaway
# clusters of their own; the system's cluster is never started), and iperf3 (the remote-GPU
# benchmark's smoke run measures its link with it), and wheel, pandas and mypy for the
# Python client's test, and Jupyter's notebook (`tessera notebook` starts a real one).
# Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"
./install-criu.sh
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v slurmctld >/dev/null || missing+=(slurm-wlm slurmctld slurmd slurm-client)
command -v munged >/dev/null || missing+=(munge)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v umoci >/dev/null || missing+=(umoci)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v runc >/dev/null || missing+=(runc)
command -v containerd >/dev/null || missing+=(containerd)
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v jupyter-notebook >/dev/null || missing+=(jupyter-notebook)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -q >/dev/null
    # No services are started: the tests run what they need themselves.
    ours=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        ours=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >/dev/null
    [ -z "$ours" ] || rm -f /usr/sbin/policy-rc.d
fi
# PyTorch for the torchrun tests (a gang's gloo all-reduce, an elastic job's re-rendezvous): PyPI's
# default wheel with its CUDA libraries (the CPU-only index is not reachable from these machines),
# about 5 GiB in its own virtual environment; its CPU paths need no GPU.
TORCH_VENV=/opt/tessera-torch
if [ "$(readlink -f "$TORCH_VENV/bin/python3")" != "$(readlink -f /usr/bin/python3)" ] ||
    ! "$TORCH_VENV/bin/python" -c 'import torch.distributed' >/dev/null 2>&1; then
    echo "installing PyTorch into $TORCH_VENV" >&2
    rm -rf "$TORCH_VENV"
    # The system Python, which workloads (running as other uids) can reach.
    if ! /usr/bin/python3 -m venv "$TORCH_VENV" >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >/dev/null
        /usr/bin/python3 -m venv "$TORCH_VENV"
    fi
    "$TORCH_VENV/bin/pip" install -q --no-cache-dir 'torch==2.15.0' numpy
    chmod -R a+rX "$TORCH_VENV"
fi
# The Python client's test installs it with pip, offline (setuptools needs `wheel` to build it),
# checks its types with mypy, and turns records into a pandas DataFrame.
if ! python3 -c 'import wheel, pandas, mypy' >/dev/null 2>&1; then
    echo "installing wheel, pandas and mypy" >&2
    python3 -m pip install -q --root-user-action=ignore wheel pandas mypy 2>/dev/null ||
        python3 -m pip install -q --break-system-packages wheel pandas mypy
fi
if ! command -v st >/dev/null; then
    command -v pip3 >/dev/null || {
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip >/dev/null
    }
    echo "installing schemathesis" >&2
    pip3 install -q --break-system-packages 'schemathesis==4.32.5'
fi
