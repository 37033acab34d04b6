#!/bin/sh
# One powered real-model table (docs/results-real.md) on 2 cores: two one-thread lanes side by
# side, each stage cached by polyft's artifact store (a rerun only prints), then the sweep that
# reads everything back and scripts/powered_table.py with the table's pre-registered spec.
#   scripts/powered.sh NAME      # NAME: a spec in scripts/powered/ (swap_powered_de, transfer_powered, ...)
# POLYFT="polyft" and PYTHON="python" by default; logs: outputs/logs/NAME/.
set -eu
NAME=$1
POLYFT=${POLYFT:-polyft}
PYTHON=${PYTHON:-python}
LOG=${LOG_DIR:-outputs/logs}/$NAME
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
E="+exp=$NAME"
case $NAME in
swap_powered_*)
  # A trains the math experts, B the language experts (seeds 0-2); then A runs seed 0 and
  # scores seed 2's base and experts while B merges seeds 1-2, scores seed 2's merges and runs seed 1.
  lane a "$P train $E expert=math seed=0" "$P train $E expert=math seed=1" "$P train $E expert=math seed=2"; A=$!
  lane b "$P train $E expert=lang seed=0" "$P train $E expert=lang seed=1" "$P train $E expert=lang seed=2"; B=$!
  finish $A $B
  lane a2 "$P run $E seed=0" "$P eval $E seed=2 'eval.models=[base,math,lang]'"; A=$!
  lane b2 "$P merge $E seed=1" "$P merge $E seed=2" "$P eval $E seed=2 'eval.models=[swap,soup]'" "$P run $E seed=1"; B=$!
  finish $A $B
  SWEEP="-m seed=0,1,2" ;;
transfer_powered)
  # The source LoRAs of seeds 0-2 (9 trainings) split over the lanes, then one seed's run each;
  # the sweep does seed 2's few-shot arms and scores.
  lane a "$P train $E expert=en seed=0" "$P train $E expert=fr seed=0" "$P train $E expert=es seed=0" \
    "$P train $E expert=en seed=2" "$P train $E expert=full_fewshot seed=2"; A=$!
  lane b "$P train $E expert=en seed=1" "$P train $E expert=fr seed=1" "$P train $E expert=es seed=1" \
    "$P train $E expert=fr seed=2" "$P train $E expert=es seed=2"; B=$!
  finish $A $B
  lane a2 "$P run $E seed=0" "$P train $E expert=cont seed=2"; A=$!
  lane b2 "$P run $E seed=1" "$P merge $E seed=2"; B=$!
  finish $A $B
  SWEEP="-m seed=0,1,2" ;;
ties_powered)
  lane a "$P train $E expert=math"; A=$!
  lane b "$P train $E expert=ct"; B=$!
  finish $A $B
  lane a2 "$P eval $E 'eval.models=[math,base]'"; A=$!
  lane b2 "$P merge $E" "$P eval $E 'eval.models=[ct,ties_sv,ties]'"; B=$!
  finish $A $B
  SWEEP="" ;;
maple_powered)
  lane a "$P run $E adapter.r=4 quant=none" "$P run $E adapter.r=64 quant=4bit"; A=$!
  lane b "$P run $E adapter.r=64 quant=none" "$P run $E adapter.r=4 quant=4bit"; B=$!
  finish $A $B
  SWEEP="-m adapter.r=4,64 quant=none,4bit" ;;
flix_powered)
  lane a "$P train $E expert=flix" "$P eval $E 'eval.models=[flix]'"; A=$!
  lane b "$P eval $E 'eval.models=[base]'" "$P train $E expert=shared" "$P eval $E 'eval.models=[shared]'"; B=$!
  finish $A $B
  SWEEP="" ;;
*)
  echo "$NAME: no lanes for it here; known: swap_powered_de, swap_powered_sw, transfer_powered, ties_powered, maple_powered, flix_powered" >&2
  exit 2 ;;
esac
# shellcheck disable=SC2086
$P run $E $SWEEP >"$LOG/tables.log" 2>&1 || { cat "$LOG/tables.log" >&2; exit 1; }
# The full table (docs/results-real.md), then the short form (the README's)
SPECS=$NAME
case $NAME in maple_powered) SPECS="maple_powered maple_powered_bits" ;; esac
for s in $SPECS; do $PYTHON scripts/powered_table.py "$s"; done
for s in $SPECS; do echo; $PYTHON scripts/powered_table.py "$s" --brief; done
