#!/bin/sh
# One powered layer-swap table (README, "Layer swapping, powered") on 2 cores: two one-thread
# jobs side by side, each stage cached by polyft's artifact store (a rerun only prints).
#   scripts/swap_powered.sh swap_powered_de     # POLYFT="polyft" by default; logs: outputs/logs/<exp>/
# Lane A trains the math experts, lane B the language experts (seeds 0-2); then A runs seed 0
# and scores seed 2's base and experts while B merges seeds 1-2, scores seed 2's merges and
# runs seed 1; last, the sweep over the seeds (all cached) prints polyft's tables, and
# scripts/powered_table.py the mean +- sd table, the precondition and the rule.
set -eu
EXP=$1
POLYFT=${POLYFT:-polyft}
PYTHON=${PYTHON:-python}
LOG=${LOG_DIR:-outputs/logs}/$EXP
mkdir -p "$LOG"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
lane() {  # lane NAME COMMAND...: run in the background, log to $LOG/NAME.log
  name=$1; shift
  ( set -e; for c in "$@"; do echo "+ $c"; sh -c "$c"; done ) >"$LOG/$name.log" 2>&1 &
}
finish() {  # wait for both lanes; stop on a failed one
  failed=0
  for pid in "$@"; do wait "$pid" || failed=1; done
  if [ $failed -ne 0 ]; then echo "a lane failed: see $LOG/" >&2; exit 1; fi
}
P="$POLYFT"
lane train_math "$P train +exp=$EXP expert=math seed=0" "$P train +exp=$EXP expert=math seed=1" \
  "$P train +exp=$EXP expert=math seed=2"; A=$!
lane train_lang "$P train +exp=$EXP expert=lang seed=0" "$P train +exp=$EXP expert=lang seed=1" \
  "$P train +exp=$EXP expert=lang seed=2"; B=$!
finish $A $B
lane score_a "$P run +exp=$EXP seed=0" "$P eval +exp=$EXP seed=2 'eval.models=[base,math,lang]'"; A=$!
lane score_b "$P merge +exp=$EXP seed=1" "$P merge +exp=$EXP seed=2" \
  "$P eval +exp=$EXP seed=2 'eval.models=[swap,soup]'" "$P run +exp=$EXP seed=1"; B=$!
finish $A $B
$P run +exp=$EXP -m seed=0,1,2 >"$LOG/tables.log" 2>&1 || { cat "$LOG/tables.log" >&2; exit 1; }
$PYTHON scripts/powered_table.py "$EXP"
