#!/usr/bin/env bash
# Submit a sharded sweep as a Slurm job array plus a merge that waits for it:
#   SHARDS=8 OUT=/scratch/$USER/ioi-sweep deploy/slurm/submit.sh patch --data pairs.jsonl --method act,atp,relp
# Resubmitting the same command after a failure reruns only the shards without OUT/part-I/shard.json.
set -euo pipefail
: "${SHARDS:?set SHARDS (number of shards)}"
: "${OUT:?set OUT (sweep folder on a file system every node sees)}"
export DEPLOY_DIR
DEPLOY_DIR="$(cd "$(dirname "$0")/.." && pwd)"
export SHARDS OUT
array=$(sbatch --parsable --array="0-$((SHARDS - 1))" "$DEPLOY_DIR/slurm/sweep.sbatch" "$@")
merge=$(sbatch --parsable --dependency="afterok:$array" "$DEPLOY_DIR/slurm/merge.sbatch")
echo "array job $array ($SHARDS shards), merge job $merge -> $OUT/merged"
