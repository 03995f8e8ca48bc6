# Shared by the built-in demos (scripts/demo.sh, scripts/demo_multiround.sh); sourced, not run.
# Expects PYTHON, OUT and NUM_STAGES to be set by the demo.

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

weightfree_proposals() {  # weightfree_proposals DATASET MASKS JOBS: train and val stores
  local dataset=$1 masks=$2 jobs=$3 shard index split
  local proposals=("$PYTHON" -m prepare_datasets.prepare_reason_seg --dataset_dir "$dataset"
    --sam_masks_dir "$masks" --backend weightfree --splits train,val --no-fsync
    --num_shards "$jobs")
  pids=()
  trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT  # no shard outlives a failed demo
  for ((shard = 1; shard < jobs; shard++)); do
    "${proposals[@]}" --shard_id "$shard" >"$OUT/proposals_shard$shard.log" 2>&1 &
    pids+=($!)
  done
  "${proposals[@]}" --shard_id 0
  for index in "${!pids[@]}"; do
    if ! wait "${pids[$index]}"; then
      shard=$((index + 1))
      echo "proposal shard $shard failed; the end of $OUT/proposals_shard$shard.log:" >&2
      tail -n 20 "$OUT/proposals_shard$shard.log" >&2
      exit 1
    fi
  done
  trap - EXIT
  for split in train val; do
    if [[ ! -f "$masks/reason_seg/ReasonSeg/$split/masks.h5" ]]; then
      echo "no proposal store for $split: a shard did not finish" >&2
      exit 1
    fi
  done
}
