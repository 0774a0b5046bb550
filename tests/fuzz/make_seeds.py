#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora, so that no binary seed is committed.

usage: make_seeds.py <repo root> <spec corpus dir> <safetensors corpus dir>

Spec seeds: examples/tiny-btx.yaml plus hand-written specs reaching each planner branch (upcycle,
btm, seed.model, JSON syntax, anchors and aliases, quoting) and a few near misses. Safetensors seeds:
small valid files in every supported dtype, laid out as model/safetensors.cc writes them, and a
few near misses.
"""
import json
import os
import struct
import sys

SPECS = {
    "model-seed.yaml": """
name: m
seed: {model: /models/seed}
experts: [{name: a, data: {train: /d/a}}]
""",
    "upcycle.yaml": """
name: up
seed: {model: /models/seed}
experts:
  - {name: a, data: {train: [/d/a], valid: [/d/a-valid]}, steps: 5}
  - {name: b, data: {train: [/d/b]}}
merge: {method: upcycle}
finetune: {top_k: 1, steps: 1, freeze: [attention, embeddings, norms], router: sparsemixer}
evaluate: {baselines: [seed, experts, btm, upcycle]}
""",
    # Found by this fuzzer: a baseline named twice was planned as two jobs of one name.
    "repeated-baseline.yaml": """
name: rb
seed: {model: /models/seed}
experts: [{name: a, data: {train: /d/a}}]
evaluate: {baselines: [seed, upcycle, upcycle]}
""",
    "gang.yaml": """
name: g
seed: {model: /models/seed}
experts: [{name: a, data: {train: /d/a}}]
train: {zero: 3}
resources: {nodes_per_job: 4, ranks_per_job: 2}
""",
    "btm.yaml": """
name: btm
seed: {init: {preset: small, hidden_size: 128}, pretrain: {data: {train: /d/all}, steps: 10}}
tokenizer: /tok/spm.model
experts: [{name: x, data: {train: /d/x}}, {name: y, data: {train: /d/y}}]
merge: {method: btm, keep_seed_expert: true, router_init: hidden}
evaluate: {baselines: [btm], max_tokens: 1024}
resources: {gpus_per_job: 1, max_attempts: 5}
""",
    "hf-init.yaml": """
name: hf
seed:
  init: {preset: tiny, num_hidden_layers: 3, num_attention_heads: 8, num_key_value_heads: 2, hidden_size: 128,
         intermediate_size: 344, max_position_embeddings: 512, vocab_size: 0, rms_norm_eps: 1e-6,
         rope_theta: 500000.0, initializer_range: 0.02, tie_word_embeddings: true}
  pretrain: {data: {train: /d/all}, steps: 10}
tokenizer: {type: sentencepiece, vocab_size: 512}
experts: [{name: a, data: {train: /d/a}}]
""",
    "spm-object.yaml": """
name: spm
seed: {model: /models/seed}
tokenizer: {sentencepiece: /tok/spm.model}
experts: [{name: a, data: {train: /d/a}}]
""",
    "json.json": json.dumps({
        "name": "j", "seed": {"model": "/m"},
        "experts": [{"name": "a", "data": {"train": ["/a"]}, "steps": 3}],
        "train": {"seq_len": 64, "batch_tokens": 128, "lr": 0.001, "schedule": "linear"},
        "finetune": {"mixture": {"a": 0.5}, "load_balance": 0, "z_loss": 1e-5},
    }),
    "anchors.yaml": """
name: anchors
seed: {model: /m}
data: &d {train: [/d/shared], valid: [/d/v]}
experts:
  - {name: a, data: *d}
  - {name: b, data: *d}
""",
    "quoting.yaml": """
name: 'q.1'
seed: {model: "/models/with space"}
tokenizer: "byte"
experts:
  - name: "e-1"
    data:
      train: ["/d/1", '/d/2']
    steps: +12
train: {lr: .5e-3, grad_clip: 1., seed: 0, threads: ~, log_every: null}
merge: {keep_seed_expert: True}
""",
    "train-full.yaml": """
