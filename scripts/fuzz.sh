#!/usr/bin/env bash
# Builds every cargo-fuzz target of fuzz/ and runs each for SECONDS (default 30), one after the
# other, on a scratch copy of its committed corpus (fuzz/corpus/TARGET stays as committed), and
# prints executions, coverage and corpus size per target. Exits non-zero if any target crashed
# (panic, sanitizer error, timeout or out-of-memory); the input is saved under
# fuzz/artifacts/TARGET/ and the end of libFuzzer's log printed. Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`).
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_JOBS=N  run N targets at once (default 1)
set -euo pipefail

seconds="${1:-30}"
shift || true
cd "$(dirname "$0")/.."
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build -O
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

run_one() {
    local target="$1"
    mkdir -p "$scratch/$target"
    cp -r "fuzz/corpus/$target/." "$scratch/$target/"
    if cargo +nightly fuzz run -O "$target" "$scratch/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 \
        >"$scratch/$target.log" 2>&1; then
        echo "$target: ok ($(grep -E '^stat::number_of_executed_units' "$scratch/$target.log" | awk '{print $2}') execs," \
            "$(grep -Eo 'cov: [0-9]+' "$scratch/$target.log" | tail -1), corpus $(ls "$scratch/$target" | wc -l) files)"
    else
        echo "$target: CRASH (log below; input saved under fuzz/artifacts/$target/)"
        tail -n 60 "$scratch/$target.log"
        return 1
    fi
}

jobs="${FUZZ_JOBS:-1}"
status=0
pids=()
for target in "${targets[@]}"; do
    run_one "$target" &
    pids+=($!)
    if [ ${#pids[@]} -ge "$jobs" ]; then
        wait "${pids[0]}" || status=1
        pids=("${pids[@]:1}")
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
exit $status
