#!/usr/bin/env python3
"""Model families against Hugging Face transformers (an independent implementation), fp32 logits within 1e-4.

For each family, with its features switched on (random weights made by transformers itself):
  - Llama 3.1/3.2: rope_scaling llama3, GQA, tied embeddings, a large vocabulary; linear and dynamic scaling
    (dynamic past max_position_embeddings, where the NTK base grows); Llama with attention_bias;
  - Mistral: sliding_window (sequences within it), head_dim given explicitly and != hidden/heads;
  - Qwen2/2.5: q/k/v bias, tied embeddings, rope_theta 1e6;
  - Gemma: GeGLU with tanh-approximated GELU, embeddings scaled by sqrt(hidden_size), RMSNorm scaling by
    (1 + weight) in float32, head_dim != hidden/heads, tied embeddings;
  - a seed stored in bf16, whose trained output stays bf16.
checks
  1. btx loads transformers' checkpoint: same logits;
  2. btx writes a random model of the family (btx-model-tool init): transformers loads it, same logits;
  3. btx-train trains it (a branch job on a seed without a tokenizer, byte fallback): transformers loads the
     trained output, same logits as btx;
  4. Llama/Mistral experts merged by btx-train become a Mixtral that MixtralForCausalLM loads with the same
     logits (rope scaling kept in config.json; transformers 4.46's Mixtral ignores it, so the check gives its
     rotary embedding the frequencies transformers' own rope_scaling code computes); Qwen2 experts become a
     Qwen2-MoE that Qwen2MoeForCausalLM loads with the same logits (its shared expert all zeros); Gemma experts
     become btx's own btx_gemma_moe layout (no transformers class), checked expert by expert: the MoE with every
     expert replaced by expert e (any routing then picks e) computes transformers' GemmaForCausalLM of expert e's
     dense model, and the MoE with its real routers equals transformers' Gemma layers around transformers'
     MixtralSparseMoeBlock (GeGLU experts); Mistral-Nemo-style head_dim seeds and Llama with attention_bias are
     refused for MoE methods with a clear message, and their BTM average loads in transformers;
  5. a Mistral job whose seq_len exceeds sliding_window is refused (exit 65), never run with the wrong mask;
  6. a Llama 3-style seed that carries only a Hugging Face tokenizer.json (byte-level BPE with Llama 3's
     pre-tokenizer regex, trained here with the `tokenizers` library, vocabulary padded past the tokenizer's
     size) trains with that tokenizer, and its output carries the tokenizer files, so AutoTokenizer encodes as
     the seed's tokenizer does and generate() runs on it.

usage: families_hf.py --tool btx-model-tool --train btx-train --workdir DIR
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
import transformers
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2MoeForCausalLM)
from safetensors.torch import save_file

from hf_common import compare, randomize_vectors, run_job



def tokens(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 259), (n,), generator=g).tolist()


def btx_logits(tool, model_dir, toks):
    out = model_dir.rstrip("/") + ".logits.safetensors"
    subprocess.run([tool, "logits", model_dir, out] + [str(t) for t in toks], check=True)
    return load_file(out)["logits"].double()


def hf_logits(model, toks):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([toks])).logits.double()


BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=256, eos_token_id=257,
            attn_implementation="eager")

FAMILIES = {
    "llama3.1": (LlamaConfig, LlamaForCausalLM, dict(
        rope_theta=5e5, tie_word_embeddings=True, vocab_size=4096,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama-linear": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling={"type": "linear", "factor": 4.0})),
    "llama-dynamic": (LlamaConfig, LlamaForCausalLM, dict(max_position_embeddings=16,
                                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama-bias": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=48, rope_theta=1e6)),
    "mistral-nemo": (MistralConfig, MistralForCausalLM, dict(sliding_window=48, head_dim=24, rope_theta=1e6)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=False)),
    # head_dim 24 != 64 / 4; transformers' Gemma still wants hidden_size divisible by the heads.
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(head_dim=24, hidden_activation="gelu_pytorch_tanh",
                                                  tie_word_embeddings=True, rms_norm_eps=1e-6)),
    # Seeds as they ship: bf16 weights (outputs keep the dtype).
    "llama-bf16": (LlamaConfig, LlamaForCausalLM, dict(torch_dtype="bfloat16")),
}
# What btx's MoE methods do with each family's experts: a Mixtral transformers loads, or a clear refusal.
MOE = {"llama3.1": "mixtral", "mistral": "mixtral", "mistral-nemo": "head_dim", "llama-bias": "attention biases",
       "qwen2": "qwen2_moe", "gemma": "btx_gemma_moe"}


def use_scaled_rope(mx):
    """Mixtral in transformers 4.46 ignores rope_scaling (newer versions and vLLM honour it): give its rotary
    embedding the frequencies transformers' own rope_scaling code computes for the config, so that the check is
    still against transformers' implementation of the scaling."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kind = mx.config.rope_scaling.get("rope_type", mx.config.rope_scaling.get("type"))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[kind](mx.config, None)
    assert attention_factor == 1.0
    for layer in mx.model.layers:
        rope = layer.self_attn.rotary_emb
        rope.inv_freq = inv_freq
        rope._set_cos_sin_cache(rope.max_position_embeddings, inv_freq.device, torch.get_default_dtype())


