#!/usr/bin/env python3
"""Interop check of btx model directories against Hugging Face transformers (an independent implementation).

1. transformers builds random LlamaForCausalLM models (untied, tied, sharded) and saves them; btx loads them
   and its logits must match within 1e-4 relative (max |diff| / max |logit|).
2. btx writes a random Llama; transformers loads it; logits match.
3. btx merges dense experts into a Mixtral (btx-train merge); MixtralForCausalLM loads it; logits match.
   transformers' own random Mixtral is loaded by btx as well.
4. The whole BTX path with btx-train: pretrain a tiny seed, branch two experts, merge (btx with the seed kept
   and hidden-state router init; sparse upcycling), router-finetune; every MoE loads in MixtralForCausalLM with
   logits and per-layer router logits matching ours and the same top-k experts chosen for every token
   (transformers' Mixtral routing: softmax over all experts, top-k, renormalised). The upcycled MoE also
   matches transformers' LlamaForCausalLM of the seed.
5. A merged MoE with routers made sharp (gates scaled up, so that any difference in routing semantics shows in
   the logits), saved by transformers and loaded by btx.

usage: interop_hf.py --tool btx-model-tool --train btx-train --workdir DIR
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from hf_common import compare, randomize_vectors, run_job

TOKENS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 3, 200, 257]


def btx_outputs(tool, model_dir, out):
    subprocess.run([tool, "logits", model_dir, out] + [str(t) for t in TOKENS], check=True)
    return load_file(out)


def btx_logits(tool, model_dir, out):
    return btx_outputs(tool, model_dir, out)["logits"].double()


def hf_logits(model):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits.double()


def hf_moe_outputs(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([TOKENS]), output_router_logits=True)
    return out.logits.double(), [r.double() for r in out.router_logits]


def same_experts(what, ours, theirs, top_k):
    """Top-k experts per token from each side's router logits, as Mixtral picks them. Tokens whose k-th and
    (k+1)-th probabilities are within 1e-5 are a tie either side may break, and are not compared."""
    ok = True
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
        sa = pa.sort(-1, descending=True).values
        decided = (sa[:, top_k - 1] - sa[:, top_k]) > 1e-5 if sa.shape[1] > top_k else torch.ones(len(sa), dtype=torch.bool)
        ia = pa.topk(top_k, -1).indices.sort(-1).values
        ib = pb.topk(top_k, -1).indices.sort(-1).values
        differ = ((ia != ib).any(-1) & decided).sum().item()
        if differ:
            print(f"{what}: layer {layer}: {differ} tokens routed to other experts (MISMATCH)")
            ok = False
    if ok:
        print(f"{what}: same top-{top_k} experts for every token in every layer (ok)")
    return ok


def compare_moe(what, tool, model_dir, mx):
    """Logits, router logits and expert choices of btx and transformers' MixtralForCausalLM on one directory."""
    ours = btx_outputs(tool, model_dir, model_dir + ".logits")
    logits, router = hf_moe_outputs(mx)
    layers = mx.config.num_hidden_layers
    ok = compare(what, ours["logits"].double(), logits)
    ours_router = [ours[f"router_logits.{l}"].double() for l in range(layers)]
    ok &= compare(what + " router logits", torch.cat(ours_router), torch.cat(router))
    ok &= same_experts(what, ours_router, router, mx.config.num_experts_per_tok)
    return ok


def run_job_ok(train, workdir, name, kind, spec):
    """Runs one btx-train job that must succeed and returns its output directory."""
    out, err = run_job(train, workdir, name, kind, spec)
    if out is None:
        raise RuntimeError(f"btx-train {kind} job {name} failed:\n{err}")
    return out


def write_corpora(workdir):
    """Three small text domains with distinct byte statistics."""
    d = os.path.join(workdir, "data")
    os.makedirs(d, exist_ok=True)
    text = {
        "code": "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)),
        "math": "".join(f"{a} + {b} = {a + b}\n" for a, b in ((i * 37 % 1000, i * 91 % 1000) for i in range(900))),
        "prose": "".join(f"The {w} fox jumps over the lazy dog number {i}. " for i, w in
                         zip(range(500), ["quick", "brown", "sly", "red"] * 125)),
    }
    paths = {}
    for name, t in text.items():
        paths[name] = os.path.join(d, name + ".txt")
        with open(paths[name], "w") as f:
            f.write(t)
    return paths


