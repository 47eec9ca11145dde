#!/usr/bin/env bash
# Runs the fuzz targets one after another and prints how many inputs each executed.
#
#   fuzz/run.sh [seconds-per-target] [target...]     (default: 600 s, every target)
#
# One libFuzzer process at a time (no -jobs/-workers: a single in-process worker). The checked-in seeds
# (fuzz/seeds/<target>/) are copied into the working corpus (fuzz/corpus/<target>/, not checked in) before
# each run; crashes land in fuzz/artifacts/<target>/, full logs in fuzz/logs/<target>.log. Extra libFuzzer
# flags: FUZZ_FLAGS="-max_len=4096 ...".
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."

seconds="${1:-600}"
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "usage: fuzz/run.sh [seconds-per-target] [target...]" >&2
    exit 2
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build || exit 1
mkdir -p fuzz/logs

declare -a rows
status=0
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    if [ -d "fuzz/seeds/$target" ]; then
        cp -n fuzz/seeds/"$target"/* "$corpus"/ 2>/dev/null || true
    fi
    log="fuzz/logs/$target.log"
    echo "== $target: ${seconds}s (log: $log)" >&2
    dict=()
    [ -f "fuzz/$target.dict" ] && dict=(-dict="fuzz/$target.dict")
    # shellcheck disable=SC2086
    cargo +nightly fuzz run "$target" "$corpus" -- "${dict[@]}" \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 ${FUZZ_FLAGS:-} \
        >"$log" 2>&1
    rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)"
    if [ -z "$execs" ]; then
        execs="$(sed -n 's/^#\([0-9]*\)[[:space:]].*/\1/p' "$log" | tail -1)"
    fi
    # libFuzzer's own rate, from its last status line (`#N DONE ... exec/s: R ...`).
    per_s="$(sed -n 's/^#[0-9]*[[:space:]].*exec\/s: \([0-9]*\).*/\1/p' "$log" | tail -1)"
    if [ $rc -eq 0 ]; then
        result="ok"
    else
        status=1
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)"
        result="FAILED (exit $rc) ${artifact:-see $log}"
    fi
    rows+=("$(printf '%-14s %12s %10s  %s' "$target" "${execs:-?}" "${per_s:--}" "$result")")
done

printf '\n%-14s %12s %10s  %s\n' target executions "execs/s" result
for row in "${rows[@]}"; do
    echo "$row"
done
exit $status