def gemma_moe_reference(moe_dir):
    """btx_gemma_moe as transformers' own parts compute it: GemmaForCausalLM's layers, with each FFN replaced by
    transformers' MixtralSparseMoeBlock (softmax over all experts, top-k, renormalised) whose experts use Gemma's
    activation. Weights are loaded by the layout's documented names."""
    cfg_json = json.load(open(os.path.join(moe_dir, "config.json")))
    dense = {k: v for k, v in cfg_json.items() if k not in ("architectures", "model_type")}
    gcfg = GemmaConfig(**dense, attn_implementation="eager")
    model = GemmaForCausalLM(gcfg)
    mcfg = MixtralConfig(hidden_size=gcfg.hidden_size, intermediate_size=gcfg.intermediate_size,
                         num_local_experts=cfg_json["num_local_experts"],
                         num_experts_per_tok=cfg_json["num_experts_per_tok"],
                         hidden_act=cfg_json["hidden_activation"], router_jitter_noise=0.0)
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block_sparse_moe = MixtralSparseMoeBlock(mcfg)

        def forward(self, h):
            return self.block_sparse_moe(h)[0]

    for layer in model.model.layers:
        layer.mlp = Block()
    weights = load_file(os.path.join(moe_dir, "model.safetensors"))
    state = {k.replace(".block_sparse_moe.", ".mlp.block_sparse_moe."): v.float() for k, v in weights.items()}
    if gcfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model


