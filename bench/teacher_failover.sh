#!/bin/bash
# A tiny job with 2 teachers; teacher 0 is SIGSTOPped at step 20 for 12 s, then SIGCONT.
# Prints the steps trained meanwhile, the failover/rejoin log lines, the largest and smallest
# batch, the pool counters, and every listening socket of the job's processes.
# Usage (repository root): bash bench/teacher_failover.sh [RUN_ROOT]   (STEPS=150 by default)
set -u
R=${1:-/tmp/asyncopd-teacher-failover}; rm -rf $R; mkdir -p $R
PYTHON=${PYTHON:-.venv/bin/python}
timeout 600 $PYTHON -m asyncopd.launch --config-name tiny run.dir=$R/run \
  learner.num_steps=${STEPS:-150} cluster.teachers=2 teacher.silence_timeout_s=3 teacher.heartbeat_interval_s=0.5 \
  eval.enabled=false > $R/job.log 2>&1 &
JOB=$!
# wait until 20 steps are logged
for i in $(seq 1 400); do
  n=$(cat $R/run/metrics.jsonl 2>/dev/null | grep -c '"policy_version"')
  [ "$n" -ge 20 ] && break; sleep 0.5
done
echo "steps before stop: $n"
ss -ltnp > $R/ss.txt
PIDS=$(pgrep -f "run.dir=$R/run" | tr '\n' ' '); echo "job pids: $PIDS"
T0=""
for p in $(pgrep -f "run.dir=$R/run"); do
  if tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx 'RANK=2'; then T0=$p; fi
done
echo "teacher 0 pid: $T0"
kill -STOP $T0; date +%T.%N; sleep 12
n=$(grep -c '"policy_version"' $R/run/metrics.jsonl); echo "steps while stopped (at 12 s): $n"
kill -CONT $T0; date +%T.%N
wait $JOB; echo "job rc $?"
echo "--- listening sockets of the job's processes (ss at step 20):"
for p in $PIDS; do grep "pid=$p," $R/ss.txt | awk -v p=$p '{print p, $4}'; done
echo "--- log lines:"; grep -E "silent|answers again|resending|superseded|waiting" $R/job.log | head -20
$PYTHON - <<PY
import json
rows=[json.loads(l) for l in open("$R/run/metrics.jsonl") if '"batch/samples"' in l]
print("steps", len(rows), "batch/samples max", max(r["batch/samples"] for r in rows), "min", min(r["batch/samples"] for r in rows))
last=rows[-1]
print({k: last.get(k) for k in ("actor/teacher_failovers","actor/teacher_rejoins","actor/retries","actor/rollouts_unscored","buffer/duplicates","buffer/dropped_superseded","buffer/dropped_late")})
PY
tail -5 $R/job.log
