#!/usr/bin/env bash
# Runs the whole tiny BTX pipeline with btx-train alone (no scheduler): pretrain a seed, branch three experts,
# merge (BTX, BTM, sparse upcycling), router-finetune the MoEs, evaluate everything per domain.
# usage: run-tiny-btx.sh BTX_TRAIN WORK_DIR [STEPS_SCALE]    (STEPS_SCALE 1 = the tiny-btx.yaml step counts)
set -euo pipefail
train=${1:?usage: run-tiny-btx.sh BTX_TRAIN WORK_DIR [STEPS_SCALE]}
work=$(realpath -m "${2:?usage: run-tiny-btx.sh BTX_TRAIN WORK_DIR [STEPS_SCALE]}")
scale=${3:-1}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"
[ -d "$work/data/math" ] || "$here/make-tiny-corpora.sh" "$work/data" 400000
d=$work/data
steps() { awk -v s="$1" -v k="$scale" 'BEGIN { n = int(s * k); print (n < 1 ? 1 : n) }'; }
T='{"batch_tokens": 4096, "seq_len": 128, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup": 20, "schedule": "cosine",
    "weight_decay": 0.1, "grad_clip": 1.0, "seed": 1234, "checkpoint_every": 50, "log_every": 25}'

run() {  # run NAME KIND SPEC_JSON
  local name=$1 kind=$2 spec=$3
  if [ -d "$work/$name" ]; then echo "== $name: done earlier"; return; fi
  cat > "$work/$name.json" <<JOB
{"job_id": "$name", "attempt": 1, "pipeline": "tiny-btx", "kind": "$kind", "name": "$name",
 "output_dir": "$work/$name", "checkpoint_dir": "$work/checkpoints/$name", "threads": ${THREADS:-2},
 "device": "cpu", "spec": $spec}
JOB
  echo "== $name ($kind)"
  "$train" --job "$work/$name.json" --progress-fd 1 | grep -E '"(progress|done)"' | tail -n 2
}

run seed pretrain "{\"init\": {\"preset\": \"tiny\"}, \"tokenizer\": \"byte\", \"train\": $T, \"steps\": $(steps 200),
  \"data\": {\"train\": [\"$d/code/train.txt\", \"$d/prose/train.txt\", \"$d/math/train.txt\"], \"valid\": [\"$d/prose/valid.txt\"]}}"
for e in code math prose; do
  run "expert-$e" branch "{\"seed\": \"$work/seed\", \"name\": \"$e\", \"train\": $T, \"steps\": $(steps 150),
    \"data\": {\"train\": \"$d/$e/train.txt\", \"valid\": \"$d/$e/valid.txt\"}}"
done
experts="[{\"name\": \"code\", \"model\": \"$work/expert-code\"}, {\"name\": \"math\", \"model\": \"$work/expert-math\"},
          {\"name\": \"prose\", \"model\": \"$work/expert-prose\"}]"
prompts="{\"code\": \"$d/code/valid.txt\", \"math\": \"$d/math/valid.txt\", \"prose\": \"$d/prose/valid.txt\"}"
run moe-btx merge "{\"method\": \"btx\", \"seed\": \"$work/seed\", \"experts\": $experts, \"keep_seed_expert\": true,
  \"router_init\": \"hidden\", \"top_k\": 2, \"data\": $prompts}"
run moe-upcycle merge "{\"method\": \"upcycle\", \"seed\": \"$work/seed\", \"num_experts\": 4, \"top_k\": 2}"
run btm merge "{\"method\": \"btm\", \"experts\": $experts}"
mixture="[{\"name\": \"code\", \"weight\": 1, \"train\": \"$d/code/train.txt\", \"valid\": \"$d/code/valid.txt\"},
          {\"name\": \"math\", \"weight\": 1, \"train\": \"$d/math/train.txt\", \"valid\": \"$d/math/valid.txt\"},
          {\"name\": \"prose\", \"weight\": 1, \"train\": \"$d/prose/train.txt\", \"valid\": \"$d/prose/valid.txt\"}]"
for m in btx upcycle; do
  run "moe-$m-ft" finetune "{\"model\": \"$work/moe-$m\", \"mixture\": $mixture, \"train\": $T, \"steps\": $(steps 100),
    \"top_k\": 2, \"load_balance\": 0.01, \"z_loss\": 0.001, \"router\": \"softmax_topk\"}"
done
run eval eval "{\"models\": [{\"name\": \"seed\", \"model\": \"$work/seed\"},
    {\"name\": \"expert-code\", \"model\": \"$work/expert-code\"}, {\"name\": \"expert-math\", \"model\": \"$work/expert-math\"},
    {\"name\": \"expert-prose\", \"model\": \"$work/expert-prose\"},
    {\"name\": \"ensemble\", \"ensemble\": [\"$work/expert-code\", \"$work/expert-math\", \"$work/expert-prose\"]},
    {\"name\": \"btm\", \"model\": \"$work/btm\"}, {\"name\": \"upcycle\", \"model\": \"$work/moe-upcycle-ft\"},
    {\"name\": \"btx\", \"model\": \"$work/moe-btx-ft\"}],
  \"domains\": [{\"name\": \"code\", \"valid\": \"$d/code/valid.txt\"}, {\"name\": \"math\", \"valid\": \"$d/math/valid.txt\"},
                {\"name\": \"prose\", \"valid\": \"$d/prose/valid.txt\"}], \"max_tokens\": 16384, \"seq_len\": 128}"
python3 - "$work/eval/eval.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
doms = e["domains"]
print(f"{'model':<14}" + "".join(f"{d:>10}" for d in doms) + f"{'avg':>10}   (validation loss, nats/token)")
for name, r in e["models"].items():
    print(f"{name:<14}" + "".join(f"{r['domains'][d]['loss']:>10.3f}" for d in doms) + f"{r['avg_loss']:>10.3f}")
PY
