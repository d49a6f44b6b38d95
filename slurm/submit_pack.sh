#!/usr/bin/env bash
# Pack a large raw table on SLURM: a job array of SLICES tasks (slurm/pack.sbatch) and a merge job that starts
# when all of them succeeded (slurm/merge.sbatch, --dependency=afterok). Prints both job ids:
#
#   $ slurm/submit_pack.sh products.parquet /data/packed 16 --image-size 256 --images-root /data/raw
#   pack_job=1234
#   merge_job=1235
#
# Logs: OUT/logs/pack-ARRAYID_TASK.out and OUT/logs/merge-JOBID.out. Environment:
#   MMCAT_PACK_ARRAY    array indices to submit (default 0-(SLICES-1)); e.g. "3" re-runs only slice 3
#   MMCAT_SBATCH_ARGS   extra sbatch options for both jobs, e.g. "--cpus-per-task=8 --mem=16G"
#   SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_ACCOUNT ...   read by sbatch itself
set -euo pipefail

if (($# < 3)); then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    echo "usage: $0 INPUT OUT SLICES [mmcat pack options]" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
input=$(realpath -m "$1") out=$(realpath -m "$2") slices=$3
shift 3
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || { echo "submit_pack.sh: SLICES must be a positive integer, got '$slices'" >&2; exit 2; }
[[ -e "$input" ]] || { echo "submit_pack.sh: input not found: $input" >&2; exit 2; }
read -r -a sbatch_args <<<"${MMCAT_SBATCH_ARGS:-}"
mkdir -p "$out/logs"

array=${MMCAT_PACK_ARRAY:-0-$((slices - 1))}
pack_job=$(sbatch --parsable "${sbatch_args[@]}" --array="$array" --output="$out/logs/pack-%A_%a.out" \
    "$here/pack.sbatch" "$input" "$out" "$slices" "$@")
pack_job=${pack_job%%;*}
merge_job=$(sbatch --parsable "${sbatch_args[@]}" --dependency="afterok:$pack_job" --kill-on-invalid-dep=yes \
    --output="$out/logs/merge-%j.out" "$here/merge.sbatch" "$out")
merge_job=${merge_job%%;*}
echo "pack_job=$pack_job"
echo "merge_job=$merge_job"
