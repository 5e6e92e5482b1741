#!/bin/sh
# Run one Bulkhead service: `bulkhead-service <identity|credentials|state|inference|orchestrator|metering>`.
set -eu
service="${1:-}"
case "$service" in
  identity|credentials|state|inference|orchestrator|metering) ;;
  *) echo "usage: bulkhead-service identity|credentials|state|inference|orchestrator|metering" >&2; exit 64 ;;
esac
shift
# exec: the service replaces this shell, so it is the process that receives SIGTERM and drains.
exec python -m "services.$service" "$@"