def check_gemma_moe(args, moe, toks):
    """Expert by expert: the MoE whose every expert is expert e computes expert e's dense Gemma, whatever the
    router picks (top-k gates sum to one); then the real routing against the transformers-built reference."""
    ok = True
    cfg_json = json.load(open(os.path.join(moe, "config.json")))
    ok &= cfg_json["model_type"] == "btx_gemma_moe" and cfg_json["architectures"] == ["BtxGemmaMoeForCausalLM"]
    weights = load_file(os.path.join(moe, "model.safetensors"))
    E, L = cfg_json["num_local_experts"], cfg_json["num_hidden_layers"]
    dense_cfg = {k: v for k, v in cfg_json.items() if k not in ("architectures", "model_type")}
    for e in range(E):
        forced = {}
        dense = {}
        for k, v in weights.items():
            if ".block_sparse_moe.experts." in k:
                pre, rest = k.split(".block_sparse_moe.experts.")
                w = rest.split(".", 1)[1]  # "w1.weight"
                forced[k] = weights[f"{pre}.block_sparse_moe.experts.{e}.{w}"].clone()
                if rest.startswith(f"{e}."):
                    proj = {"w1.weight": "gate_proj.weight", "w3.weight": "up_proj.weight", "w2.weight": "down_proj.weight"}[w]
                    dense[f"{pre}.mlp.{proj}"] = v
            elif ".block_sparse_moe.gate." not in k:
                forced[k] = v
                dense[k] = v
            else:
                forced[k] = v
        fdir = os.path.join(args.workdir, f"gemma-moe-forced{e}")
        os.makedirs(fdir, exist_ok=True)
        save_file(forced, os.path.join(fdir, "model.safetensors"), metadata={"format": "pt"})
        json.dump(cfg_json, open(os.path.join(fdir, "config.json"), "w"))
        hf = GemmaForCausalLM(GemmaConfig(**dense_cfg, attn_implementation="eager"))
        state = {k: t.float() for k, t in dense.items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing, unexpected = hf.load_state_dict(state, strict=False)
        assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
        ok &= compare(f"gemma MoE forced to expert {e} ({cfg_json['btx_expert_names'][e]}) vs transformers' "
                      f"GemmaForCausalLM of that expert", btx_logits(args.tool, fdir, toks), hf_logits(hf, toks))
    ok &= compare("gemma MoE (real routers) vs transformers' Gemma layers with MixtralSparseMoeBlock",
                  btx_logits(args.tool, moe, toks), hf_logits(gemma_moe_reference(moe), toks))
    return ok


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


def check_tokenizer_json_seed(args, text):
    """A seed whose only tokenizer is tokenizer.json (what Llama 3, Qwen2 and SmolLM ship)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([open(text).read()], trainer)
    src = os.path.join(args.workdir, "llama3-tokjson-hf")
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    # Embeddings padded past the tokenizer (as Qwen2.5 ships 152064 rows for 151665 tokens).
    cfg = LlamaConfig(**dict(BASE, vocab_size=tok.get_vocab_size() + 12, bos_token_id=bos, eos_token_id=eos,
                             tie_word_embeddings=True))
    torch.manual_seed(5)
    LlamaForCausalLM(cfg).save_pretrained(src, safe_serialization=True)
    tok.save(os.path.join(src, "tokenizer.json"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|end_of_text|>", "model_max_length": 64}, f)
    out, err = run_job(args.train, args.workdir, "llama3-tokjson-branch", "branch",
                       {"seed": src, "name": "code", "data": {"train": text},
                        "train": {"batch_tokens": 64, "seq_len": 16, "lr": 1e-3, "warmup": 1, "log_every": 1,
                                  "checkpoint_every": 0, "valid_tokens": 64}, "steps": 2})
    if out is None:
        return False
    used = f"tokenizer huggingface ({tok.get_vocab_size()} tokens)" in err
    print(f"tokenizer.json seed: btx-train used it ({'ok' if used else 'MISMATCH'}): {err.strip()}")
    ok = used
    carried = all(os.path.exists(os.path.join(out, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    print(f"tokenizer.json seed: output carries the tokenizer files ({'ok' if carried else 'MISMATCH'})")
    ok &= carried
    auto = transformers.AutoTokenizer.from_pretrained(out)
    sample = "def f12(x):\n    return x * 12 + 5  # ünïcode ✓"
    same = auto.encode(sample, add_special_tokens=False) == tok.encode(sample).ids
    print(f"tokenizer.json seed: AutoTokenizer on the output encodes as the seed's tokenizer ({'ok' if same else 'MISMATCH'})")
    ok &= same
    transformers.generation.utils.is_fsdp_managed_module = lambda m: False  # torch 1.13 under Python 3.11
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager")
    ids = auto(sample, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=eos)
    ran = generated.shape[1] == ids.shape[1] + 4
    print(f"tokenizer.json seed: generate() on the output ({'ok' if ran else 'MISMATCH'})")
    return ok and ran


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--family", action="append", help="only these families (default: all)")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    print("transformers", transformers.__version__, "torch", torch.__version__)
    text = os.path.join(args.workdir, "train.txt")
    with open(text, "w") as f:
        f.write("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)))
    ok = True
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(FAMILIES.items()):
        if args.family and name not in args.family:
            continue
        kw = dict(BASE)
        kw.update(extra)
        cfg = cfg_cls(**kw)
        torch.manual_seed(100 + i)
        hf = model_cls(cfg)
        randomize_vectors(hf, 200 + i)
        src = os.path.join(args.workdir, name + "-hf")
        if extra.get("torch_dtype") == "bfloat16":
            hf.to(torch.bfloat16).save_pretrained(src, safe_serialization=True)
            hf = model_cls.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager")
        else:
            hf.save_pretrained(src, safe_serialization=True)
        # Longer than max_position_embeddings for dynamic scaling, within the sliding window for Mistral.
        n = 40 if name != "llama-dynamic" else 30
        toks = tokens(n, cfg.vocab_size, i)
        ok &= compare(f"{name}: btx loads transformers' model", btx_logits(args.tool, src, toks), hf_logits(hf, toks))

        # btx writes the family; transformers loads it.
        cfg_path = os.path.join(args.workdir, name + "-config.json")
        with open(cfg_path, "w") as f:
            json.dump(json.load(open(os.path.join(src, "config.json"))), f)
        ours = os.path.join(args.workdir, name + "-btx")
        subprocess.run([args.tool, "init", ours, cfg_path, str(7 + i)], check=True)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(ours, torch_dtype=torch.float32,
                                                                   attn_implementation="eager")
        if type(loaded) is not model_cls:
            print(f"{name}: transformers loaded btx's model as {type(loaded).__name__} (MISMATCH)")
            ok = False
        ok &= compare(f"{name}: transformers loads btx's model", btx_logits(args.tool, ours, toks),
                      hf_logits(loaded, toks))

        # Training keeps the family: a branch job on transformers' seed (no tokenizer: byte fallback).
        train_spec = {"batch_tokens": 64, "seq_len": 16, "lr": 1e-3, "warmup": 1, "log_every": 1,
                      "checkpoint_every": 0, "valid_tokens": 64}
        branches = []
        for e in range(2 if name in MOE else 1):
            out, err = run_job(args.train, args.workdir, f"{name}-branch{e}", "branch",
                               {"seed": src, "name": f"d{e}", "tokenizer": "byte", "data": {"train": text},
                                "train": dict(train_spec, seed=e + 1), "steps": 2})
            if out is None:
                ok = False
                continue
            branches.append(out)
            if extra.get("torch_dtype") == "bfloat16":
                dtypes = {t.dtype for t in load_file(os.path.join(out, "model.safetensors")).values()}
                kept = dtypes == {torch.bfloat16} and json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
                print(f"{name}: the trained expert keeps the seed's bf16 weights ({'ok' if kept else 'MISMATCH'}: {dtypes})")
                ok &= kept
            trained = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32,
                                                                        attn_implementation="eager")
            ok &= compare(f"{name}: trained expert {e} in transformers", btx_logits(args.tool, out, toks),
                          hf_logits(trained, toks))
        if len(branches) == 2:
            experts = [{"name": f"d{e}", "model": b} for e, b in enumerate(branches)]
            if MOE[name] in ("mixtral", "qwen2_moe", "btx_gemma_moe"):
                moe, _ = run_job(args.train, args.workdir, f"{name}-moe", "merge",
                                 {"method": "btx", "seed": src, "keep_seed_expert": True, "experts": experts})
                written = moe and json.load(open(os.path.join(moe, "config.json")))["model_type"]
                if written != MOE[name]:
                    print(f"{name}: the MoE was written as {written}, expected {MOE[name]} (MISMATCH)")
                    ok = False
                if moe is None:
                    ok = False
                elif MOE[name] == "btx_gemma_moe":
                    ok &= check_gemma_moe(args, moe, toks)
                elif MOE[name] == "qwen2_moe":
                    qm = Qwen2MoeForCausalLM.from_pretrained(moe, torch_dtype=torch.float32, attn_implementation="eager")
                    zero = all(p.abs().max().item() == 0 for n, p in qm.named_parameters() if "shared_expert" in n)
                    print(f"{name}: Qwen2-MoE's shared expert is all zeros ({'ok' if zero else 'MISMATCH'})")
                    ok &= zero
                    ok &= compare(f"{name}: merged MoE in Qwen2MoeForCausalLM", btx_logits(args.tool, moe, toks),
                                  hf_logits(qm, toks))
                    # Sharp routers (any difference in routing semantics shows), saved by transformers, read by btx.
                    with torch.no_grad():
                        for layer in qm.model.layers:
                            layer.mlp.gate.weight.mul_(25.0)
                    sharp = os.path.join(args.workdir, f"{name}-moe-sharp")
                    qm.save_pretrained(sharp, safe_serialization=True)
                    ok &= compare(f"{name}: Qwen2-MoE with sharp routers saved by transformers, in btx",
                                  btx_logits(args.tool, sharp, toks), hf_logits(qm, toks))
                else:
                    mx = MixtralForCausalLM.from_pretrained(moe, torch_dtype=torch.float32, attn_implementation="eager")
                    if extra.get("rope_scaling"):
                        if mx.config.rope_scaling is None:
                            print(f"{name}: the merged Mixtral lost rope_scaling (MISMATCH)")
                            ok = False
                        use_scaled_rope(mx)
                    ok &= compare(f"{name}: merged MoE in MixtralForCausalLM", btx_logits(args.tool, moe, toks),
                                  hf_logits(mx, toks))
            else:
                _, err = run_job(args.train, args.workdir, f"{name}-moe", "merge",
                                 {"method": "btx", "experts": experts}, expect=65)
                refused = MOE[name] in err
                print(f"{name}: MoE merge refused with a reason ({'ok' if refused else 'MISMATCH'}): {err.strip()}")
                ok &= refused
                avg, _ = run_job(args.train, args.workdir, f"{name}-btm", "merge", {"method": "btm", "experts": experts})
                if avg is None:
                    ok = False
                else:
                    dense = transformers.AutoModelForCausalLM.from_pretrained(avg, torch_dtype=torch.float32,
                                                                              attn_implementation="eager")
                    ok &= compare(f"{name}: BTM average in transformers", btx_logits(args.tool, avg, toks),
                                  hf_logits(dense, toks))
        if name == "mistral":
            _, err = run_job(args.train, args.workdir, "mistral-long", "branch",
                             {"seed": src, "tokenizer": "byte", "data": {"train": text},
                              "train": dict(train_spec, seq_len=64, batch_tokens=128), "steps": 1}, expect=65)
            refused = "sliding_window" in err and err.count("\n") == 1
            print(f"mistral: seq_len past sliding_window refused ({'ok' if refused else 'MISMATCH'}): {err.strip()}")
            ok &= refused
    if not args.family:
        ok &= check_tokenizer_json_seed(args, text)
    print("families: all checks passed" if ok else "families: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
