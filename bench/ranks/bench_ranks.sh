#!/usr/bin/env bash
# Data-parallel scaling of btx-train on CPU: tokens/s of one rank against R ranks (1 thread each) on the same
# job and global batch, measured in the same run. Prints the ratio. Not a test.
# The machine's speed drifts, so one rank and R ranks alternate for ROUNDS rounds and the median ratio is reported.
#   usage: bench/ranks/bench_ranks.sh [BTX_TRAIN (default build/bin/btx-train)] [RANKS (default 2)] [STEPS (default 40)]
#          [ROUNDS (default 3)]
#   environment: ZERO (train.zero of the job, default 1: ZeRO-1), and what btx-train reads itself, e.g.
#   BTX_DIST_OVERLAP (default 1) and BTX_DIST_BUCKET_BYTES (default 25 MiB: one bucket for the tiny model, so
#   nothing to overlap; 65536 gives it 6).
set -euo pipefail
train=$(realpath "${1:-build/bin/btx-train}")
ranks=${2:-2}
steps=${3:-40}
rounds=${4:-3}
zero=${ZERO:-1}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
python3 - "$dir" <<'PY'
import sys
d = sys.argv[1]
with open(d + "/train.txt", "w") as f:
    f.write("".join(f"line {i % 97}: the quick brown fox jumps over {i % 13} lazy dogs.\n" for i in range(20000)))
PY
job() {  # name world
  cat > "$dir/$1.json" <<JSON
{"kind": "pretrain", "name": "$1", "output_dir": "$dir/$1", "threads": 1,
 "spec": {"init": {"preset": "tiny"}, "data": {"train": "$dir/train.txt"},
          "train": {"batch_tokens": 8192, "seq_len": 128, "lr": 1e-3, "warmup": 2, "log_every": $steps,
                    "checkpoint_every": 0, "valid_tokens": 128, "zero": $zero}, "steps": $steps}}
JSON
}
rate() { python3 -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if '\"progress\"' in l][-1]['tokens_per_s'])" "$1"; }
ratios=()
for round in $(seq "$rounds"); do
  rm -rf "$dir/one" "$dir/many"
  job one
  "$train" --job "$dir/one.json" 3>"$dir/one.events" >/dev/null 2>&1
  job many
  "$train" --store-server 0 >"$dir/port" 2>/dev/null &
  store=$!
  for _ in $(seq 100); do grep -q port "$dir/port" && break; sleep 0.05; done
  port=$(awk '{print $2}' "$dir/port")
  pids=()
  for r in $(seq 0 $((ranks - 1))); do
    BTX_RANK=$r BTX_WORLD_SIZE=$ranks BTX_RENDEZVOUS=127.0.0.1:$port "$train" --job "$dir/many.json" \
      3>"$dir/many.$r.events" >/dev/null 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  kill "$store"; wait "$store" 2>/dev/null || true
  one=$(rate "$dir/one.events")
  many=$(rate "$dir/many.0.events")
  ratio=$(python3 -c "import sys; print(f'{float(sys.argv[2]) / float(sys.argv[1]):.2f}')" "$one" "$many")
  ratios+=("$ratio")
  printf 'round %d: 1 rank %.0f tokens/s, %d ranks %.0f tokens/s, ratio %sx\n' "$round" "$one" "$ranks" "$many" "$ratio"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}')
echo "median ratio ${median}x over $rounds rounds (tiny preset, seq 128, 64 sequences per step, 1 thread per rank)"
