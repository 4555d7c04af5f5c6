#!/bin/sh
# The image's entrypoint is the lorafleet CLI: `docker run lorafleet:0.1.0 finetune configs/smoke.yaml`.
# Prefect's Docker and Kubernetes workers replace the container's command with their own
# (`prefect flow-run execute`, `python -m prefect.engine`): a first word that is a program on PATH and
# not a lorafleet command runs as given, so the same image serves the CLI and the work pools.
set -e
case "$1" in
  "" | -*) exec lorafleet "$@" ;;
  lorafleet) shift; exec lorafleet "$@" ;;
esac
if command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec lorafleet "$@"
