#!/usr/bin/env bash
# Retrofitted recurrence during the math cooldown (§5.3, Table 3, Fig. 17): the recipe of
# examples/cooldown_math_360m.sh with layers 8-11 (0-indexed) applied twice -- one additional
# repetition of the third 4-layer block, the paper's best choice -- from iteration 170000 on.
# The checkpoint records the loop (Loop(8-4x2-...)), so evaluation loads it looped; sweep k with
#   python -m megatron_growloop.eval sweep loop-repeats --load $SAVE --repeats 1,2,3,4 --out k.json
#
#   BASE=runs/lidas_360m DATA=... [MATH=...] bash examples/retrofit_cooldown_360m.sh
set -euo pipefail
export SAVE=${SAVE:-runs/retrofit_cooldown_360m}
exec bash "$(dirname "$0")/cooldown_math_360m.sh" --retrofit-loop "${RETROFIT:-8:12:2}" "$@"
