#!/usr/bin/env bash
# One-shot GPU check for a single H100/H200 without Transformer Engine (issue 13); <= 7 minutes.
#
#   bash benchmarks/gpu_check.sh [--dry-run | --smoke] [--out DIR] [--items "mfu loop ..."]
#
# Run from the repository root.  Writes DIR/gpu_check.json (every item's result) and
# DIR/gpu_check.log (everything printed); DIR defaults to $OUT (the device tool's folder), else
# ./gpu_check_out.  Installs the carried wheels from .whl/ first (megatron-core for Python 3.12:
# docs/gpu.md says how to download them).
#
#   --dry-run  check syntax and argument flow on any machine: print the install command, parse
#              every item's command lines with the real argument parser, run nothing
#   --smoke    run every item at toy sizes (works on CPU; tests the measuring code)
#
# Adding an item: write item_<name>(ctx) in benchmarks/gpu_items.py, register it in its ITEMS,
# add <name> and its time limit to ITEMS/LIMITS below.  Items run in the order listed, each in
# its own process under its own time limit; a failed or timed-out item is recorded and the
# rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."

# (a) (b) (c) (d) (e) of issue 13; (f1)+(f4) (f2) (f3) issue 12's GPU-only checks; (f5) the planner's peak.
# plan reads mfu's result, so it comes after mfu.  Sum of the limits: 390 s, plus the wheel install
# and the GPU query (well under 30 s): the script ends within 7 minutes whatever the items do.
ITEMS=(mfu loop growth generate sync cudagraph resume fusions plan)
declare -A LIMITS=([mfu]=95 [loop]=55 [growth]=45 [generate]=30 [sync]=30 [cudagraph]=40 [resume]=40 [fusions]=40 [plan]=15)
BUDGET=390   # seconds: the sum of LIMITS must stay within it
MODE=full
DIR="${OUT:-gpu_check_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry-run ;;
    --smoke) MODE=smoke ;;
    --out) DIR="$2"; shift ;;
    --items) read -r -a ITEMS <<< "$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
total=0
for item in "${!LIMITS[@]}"; do total=$(( total + LIMITS[$item] )); done
if [ "$total" -gt "$BUDGET" ]; then echo "gpu_check.sh: item limits sum to ${total}s, over the ${BUDGET}s budget" >&2; exit 2; fi
for item in "${ITEMS[@]}"; do
  if [ -z "${LIMITS[$item]:-}" ]; then echo "gpu_check.sh: unknown item $item (known: ${!LIMITS[*]})" >&2; exit 2; fi
done
mkdir -p "$DIR"
LOG="$DIR/gpu_check.log"
SCRATCH="$(mktemp -d)"
: > "$LOG"
say() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG"; }

install_wheels() {
  # The device image has torch, transformers, tensorboard, psutil but not megatron-core.
  local cmd="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl"
  if [ "$MODE" = dry-run ]; then
    say "would run: $cmd && export PYTHONPATH=/tmp/site:\$PWD"
    return 0
  fi
  if ls .whl/*.whl > /dev/null 2>&1; then
    say "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    $cmd >> "$LOG" 2>&1 || { say "wheel install failed"; return 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no .whl/ here: using the installed packages"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  python3 -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
}

environment() {
  [ "$MODE" = dry-run ] && return 0
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 || true; } | tee -a "$LOG"
}

run_item() {  # run_item NAME: one item in its own process, under its time limit
  local item="$1" flag=()
  [ "$MODE" = dry-run ] && flag=(--dry-run)
  [ "$MODE" = smoke ] && flag=(--smoke)
  local limit=${LIMITS[$item]}
  [ "$MODE" = smoke ] && limit=$(( limit * 6 ))   # toy sizes on a (shared) CPU: slower process start-up
  say "item $item (limit ${limit}s, mode $MODE)"
  PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore timeout "$limit" \
    python3 benchmarks/gpu_items.py "$item" --out "$SCRATCH/$item.json" "${flag[@]}" >> "$LOG" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ ! -s "$SCRATCH/$item.json" ]; then
    printf '{"item": "%s", "status": "failed", "error": "timed out or crashed (exit %s); see gpu_check.log"}\n' \
      "$item" "$rc" > "$SCRATCH/$item.json"
  fi
  say "item $item done (exit $rc)"
}

summarize() {  # merge the per-item results into one JSON (the device tool returns few files)
  python3 - "$DIR/gpu_check.json" "$MODE" "$SCRATCH" "${ITEMS[@]}" <<'PY'
import json, sys, pathlib
out, mode, scratch, items = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4:]
results = {i: json.loads((scratch / f"{i}.json").read_text()) for i in items}
json.dump({"mode": mode, "items": results}, open(out, "w"), indent=2)
for i, r in results.items():
    brief = {k: v for k, v in r.items() if k in ("status", "error", "pass", "refused", "ratio", "mfu", "host_syncs",
                                                 "same_tokens", "speedup", "growth_over_step_before", "max_rel_diff",
                                                 "fused_by_default", "seconds")}
    if "rows" in r:
        brief["rows"] = [{k: x.get(k) for k in ("preset", "tokens_per_s", "mfu", "peak_mem_GiB", "ratio") if k in x}
                         for x in r["rows"]]
    print(f"{i:>9}: {json.dumps(brief, default=str)}")
print(f"wrote {out}")
PY
}

START=$(date +%s)
say "mode $MODE, items: ${ITEMS[*]}, out $DIR"
install_wheels || { echo '{"status": "failed", "error": "wheel install"}' > "$DIR/gpu_check.json"; exit 1; }
environment
for item in "${ITEMS[@]}"; do run_item "$item"; done
summarize 2>&1 | tee -a "$LOG"
say "total $(( $(date +%s) - START ))s"
rm -rf "$SCRATCH"
