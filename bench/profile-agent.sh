#!/bin/bash
# Runs `interceptor run` under a profiler, for per-connection counts that do not depend on the
# machine's load (bench/README.md, "Per-connection work, counted"); every other subcommand
# (probe, flows) runs as is. Give this script as the bench's agent, with a fixed amount of work:
#
#   PROFILE_AGENT=target/release/interceptor PROFILE_TOOL=callgrind PROFILE_OUT=/tmp/prof \
#     interceptor-bench run --rounds 1 --no-warmup --modes relay --workloads churn \
#     --topology cross-node --agent bench/profile-agent.sh --churn-count 250
#
# PROFILE_TOOL: callgrind (valgrind, one callgrind.<pid> per agent), strace (`strace -f -c`,
# one strace.<pid> summary per agent) or perf (`perf stat` of scheduler and system-call
# tracepoints, one perf.<pid> per agent: context switches, wake-ups, futex and epoll_wait
# calls; tracepoints barely slow the agent, so its wake-up pattern stays as it is, which
# `strace` changes). A count per connection is the difference of two runs (e.g. 250 and 50
# connections) divided by the difference in connections; per round trip, divide a `rr64`
# run's counts by its `round_trips`. record: `perf record -g` samples (perf.data.<pid>), where
# the time goes, for `perf report`.
set -u
real=${PROFILE_AGENT:?the agent binary}
out=${PROFILE_OUT:?a directory for the profiles}
tool=${PROFILE_TOOL:-callgrind}
# Only the agent itself (`run --config FILE`); `run --help` (the bench's check) and the rest
# run as they are.
if [ "${1:-}" != run ] || [ "${2:-}" != --config ]; then exec "$real" "$@"; fi
mkdir -p "$out"
# `run --config FILE`: a profiled agent is tens of times slower, so the server's first-byte
# wait and the handshake bound grow (the bench writes 200 and 5000 ms).
sed -i 's/"firstByteWaitMs": 200/"firstByteWaitMs": 10000/; s/"handshakeTimeoutMs": 5000/"handshakeTimeoutMs": 30000/' "$3"
case $tool in
callgrind) valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.%p" "$real" "$@" 2>>"$out/valgrind.log" & ;;
strace) strace -f -c -o "$out/strace.$$" "$real" "$@" & ;;
perf) perf stat -x, -o "$out/perf.$$" -e "${PROFILE_EVENTS:-task-clock,sched:sched_switch,sched:sched_wakeup,sched:sched_migrate_task,raw_syscalls:sys_enter,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto}" "$real" "$@" & ;;
record) perf record -q -F "${PROFILE_FREQ:-4999}" -g -o "$out/perf.data.$$" "$real" "$@" 2>>"$out/perf-record.log" & ;;
*) echo "PROFILE_TOOL: callgrind, strace, perf or record, not $tool" >&2; exit 2 ;;
esac
pid=$!
# The bench stops the agent with SIGTERM: pass it on (to the agent itself under strace or perf:
# strace would detach and leave it running, perf would stop counting before the agent's end)
# and wait until the profile is written.
stop() {
  if [ "$tool" = callgrind ]; then kill -TERM $pid; else kill -TERM $(pgrep -P $pid); fi
}
trap stop TERM INT
wait $pid
wait $pid
