#!/usr/bin/env bash
# Run the tiny workflow on a real single-node SLURM cluster started on this machine, through
# `--workflow-profile profiles/slurm`, and check that every job went through sbatch and finished.
#
# Needs: root, Debian (apt-get installs slurm-wlm and munge when missing), the project's venv
# (PYTHON=.venv/bin/python by default; the SLURM executor plugin is pip-installed into it when
# missing). Starts munged, slurmctld and slurmd by hand (no systemd) with a fake GPU (gres on
# /dev/null) and two partitions, cpu and gpu, on the one node; stops them on exit.
# Usage: tests/slurm/run.sh [WORKDIR]      (WORKDIR keeps the run, logs and slurm.conf)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WORK=$(realpath -m "${1:-$(mktemp -d /tmp/histosynth-slurm.XXXXXX)}")
mkdir -p "$WORK"/{state,spool,logs,run}
say() { echo "[slurm-test] $*"; }
die() { echo "[slurm-test] ERROR: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts slurmctld/slurmd)"
command -v apt-get > /dev/null || die "needs Debian's apt-get for slurm-wlm and munge"
[[ -x $PYTHON ]] || die "no Python at $PYTHON; run 'make venv' or set PYTHON"

if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
    say "installing slurm-wlm and munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge > "$WORK/logs/apt.log" 2>&1 \
        || die "apt-get install failed; see $WORK/logs/apt.log"
fi
"$PYTHON" -c "import snakemake_executor_plugin_slurm" 2> /dev/null \
    || "$PYTHON" -m pip install -q "snakemake-executor-plugin-slurm==2.8.0"

NODE=$(hostname -s)
CPUS=$(nproc)
MEMORY_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=histosynth
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/logs/slurmctld.log
SlurmdLogFile=$WORK/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
DefMemPerCPU=1000
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=3600
NodeName=$NODE CPUs=$CPUS RealMemory=$MEMORY_MB Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
CONF
echo "Name=gpu File=/dev/null Count=1" > /etc/slurm/gres.conf   # Count alone drains the node

started=()
started_munged=false
stop() {
    for pid in "${started[@]}"; do kill "$pid" 2> /dev/null || true; done
    wait 2> /dev/null || true
    if $started_munged; then kill "$(cat /run/munge/munged.pid)" 2> /dev/null || true; fi
}
trap stop EXIT

mkdir -p /run/munge && chown munge:munge /run/munge
if ! pgrep -x munged > /dev/null; then
    runuser -u munge -- munged   # daemonises; its pid file is /run/munge/munged.pid
    started_munged=true
fi
slurmctld -D > "$WORK/logs/slurmctld.out" 2>&1 & started+=($!)
sleep 2
slurmd -D > "$WORK/logs/slurmd.out" 2>&1 & started+=($!)
for _ in $(seq 30); do
    sinfo -h -o "%t" 2> /dev/null | grep -qx idle && break
    sleep 1
done
sinfo -h -o "%t" | grep -qx idle || die "node $NODE not idle: $(sinfo -N -l 2>&1); see $WORK/logs"
say "cluster up: $(sinfo -h -o '%P %D %t %G' | tr '\n' ';')"

# Without slurmdbd, sacct fails and the plugin would wait forever: query squeue, submit without an account.
say "running the tiny workflow through profiles/slurm in $WORK/run"
set +e
"$PYTHON" -m snakemake --snakefile "$REPO/Snakefile" --directory "$WORK/run" \
    --workflow-profile "$REPO/profiles/slurm" \
    --configfile "$REPO/config/config.yaml" "$REPO/config/tiny.yaml" \
    --slurm-status-command squeue --slurm-no-account --slurm-init-seconds-before-status-checks 5 \
    --jobs 4 --max-threads "$CPUS" --verbose > "$WORK/logs/snakemake.log" 2>&1
status=$?
set -e
[[ $status == 0 ]] || { tail -50 "$WORK/logs/snakemake.log"; die "snakemake exited with $status; see $WORK/logs/snakemake.log"; }

# Every job in the DAG but the target rule was submitted, and SLURM ran every submission to COMPLETED.
planned=$(awk '/^Job stats:/ {on=1; next} on && $1 == "total" {print $2; exit}' "$WORK/logs/snakemake.log")
submitted=$(grep -c "has been submitted with SLURM jobid" "$WORK/logs/snakemake.log" || true)
scontrol show job -o > "$WORK/logs/jobs.txt"
completed=$(grep -c "JobState=COMPLETED" "$WORK/logs/jobs.txt" || true)
gpu_jobs=$(grep -cE "gres[:/]gpu" "$WORK/logs/jobs.txt" || true)
gpu_sbatch=$(grep "sbatch call" "$WORK/logs/snakemake.log" | grep -c -- "--gpus=1" || true)
on_gpu_partition=$(grep "JobState=COMPLETED" "$WORK/logs/jobs.txt" | grep -c "Partition=gpu" || true)
say "jobs planned $planned (incl. rule all), submitted $submitted, COMPLETED $completed, with a GPU $gpu_jobs (sbatch --gpus=1: $gpu_sbatch, on partition gpu: $on_gpu_partition)"
say "SLURM jobs per rule (count, rule, state, partition, GPUs):"
awk '{
    gres = "no-gpu"
    for (i = 1; i <= NF; i++) {
        split($i, kv, "=")
        if (kv[1] == "JobState") state = kv[2]
        if (kv[1] == "Partition") partition = kv[2]
        if (kv[1] == "Comment") rule = kv[2]
        if (kv[1] == "TresPerJob") gres = kv[2]
    }
    sub(/^rule_/, "", rule); sub(/_wildcards.*/, "", rule)
    print rule, state, partition, gres
}' "$WORK/logs/jobs.txt" | sort | uniq -c
[[ $submitted -gt 0 && $submitted == $((planned - 1)) ]] || die "$submitted sbatch submissions for $planned planned jobs"
[[ $completed == "$submitted" ]] || die "only $completed of $submitted SLURM jobs COMPLETED; see $WORK/logs/jobs.txt"
[[ $gpu_sbatch -gt 0 && $gpu_sbatch == "$gpu_jobs" && $on_gpu_partition == "$gpu_jobs" ]] \
    || die "GPU jobs: $gpu_sbatch sbatch --gpus=1 lines, $gpu_jobs with gres/gpu, $on_gpu_partition on partition gpu"
grep -q "CUDA_VISIBLE_DEVICES=0 but torch sees no CUDA device" "$WORK"/run/logs/train_diffusion.log \
    || die "train_diffusion did not log its device as SLURM gave it"
[[ -s $WORK/run/results/report/metrics.csv ]] || die "no report table"
say "OK: the tiny workflow ran to completion through sbatch"