def tiny_llama(**kw):
    cfg = dict(vocab_size=259, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=256,
               bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    cfg.update(kw)
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    w = a.workdir
    os.makedirs(w, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    ok = True

    # 1. transformers -> btx
    for name, kw, shard in [("hf_llama", {}, None), ("hf_llama_tied", {"tie_word_embeddings": True}, None),
                            ("hf_llama_sharded", {"num_key_value_heads": 4}, "60KB")]:
        torch.manual_seed(1)
        m = LlamaForCausalLM(LlamaConfig(**tiny_llama(**kw)))
        randomize_vectors(m, 2)
        d = os.path.join(w, name)
        if shard:
            m.save_pretrained(d, safe_serialization=True, max_shard_size=shard)
            assert os.path.exists(os.path.join(d, "model.safetensors.index.json")), "expected a sharded save"
        else:
            m.save_pretrained(d, safe_serialization=True)
        ok &= compare(f"transformers {name} -> btx", btx_logits(a.tool, d, os.path.join(w, name + ".logits")),
                      hf_logits(m))

    # 2. btx -> transformers (dense)
    cfg_path = os.path.join(w, "btx_llama_config.json")
    with open(cfg_path, "w") as f:
        json.dump(dict(tiny_llama(), model_type="llama", architectures=["LlamaForCausalLM"]), f)
    dirs = {}
    for name, seed in [("seed", 11), ("code", 12), ("math", 13)]:
        dirs[name] = os.path.join(w, "btx_" + name)
        subprocess.run([a.tool, "init", dirs[name], cfg_path, str(seed)], check=True)
    m = LlamaForCausalLM.from_pretrained(dirs["seed"], torch_dtype=torch.float32)
    ok &= compare("btx llama -> transformers", btx_logits(a.tool, dirs["seed"], os.path.join(w, "seed.logits")),
                  hf_logits(m))

    # 3. btx merge -> transformers Mixtral
    for top_k, keep_seed in [(2, True), (1, False)]:
        out = os.path.join(w, f"btx_moe_k{top_k}")
        job = {"kind": "merge", "output_dir": out, "threads": 2,
               "spec": {"method": "btx", "seed": dirs["seed"], "keep_seed_expert": keep_seed, "top_k": top_k,
                        "router_init": "random",
                        "experts": [{"name": "code", "model": dirs["code"]}, {"name": "math", "model": dirs["math"]}]}}
        job_path = out + ".json"
        with open(job_path, "w") as f:
            json.dump(job, f)
        subprocess.run([a.train, "--job", job_path, "--progress-fd", "-1"], check=True)
        mx = MixtralForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
        assert mx.config.num_local_experts == (3 if keep_seed else 2)
        ok &= compare_moe(f"btx merged mixtral (top_k={top_k}) -> transformers", a.tool, out, mx)

    # 4. the BTX path with btx-train: pretrain, branch, merge (btx, upcycle), finetune
    data = write_corpora(w)
    train = {"batch_tokens": 512, "seq_len": 64, "lr": 3e-3, "warmup": 1, "checkpoint_every": 100, "log_every": 10,
             "valid_tokens": 256, "seed": 7}
    seed = run_job_ok(a.train, w, "pt_seed", "pretrain",
                   {"init": {"preset": "tiny"}, "tokenizer": "byte", "train": train, "steps": 4,
                    "data": {"train": list(data.values())}})
    experts = []
    for name in ("code", "math"):
        run_job_ok(a.train, w, "pt_" + name, "branch",
                {"seed": seed, "name": name, "train": train, "steps": 4, "data": {"train": data[name]}})
        experts.append({"name": name, "model": os.path.join(w, "pt_" + name)})
    btx = run_job_ok(a.train, w, "pt_btx", "merge",
                  {"method": "btx", "seed": seed, "experts": experts, "keep_seed_expert": True, "top_k": 2,
                   "router_init": "hidden", "data": [{"name": e["name"], "train": data[e["name"]]} for e in experts]})
    up = run_job_ok(a.train, w, "pt_upcycle", "merge", {"method": "upcycle", "seed": seed, "num_experts": 4, "top_k": 2})
    ft = run_job_ok(a.train, w, "pt_btx_ft", "finetune",
                 {"model": btx, "train": train, "steps": 4, "top_k": 2, "load_balance": 0.01, "z_loss": 0.001,
                  "router": "softmax_topk",
                  "mixture": [{"name": n, "weight": 1, "train": p} for n, p in data.items()]})
    for what, d in [("btx-train merge btx (hidden router, seed kept)", btx), ("btx-train merge upcycle", up),
                    ("btx-train finetuned btx MoE", ft)]:
        mx = MixtralForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
        ok &= compare_moe(what + " -> transformers", a.tool, d, mx)
    assert MixtralForCausalLM.from_pretrained(btx).config.num_local_experts == 3
    # Every upcycled expert is the seed's FFN and the gates sum to one: the MoE computes the dense model.
    ok &= compare("upcycled mixtral (transformers) vs seed llama (transformers)",
                  hf_logits(MixtralForCausalLM.from_pretrained(up, torch_dtype=torch.float32)),
                  hf_logits(LlamaForCausalLM.from_pretrained(seed, torch_dtype=torch.float32)))

    # 5. sharp routers, written by transformers, read by btx
    mx = MixtralForCausalLM.from_pretrained(btx, torch_dtype=torch.float32)
    with torch.no_grad():
        for layer in mx.model.layers:
            layer.block_sparse_moe.gate.weight.mul_(25.0)
    sharp = os.path.join(w, "hf_sharp_mixtral")
    mx.save_pretrained(sharp, safe_serialization=True)
    ok &= compare_moe("transformers mixtral with sharp routers -> btx", a.tool, sharp, mx)

    # transformers Mixtral -> btx
    torch.manual_seed(3)
    mcfg = MixtralConfig(**tiny_llama(), num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    mx = MixtralForCausalLM(mcfg)
    randomize_vectors(mx, 4)
    d = os.path.join(w, "hf_mixtral")
    mx.save_pretrained(d, safe_serialization=True)
    ok &= compare("transformers mixtral -> btx", btx_logits(a.tool, d, d + ".logits"), hf_logits(mx))

    print("interop: PASS" if ok else "interop: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
