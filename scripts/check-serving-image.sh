#!/bin/bash
# Build the serving image from a tiny model trained on the fixture photos and check it the way SageMaker
# runs it: `docker run --network none IMAGE serve`, /ping, the in-process counts, 4xx for bad requests,
# still serving afterwards. One line per check; exit 1 on the first failure.
#
# Set-up on a fresh machine (after the README install):
#   bash ../shared/tools/docker-local-base.sh     # or any Docker daemon; it must hold the base image
# Usage: scripts/check-serving-image.sh [--base local/python:3.11-slim] [--wheels DIR] [--tag NAME]
#                                       [--model URI --tracking-uri URI] [--skip-build]
# The wheels folder (default $TMPDIR/bincounter-wheels) is reused between runs: the first run downloads
# ~3 GB (torch with its CUDA libraries), the image build itself is offline (docker build --network none).
set -euo pipefail
cd "$(dirname "$0")/.."
df -h / | awk 'NR==2 {print "disk: " $4 " free on /"}'
docker info >/dev/null 2>&1 || { echo "no Docker daemon answers: start one (see the set-up above)" >&2; exit 1; }
exec python3 scripts/check_serving_image.py "$@"
