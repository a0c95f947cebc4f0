#!/bin/bash
# Runs `interceptor run` under a profiler, for per-connection counts that do not depend on the
# machine's load (bench/README.md, "Per-connection work, counted"); every other subcommand
# (probe, flows) runs as is. Give this script as the bench's agent, with a fixed amount of work:
#
#   PROFILE_AGENT=target/release/interceptor PROFILE_TOOL=callgrind PROFILE_OUT=/tmp/prof \
#     interceptor-bench run --rounds 1 --no-warmup --modes relay --workloads churn \
#     --topology cross-node --agent bench/profile-agent.sh --churn-count 250
#
# PROFILE_TOOL: callgrind (valgrind, one callgrind.<pid> per agent) or strace (`strace -f -c`,
# one strace.<pid> summary per agent). A count per connection is the difference of two runs
# (e.g. 250 and 50 connections) divided by the difference in connections.
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
*) echo "PROFILE_TOOL: callgrind or strace, not $tool" >&2; exit 2 ;;
esac
pid=$!
# The bench stops the agent with SIGTERM: pass it on (to the agent itself under strace, which
# would otherwise detach and leave it running) and wait until the profile is written.
stop() {
  if [ "$tool" = strace ]; then kill -TERM $(pgrep -P $pid); else kill -TERM $pid; fi
}
trap stop TERM INT
wait $pid
wait $pid
