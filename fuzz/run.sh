#!/usr/bin/env bash
# Fuzzes each target for $1 seconds (default 120), starting from the committed
# seeds. Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-120}
for t in wal segment; do
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run "$t" "corpus/$t" seeds/$t -- -max_total_time="$secs" -rss_limit_mb=2048
done
