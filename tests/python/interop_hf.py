#!/usr/bin/env python3
"""Interop check of btx model directories against Hugging Face transformers (an independent implementation).

1. transformers builds random LlamaForCausalLM models (untied, tied, sharded) and saves them; btx loads them
   and its logits must match within 1e-4 relative (max |diff| / max |logit|).
2. btx writes a random Llama; transformers loads it; logits match.
3. btx merges dense experts into a Mixtral (btx-train merge); MixtralForCausalLM loads it; logits match.
   transformers' own random Mixtral is loaded by btx as well.

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

RTOL = 1e-4
TOKENS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 3, 200, 257]


def btx_logits(tool, model_dir, out):
    subprocess.run([tool, "logits", model_dir, out] + [str(t) for t in TOKENS], check=True)
    return load_file(out)["logits"].double()


def hf_logits(model):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits.double()


def compare(what, ours, theirs):
    rel = (ours - theirs).abs().max().item() / theirs.abs().max().item()
    status = "ok" if rel <= RTOL else "MISMATCH"
    print(f"{what}: max relative difference {rel:.2e} ({status})")
    return rel <= RTOL


def tiny_llama(**kw):
    cfg = dict(vocab_size=259, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=256,
               bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    cfg.update(kw)
    return cfg


def randomize_norms(model, seed):
    # HF initialises RMSNorm weights to 1, which would hide a norm mix-up.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


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
        randomize_norms(m, 2)
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
        ok &= compare(f"btx merged mixtral (top_k={top_k}) -> transformers",
                      btx_logits(a.tool, out, out + ".logits"), hf_logits(mx))

    # transformers Mixtral -> btx
    torch.manual_seed(3)
    mcfg = MixtralConfig(**tiny_llama(), num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    mx = MixtralForCausalLM(mcfg)
    randomize_norms(mx, 4)
    d = os.path.join(w, "hf_mixtral")
    mx.save_pretrained(d, safe_serialization=True)
    ok &= compare("transformers mixtral -> btx", btx_logits(a.tool, d, d + ".logits"), hf_logits(mx))

    print("interop: PASS" if ok else "interop: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
