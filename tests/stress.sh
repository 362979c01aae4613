#!/usr/bin/env bash
# `make test-stress`: the whole suite, RUNS times (default 3), on a machine kept busy by two
# busy-loop processes per core, each run in another file order (as written, reversed, shuffled).
# A test that fails here and not under `make test` races (waits on time, not on a condition) or
# leans on another test's state. Not part of `make test`: it takes 3-4 times as long.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
py=${PY:-.venv/bin/python}
load=$(( 2 * $(nproc) ))

pids=()
stop_load() { kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; }
trap stop_load EXIT
for _ in $(seq "$load"); do
    ( while :; do :; done ) &
    pids+=($!)
done
echo "load: $load busy loops on $(nproc) cores"

mapfile -t files < <(ls tests/test_*.py)
failed=0
for run in $(seq "$runs"); do
    case $(( (run - 1) % 3 )) in
        0) order=("${files[@]}"); how="as written" ;;
        1) mapfile -t order < <(printf '%s\n' "${files[@]}" | tac); how="reversed" ;;
        2) mapfile -t order < <(printf '%s\n' "${files[@]}" | shuf --random-source=<(yes "$run")); how="shuffled" ;;
    esac
    start=$SECONDS
    if "$py" -m pytest -q -p no:cacheprovider "${order[@]}" > "/tmp/gptkit-stress-$run.log" 2>&1; then
        result="passed"
    else
        result="FAILED"
        failed=$((failed + 1))
    fi
    echo "run $run/$runs ($how order, load average $(cut -d' ' -f1 /proc/loadavg)): $result in $((SECONDS - start)) s;" \
         "$(tail -1 "/tmp/gptkit-stress-$run.log")"
    grep -E "^(FAILED|ERROR) " "/tmp/gptkit-stress-$run.log" || true
done
echo "$failed of $runs runs failed (logs: /tmp/gptkit-stress-*.log)"
[ "$failed" -eq 0 ]
