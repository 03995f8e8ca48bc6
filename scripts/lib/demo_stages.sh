# Shared by the built-in demos (scripts/demo.sh, scripts/demo_multiround.sh); sourced, not run.
# Expects PYTHON, OUT, JOBS and NUM_STAGES to be set by the demo.

STAGES=""

stage() {  # stage NUMBER NAME MESSAGE
  STAGE_NAME=$2
  STAGE_START=$SECONDS
  echo
  echo "==> [$1/$NUM_STAGES] $3"
}

stage_done() {  # records the stage's wall time in STAGES (name=seconds,...)
  local seconds=$((SECONDS - STAGE_START))
  STAGES="${STAGES:+$STAGES,}$STAGE_NAME=$seconds"
  echo "    $STAGE_NAME done in ${seconds}s"
}

# Commands run beside the foreground one, one per spare core (JOBS - 1 of them at a time: the
# demo's JOBS is how many processes the machine runs well). Their output goes to a log in OUT;
# a failure shows that log's end and stops the demo, and none outlives a failed demo.
BESIDE_PIDS=()
BESIDE_LOGS=()
stop_beside() {  # on exit: stop what still runs beside, with the children of a shell function
  local pid children
  for pid in "${BESIDE_PIDS[@]}"; do
    children=$(pgrep -P "$pid" 2>/dev/null || true)  # before the parent goes: then they are re-parented
    kill "$pid" 2>/dev/null || true
    if [[ -n "$children" ]]; then
      # shellcheck disable=SC2086  # one pid per word
      kill $children 2>/dev/null || true
    fi
  done
}
trap stop_beside EXIT

beside() {  # beside LOG COMMAND...: run COMMAND beside the next ones (in the foreground if JOBS=1)
  local log=$1
  shift
  if ((${#BESIDE_PIDS[@]} > 0 && ${#BESIDE_PIDS[@]} >= JOBS - 1)); then
    wait_beside  # every spare core is taken
  fi
  "$@" >"$log" 2>&1 &
  BESIDE_PIDS+=($!)
  BESIDE_LOGS+=("$log")
  if ((JOBS <= 1)); then
    wait_beside  # no spare core
  fi
}

wait_beside() {  # wait for every command started by beside; exit on the first failure
  local index
  for index in "${!BESIDE_PIDS[@]}"; do
    if ! wait "${BESIDE_PIDS[$index]}"; then
      echo "failed; the end of ${BESIDE_LOGS[$index]}:" >&2
      tail -n 20 "${BESIDE_LOGS[$index]}" >&2
      exit 1
    fi
  done
  BESIDE_PIDS=()
  BESIDE_LOGS=()
}

weightfree_proposals() {  # weightfree_proposals DATASET MASKS JOBS: train and val stores
  local dataset=$1 masks=$2 jobs=$3 shard split
  local proposals=("$PYTHON" -m prepare_datasets.prepare_reason_seg --dataset_dir "$dataset"
    --sam_masks_dir "$masks" --backend weightfree --splits train,val --no-fsync
    --num_shards "$jobs")
  for ((shard = 1; shard < jobs; shard++)); do
    JOBS=$jobs beside "$OUT/proposals_shard$shard.log" "${proposals[@]}" --shard_id "$shard"
  done
  "${proposals[@]}" --shard_id 0
  wait_beside
  for split in train val; do
    if [[ ! -f "$masks/reason_seg/ReasonSeg/$split/masks.h5" ]]; then
      echo "no proposal store for $split: a shard did not finish" >&2
      exit 1
    fi
  done
}
