#!/usr/bin/env bash
# CPU-sized retrofitted recurrence during the math cooldown: examples/cooldown_math_cpu.sh with
# layers 8-11 of the 12-layer tiny model applied twice from iteration 170 on (same stable-phase
# checkpoint $BASE, so plain and retrofitted cooldowns are comparable).
set -euo pipefail
export SAVE=${SAVE:-/tmp/growloop_retrofit_cooldown_cpu}
exec bash "$(dirname "$0")/cooldown_math_cpu.sh" --retrofit-loop "${RETROFIT:-8:12:2}" "$@"