name: t
seed: {model: /m}
experts: [{name: a, data: {train: /a}}, {name: b, data: {train: /b}}, {name: c, data: {train: /c}}]
train: {batch_tokens: 4096, seq_len: 128, lr: 3e-3, min_lr_ratio: 0.1, warmup: 20, schedule: constant,
        weight_decay: 0.1, grad_clip: 1.0, grad_accum: 2, seed: 7, checkpoint_every: 5, threads: 2,
        log_every: 1, valid_tokens: 4096, keep_checkpoints: 3}
finetune: {top_k: 3, freeze: [experts, all_but_router]}
""",
    # Near misses: one wrong field each, so mutations hop between accepted and rejected.
    "bad-steps.yaml": "name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}, steps: -1}]\n",
    "bad-dup-key.yaml": "name: x\nname: y\n",
    "bad-nesting.yaml": "name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [[[[[[/x]]]]]]}}]\n",
    "bad-unknown.yaml": "name: x\nseed: {model: /m, pretrain: {}}\nexperts: [{name: a, data: {train: [/x]}}]\ncolour: blue\n",
    "bad-alias.yaml": "name: x\nseed: {init: {num_layers: 4}, pretrain: {data: {train: /p}}}\nexperts: [{name: a, data: {train: /x}}]\n",
}


def safetensors(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape, raw bytes)] -> file bytes, data in the order given."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-(len(h) + 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(*xs):
    return struct.pack("<%df" % len(xs), *xs)


def f16(*xs):
    return struct.pack("<%de" % len(xs), *xs)


def bf16(*xs):
    return b"".join(struct.pack("<f", x)[2:] for x in xs)


SAFETENSORS = {
    "f32.safetensors": safetensors([("w", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6))], {"format": "pt"}),
    "mixed.safetensors": safetensors([
        ("model.embed_tokens.weight", "BF16", [4, 2], bf16(*range(8))),
        ("model.layers.0.mlp.gate.weight", "F16", [2, 2], f16(0.5, -1, 2, 65504)),
        ("lm_head.weight", "F32", [3], f32(float("inf"), float("nan"), -0.0)),
    ], {"format": "pt", "btx": "1"}),
    "empty-and-scalar.safetensors": safetensors([
        ("empty", "F32", [0, 4], b""),
        ("scalar", "F16", [], f16(1.5)),
    ]),
    # Zero elements, with dimensions at the reader's limit (their product below 2^60): mutations land on
    # the overflow edge of shapes and strides.
    "huge-empty.safetensors": safetensors([("t", "BF16", [0, 1073741824, 1073741823], b"")]),
    "unpadded.safetensors": safetensors([("t", "F32", [1], f32(7))], pad=False),
    "no-tensors.safetensors": safetensors([], {"k": "v"}),
    # Near misses.
    "bad-size.safetensors": safetensors([("t", "F32", [3], f32(1, 2))]),
    "bad-dtype.safetensors": safetensors([("t", "I8", [2], b"\x01\x02")]),
    "bad-trailing.safetensors": safetensors([("t", "F32", [1], f32(1))]) + b"\0\0\0\0",
}


def main():
    root, spec_dir, st_dir = sys.argv[1:4]
    os.makedirs(spec_dir, exist_ok=True)
    os.makedirs(st_dir, exist_ok=True)
    with open(os.path.join(root, "examples", "tiny-btx.yaml"), "rb") as f:
        tiny = f.read()
    specs = dict(SPECS)
    specs["tiny-btx.yaml"] = tiny.decode()
    for name, text in specs.items():
        with open(os.path.join(spec_dir, "seed-" + name), "w") as f:
            f.write(text)
    for name, data in SAFETENSORS.items():
        with open(os.path.join(st_dir, "seed-" + name), "wb") as f:
            f.write(data)
    print("make_seeds: %d spec seeds, %d safetensors seeds" % (len(specs), len(SAFETENSORS)))


if __name__ == "__main__":
    main()
