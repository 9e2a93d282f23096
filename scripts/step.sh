# Sourced by the GPU scripts: `step NAME COMMAND...` runs COMMAND with its output in
# $logs/NAME.log, prints the log's tail, and records status and time in the `summary` array.
summary=()
step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  tail -n "${STEP_TAIL:-25}" "$logs/$name.log"
  summary+=("$(printf '%-22s %-8s %5ss' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL:$rc)" $((SECONDS - t0)))")
  return $rc
}
