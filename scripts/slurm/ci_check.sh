#!/usr/bin/env bash
# The real-SLURM check, run by .ci/run as its own step (outside pytest's per-test timeout):
#
#   1. installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (root + apt needed;
#      otherwise the check is skipped with the reason, exit 0) and starts a one-node cluster on this machine
#      (scripts/slurm/local_cluster.sh);
#   2. job 1: examples/slurm/train_cpu.sbatch, 2 tasks launched by srun (no torchrun; the platform layer maps
#      SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST), a tiny RAL run with 2 data-loader workers per task,
#      to completion: the job completes and writes its final checkpoint;
#   3. job 2: the same run, sent SIGTERM mid-run (`scancel --signal=TERM`, as SLURM's --signal does before a
#      time limit): the trainer saves and exits 0, the sbatch requeues the job, the requeued job resumes from
#      the checkpoint and finishes; its per-step metrics equal job 1's (bit-exact resume).
#
#   bash scripts/slurm/ci_check.sh            # KEEP=1 keeps the work directory
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
say() { echo "[slurm-check] $*"; }
skip() { say "skipped: $*"; exit 0; }

[[ "$(id -u)" == 0 ]] || skip "not root (installing and starting SLURM daemons needs root)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || skip "slurm is not installed and there is no apt-get"
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge; } \
       >/tmp/ral-slurm-apt.log 2>&1; then
    tail -n 5 /tmp/ral-slurm-apt.log
    skip "apt-get could not install SLURM (log above)"
  fi
fi
if [[ ! -s /etc/munge/munge.key ]]; then
  (command -v mungekey >/dev/null && mungekey --create --force) || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
fi

bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d /tmp/ral-slurm.XXXXXX)"
# shellcheck source=local_cluster.sh
source scripts/slurm/local_cluster.sh
cleanup() {
  scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true
  local_cluster_stop "$WORK/cluster"
  [[ "${KEEP:-0}" == 1 ]] && say "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
local_cluster_start "$WORK/cluster"
START=$SECONDS

say "tiny checkpoint and synthetic data in $WORK"
export OMP_NUM_THREADS=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" tools/make_tiny_checkpoint.py --out "$WORK/hf" --preset tiny --seed 0 >/dev/null
"$PY" tools/convert_hf_to_megatron.py --hf "$WORK/hf" --out "$WORK/mcore" --quiet >/dev/null
"$PY" tools/make_synthetic_videos.py --out "$WORK/data" --n 48 --seed 0 --heldout-fraction 0.25 >/dev/null

# The untrained tiny model earns Video-R1's reward for nothing (every advantage 0, every loss term 0), which would
# make the metrics comparison below vacuous: the trainer tests' reward (tests/distributed/trainer_fixture.py:
# text_reward, the share of letters in the response) gives every step non-zero advantages, losses and gradients.
#
# A tiny step takes a fraction of a second, so a signal sent "after step 2" could land after the last step. Job 2
# runs with trainer_fixture.hold_env's variables: once its metrics end at step 2, the rewards of step 3 wait until
# the trainer's SIGTERM handler has run. The signal lands mid-step every time; the metrics are unchanged.
export PYTHONPATH="$ROOT/tests/distributed${PYTHONPATH:+:$PYTHONPATH}"
STEPS=6
RUN=(examples/configs/quickstart_ral.yaml "model.load=$WORK/mcore" "data.train_files=[$WORK/data/train.json]"
     "data.eval_files=[]" "data.media_root=$WORK/data" data.num_workers=2 training.prompts_per_step=4
     algorithm.rollouts_per_prompt=4 training.micro_batch_size=4 "training.train_steps=$STEPS"
     training.eval_interval=0 training.eval_at_end=false checkpoint.save_interval=0 checkpoint.keep_last=2
     logging.log_interval=1 algorithm.reward_function=trainer_fixture:text_reward)

job_state() { scontrol show job "$1" 2>/dev/null | grep -oE 'JobState=[A-Z_]+' | cut -d= -f2; }
job_field() { scontrol show job "$1" 2>/dev/null | grep -oE "$2=[^ ]+" | cut -d= -f2; }
wait_job() {  # JOB TIMEOUT_S: until the job is COMPLETED (exit 0) or another final state (exit 1)
  local job="$1" limit="$2" t0=$SECONDS state=""
  while (( SECONDS - t0 < limit )); do
    state="$(job_state "$job")"
    case "$state" in
      COMPLETED) return 0 ;;
      FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) say "job $job ended $state"; return 1 ;;
    esac
    sleep 2
  done
  say "job $job still $state after ${limit}s"
  return 1
}
fail() { say "FAILED: $*"; for f in "$WORK"/*.out; do echo "--- $f"; tail -n 30 "$f"; done; exit 1; }
metrics_steps() { [[ -f "$1/metrics.jsonl" ]] && "$PY" -c 'import json,sys; print(sorted({json.loads(l)["step"] for l in open(sys.argv[1]) if l.strip()}))' "$1/metrics.jsonl" || echo "[]"; }

say "job 1: $STEPS steps, 2 srun tasks, to completion"
J1="$(sbatch --parsable -D "$ROOT" -o "$WORK/job1-%j.out" examples/slurm/train_cpu.sbatch "${RUN[@]}" "training.run_dir=$WORK/run1")"
wait_job "$J1" 900 || fail "job 1"
[[ -d "$WORK/run1/checkpoints/iter_$(printf %07d $STEPS)" ]] || fail "job 1 wrote no final checkpoint"
[[ ! -e "$WORK/run1/STOPPED_EARLY" ]] || fail "job 1 left a STOPPED_EARLY marker"
say "job 1 completed: checkpoint iter_$(printf %07d $STEPS), steps $(metrics_steps "$WORK/run1")"

say "job 2: the same run, SIGTERM after step 2, requeue, resume"
J2="$(RAL_TEST_HOLD_AFTER_STEP=2 RAL_TEST_HOLD_METRICS="$WORK/run2/metrics.jsonl" \
      sbatch --parsable -D "$ROOT" -o "$WORK/job2-%j.out" examples/slurm/train_cpu.sbatch "${RUN[@]}" "training.run_dir=$WORK/run2")"
t0=$SECONDS
until "$PY" -c 'import json,sys; sys.exit(0 if any(json.loads(l)["step"] >= 2 for l in open(sys.argv[1]) if l.strip()) else 1)' \
      "$WORK/run2/metrics.jsonl" 2>/dev/null; do
  (( SECONDS - t0 < 600 )) || fail "job 2 did not reach step 2"
  [[ "$(job_state "$J2")" =~ ^(COMPLETED|FAILED|CANCELLED)$ ]] && fail "job 2 ended before the signal"
  sleep 1
done
scancel --signal=TERM "$J2"
say "sent SIGTERM to job $J2's tasks (held in step 3)"
# the requeued job runs again from the checkpoint and completes
t0=$SECONDS
until [[ "$(job_field "$J2" Restarts)" -ge 1 ]] 2>/dev/null; do
  (( SECONDS - t0 < 600 )) || fail "job 2 was not requeued"
  [[ "$(job_state "$J2")" =~ ^(COMPLETED|FAILED|CANCELLED)$ ]] && [[ "$(job_field "$J2" Restarts)" == 0 ]] \
    && fail "job 2 ended $(job_state "$J2") without a requeue"
  sleep 2
done
say "job $J2 requeued (restarts: $(job_field "$J2" Restarts))"
wait_job "$J2" 900 || fail "job 2 after its requeue"
[[ -d "$WORK/run2/checkpoints/iter_$(printf %07d $STEPS)" ]] || fail "job 2 wrote no final checkpoint"
[[ ! -e "$WORK/run2/STOPPED_EARLY" ]] || fail "job 2 left its STOPPED_EARLY marker after finishing"
grep -q "stopped early, requeued" "$WORK"/job2-*.out || fail "job 2's log does not show the requeue"

"$PY" - "$WORK/run1/metrics.jsonl" "$WORK/run2/metrics.jsonl" <<'PYEOF' || fail "metrics differ"
import json, sys
def steps(path):
    out = {}
    for line in open(path):
        if line.strip():
            row = json.loads(line)
            out[row["step"]] = row            # a step run twice (before and after the signal) keeps its last row
    return out
a, b = steps(sys.argv[1]), steps(sys.argv[2])
assert sorted(a) == sorted(b), (sorted(a), sorted(b))
def values(row):
    return {k: v for k, v in row.items() if not k.startswith("perf/") and isinstance(v, (int, float))}
bad = [(s, values(a[s]), values(b[s])) for s in a if values(a[s]) != values(b[s])]
assert not bad, bad[:1]
keys = set().union(*(values(a[s]) for s in a))
moving = [s for s in a if (a[s].get("train/grad_norm") or 0) > 0 and a[s].get("loss/policy") not in (None, 0)]
assert len(moving) == len(a), f"steps without a gradient: {sorted(set(a) - set(moving))}"
print(f"[slurm-check] resumed run = uninterrupted run: {len(a)} steps x {len(keys)} metrics identical")
PYEOF
say "passed in $(( SECONDS - START )) s (jobs $J1, $J2)"
