#!/usr/bin/env bash
# Builds three tiny domain corpora (code, prose, math) from text found on any Debian machine, nothing
# downloaded: C headers under /usr/include, licence texts and docs under /usr/share, generated arithmetic.
# usage: make-tiny-corpora.sh OUT_DIR [BYTES_PER_DOMAIN]   -> OUT_DIR/{code,prose,math}/{train,valid}.txt
set -eu  # no pipefail: `head -c` closes pipes early on purpose
out=${1:?usage: make-tiny-corpora.sh OUT_DIR [BYTES_PER_DOMAIN]}
bytes=${2:-400000}
valid=$((bytes / 10))
mkdir -p "$out/code" "$out/prose" "$out/math"

# Sorted file lists keep the corpora identical across runs on the same machine.
collect() {  # collect LIMIT FILE... : concatenates files until LIMIT bytes
  local limit=$1; shift
  local f
  for f in "$@"; do
    [ -f "$f" ] && [ -r "$f" ] || continue
    cat "$f"; printf '\n'
  done | head -c "$limit"
}

split_corpus() {  # split_corpus DIR : all.txt -> train.txt + valid.txt (last 10%)
  local dir=$1 size
  size=$(wc -c < "$dir/all.txt")
  head -c $((size - size / 10)) "$dir/all.txt" > "$dir/train.txt"
  tail -c $((size / 10)) "$dir/all.txt" > "$dir/valid.txt"
  rm "$dir/all.txt"
}

mapfile -t code_files < <(find /usr/include -maxdepth 2 -name '*.h' -type f 2>/dev/null | LC_ALL=C sort)
collect $((bytes + valid)) "${code_files[@]}" > "$out/code/all.txt"

mapfile -t prose_files < <( (find /usr/share/common-licenses -type f; \
  find /usr/share/doc -maxdepth 2 \( -name 'README*' -o -name 'copyright' \) -type f ! -name '*.gz') 2>/dev/null | LC_ALL=C sort)
collect $((bytes + valid)) "${prose_files[@]}" > "$out/prose/all.txt"

# Deterministic arithmetic: a linear congruential generator, so the corpus is the same everywhere.
awk -v limit=$((bytes + valid)) 'BEGIN {
  s = 12345; n = 0
  while (n < limit) {
    s = (s * 1103515245 + 12345) % 2147483648; a = s % 1000
    s = (s * 1103515245 + 12345) % 2147483648; b = s % 1000
    s = (s * 1103515245 + 12345) % 2147483648; op = s % 3
    if (op == 0) line = a " + " b " = " (a + b)
    else if (op == 1) line = a " - " b " = " (a - b)
    else line = (a % 100) " * " (b % 100) " = " ((a % 100) * (b % 100))
    print line; n += length(line) + 1
  }
}' | head -c $((bytes + valid)) > "$out/math/all.txt"

for d in code prose math; do
  split_corpus "$out/$d"
  [ -s "$out/$d/train.txt" ] || { echo "make-tiny-corpora: no text found for $d" >&2; exit 1; }
done
echo "make-tiny-corpora: wrote $(du -sh "$out" | cut -f1) to $out"
