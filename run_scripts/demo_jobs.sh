# Background jobs for run_scripts/demo.sh (sourced; needs $OUT): `background NAME CMD...` runs CMD beside the
# next steps with its output in $OUT/logs/NAME.log; `check NAME` finishes a job that has already ended, so a
# failure stops the demo early; `finish NAME` waits for it. A failed job fails the demo (exit 1) with the end of
# its log; on exit, and on Ctrl-C, every job still running is stopped, with its children.
declare -A JOB
set -m  # each background job in a process group of its own: a failed or interrupted demo stops all of it
background() {  # background NAME CMD...: CMD runs beside the next steps, its output in $OUT/logs/NAME.log
  local name=$1; shift
  "$@" > "$OUT/logs/$name.log" 2>&1 &
  JOB[$name]=$!
  echo "   ($name runs in the background: $OUT/logs/$name.log)"
}
finish() {  # finish NAME: wait for a background job; its failure fails the demo, with the end of its log
  local name=$1 rc=0
  [ -n "${JOB[$name]:-}" ] || return 0  # finished already (by `check`)
  wait "${JOB[$name]}" || rc=$?
  unset "JOB[$name]"
  if [ "$rc" != 0 ]; then
    echo "make demo: '$name' failed (exit status $rc); the end of $OUT/logs/$name.log:" >&2
    tail -n 40 "$OUT/logs/$name.log" >&2
    exit 1
  fi
  echo "   ($name done: $OUT/logs/$name.log)"
}
check() {  # check NAME: a background job that has already ended is finished now (a failure stops the demo early)
  if [ -n "${JOB[$1]:-}" ] && ! kill -0 "${JOB[$1]}" 2>/dev/null; then finish "$1"; fi
}
stop_jobs() { for pid in "${JOB[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; }
trap stop_jobs EXIT
trap 'exit 130' INT TERM
