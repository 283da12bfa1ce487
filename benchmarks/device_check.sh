#!/bin/sh
# The device check (benchmarks/device_check.py: what it runs, and the .wheels/ it carries).
exec "${PYTHON:-python3}" "$(dirname "$0")/device_check.py" "$@"
