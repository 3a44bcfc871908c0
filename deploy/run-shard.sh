#!/usr/bin/env bash
# Run one shard of a ferrolens sweep on whatever engine started this process:
#   Slurm job array   -> SLURM_ARRAY_TASK_ID (array 0..N-1)
#   Kubernetes        -> JOB_COMPLETION_INDEX (Indexed Job, completions N)
#   by hand           -> SHARD_INDEX
# SHARDS (N) and OUT (the sweep's folder) come from the environment; the arguments are the
# ferrolens command without --shard/--out, e.g.
#   SHARDS=8 OUT=out/sweep deploy/run-shard.sh patch --data pairs.jsonl --method act,atp,relp
# The shard writes OUT/part-I; a shard whose OUT/part-I/shard.json exists is finished and is
# skipped, so resubmitting the whole array reruns only the shards that failed or were killed.
set -euo pipefail
I="${SLURM_ARRAY_TASK_ID:-${JOB_COMPLETION_INDEX:-${SHARD_INDEX:-}}}"
if [ -z "$I" ]; then
  echo "run-shard.sh: no shard index: set SLURM_ARRAY_TASK_ID (Slurm), JOB_COMPLETION_INDEX (Kubernetes) or SHARD_INDEX" >&2
  exit 2
fi
: "${SHARDS:?run-shard.sh: set SHARDS to the number of shards (the array size)}"
: "${OUT:?run-shard.sh: set OUT to the sweep folder (parts go to OUT/part-I)}"
FERROLENS="${FERROLENS:-ferrolens}"
PART="$OUT/part-$I"
if [ -f "$PART/shard.json" ]; then
  echo "shard $I/$SHARDS is finished ($PART/shard.json); skipping"
  exit 0
fi
mkdir -p "$OUT"
exec "$FERROLENS" "$@" --shard "$I/$SHARDS" --out "$PART"
