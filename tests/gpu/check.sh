#!/usr/bin/env bash
# The build's GPU path on one lent GPU in one call of at most 8 minutes, ending with its table (tests/gpu/check.py
# says what it runs). Here, once:  bash tests/gpu/fetch_wheels.sh   (the wheels the GPU image lacks, into .gpu-wheels/)
# There, through the device tool, with .gpu-wheels carried:   bash tests/gpu/check.sh
# Logs and check.json land in $OUT (default /tmp/gpu-check). Arguments go to check.py (e.g. --budget 300).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 tests/gpu/check.py "$@"
