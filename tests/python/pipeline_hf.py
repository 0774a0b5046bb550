#!/usr/bin/env python3
"""The whole BTX pipeline per model family, against transformers (4.46.3), on CPU.

For Llama 3.x, Mistral, Qwen2 (its seed stored in bf16, as Qwen2.5 ships) and Gemma, a tiny random-init seed
made by transformers with the family's features, carrying a real tokenizer made here with the `tokenizers` library
(byte-level BPE tokenizer.json, the family's bos/eos names, a chat template in tokenizer_config.json, embeddings
padded past the tokenizer's size as Qwen2.5 ships them) goes through btx-train job by job:
branch into two experts -> merge (btx, the seed kept as an expert) -> router finetune -> eval with the baselines
(seed, each expert, the BTM average). Checks:
  - the merged and finetuned MoEs load in transformers (Mixtral for Llama/Mistral, with the Llama 3 rope scaling
    that 4.46's Mixtral ignores applied as in families_hf.py; Qwen2MoeForCausalLM for Qwen2; for Gemma, which transformers has no MoE class for, transformers' Gemma layers around its
    MixtralSparseMoeBlock, as families_hf.py checks the btx_gemma_moe layout);
  - for every evaluated model, transformers' loss on the validation text (tokenized by AutoTokenizer on the
    model's own output dir, cut into the windows btx's evaluation uses) equals btx's eval.json within 1e-5 nats;
  - every output keeps the seed's dtype and carries its tokenizer files: AutoTokenizer encodes as the seed's
    tokenizer, the chat template survives, and generate() runs on the MoE.

usage: pipeline_hf.py --tool btx-model-tool --train btx-train --workdir DIR
"""
import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
import transformers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GemmaConfig, GemmaForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from families_hf import LLAMA3_PATTERN, gemma_moe_reference, use_scaled_rope
from hf_common import randomize_vectors, run_job

LOSS_TOL = 1e-5  # measured: below 1e-8 on every family (a Mixtral that ignored rope_scaling was off by 2e-4)
SEQ_LEN = 32
MAX_TOKENS = 160
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, attn_implementation="eager")
# name: config class, model class, extra config, (bos, eos) as the family names them, dtype of the seed.
FAMILIES = {
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(
        rope_theta=5e5, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}), ("<|begin_of_text|>", "<|end_of_text|>"), "float32"),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=64, rope_theta=1e6), ("<s>", "</s>"), "float32"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=False),
              ("<|endoftext|>", "<|im_end|>"), "bfloat16"),
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(head_dim=24, hidden_activation="gelu_pytorch_tanh",
                                                  tie_word_embeddings=True, rms_norm_eps=1e-6), ("<bos>", "<eos>"),
              "float32"),
}
MOE_CLASS = {"llama3": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
             "gemma": None}


def corpora(workdir):
    code = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200))
    math = "".join(f"{i} + {i * 3} = {i * 4}. {i} * 2 = {i * 2}.\n" for i in range(200))
    out = {}
    for name, text in (("code", code), ("math", math)):
        half = len(text) * 4 // 5
        for part, body in (("train", text[:half]), ("valid", text[half:])):
            path = os.path.join(workdir, f"{name}.{part}.txt")
            with open(path, "w") as f:
                f.write(body)
            out[(name, part)] = path
    return out


def make_seed(workdir, family, data):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    cfg_cls, model_cls, extra, (bos_tok, eos_tok), dtype = FAMILIES[family]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([bos_tok, eos_tok, "<|user|>", "<|assistant|>"]))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([open(data[(d, "train")]).read() for d in ("code", "math")], trainer)
    bos, eos = tok.token_to_id(bos_tok), tok.token_to_id(eos_tok)
    cfg = cfg_cls(**dict(BASE, **extra, vocab_size=tok.get_vocab_size() + 12, bos_token_id=bos, eos_token_id=eos))
    torch.manual_seed(11)
    model = model_cls(cfg)
    randomize_vectors(model, 12)
    src = os.path.join(workdir, f"{family}-seed")
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(src, safe_serialization=True)
    tok.save(os.path.join(src, "tokenizer.json"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_tok, "eos_token": eos_tok,
                   "model_max_length": 128, "chat_template": CHAT}, f)
    return src, tok


def window_loss(model, ids):
    """btx's evaluation windows: seq_len predictions per window, each window starting where the last ended."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, SEQ_LEN):
            n = min(SEQ_LEN, len(ids) - 1 - start)
            seq = torch.tensor([ids[start:start + n + 1]])
            logp = torch.log_softmax(model(seq[:, :n]).logits[0].double(), -1)
            total -= logp.gather(1, seq[0, 1:, None]).sum().item()
            count += n
    return total / count


def hf_model(family, d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    if cfg["model_type"] == "btx_gemma_moe":
        return gemma_moe_reference(d)
    m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
    want = MOE_CLASS[family] if cfg.get("num_local_experts") or cfg.get("num_experts") else \
        FAMILIES[family][1].__name__
    if type(m).__name__ != want:
        raise AssertionError(f"{d}: transformers loaded {type(m).__name__}, expected {want}")
    if want == "MixtralForCausalLM" and cfg.get("rope_scaling"):
        use_scaled_rope(m)  # transformers 4.46's Mixtral ignores rope_scaling (see families_hf.py)
    return m


def stored_dtypes(d):
    dtypes = set()
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as st:
                for k in st.keys():
                    dtypes.add(st.get_tensor(k).dtype)
    return dtypes


def run_family(args, family, data):
    w = os.path.join(args.workdir, family)
    os.makedirs(w, exist_ok=True)
    seed, tok = make_seed(w, family, data)
    dtype = getattr(torch, FAMILIES[family][4])
    train = {"batch_tokens": 64, "seq_len": SEQ_LEN, "lr": 3e-3, "warmup": 1, "log_every": 1, "checkpoint_every": 0,
             "valid_tokens": 64}
    ok = True
    experts = []
    for e, name in enumerate(("code", "math")):
        out, _ = run_job(args.train, w, name, "branch", {"seed": seed, "name": name, "steps": 2,
                                                          "train": dict(train, seed=e + 1),
                                                          "data": {"train": data[(name, "train")]}})
        if out is None:
            return False
        experts.append({"name": name, "model": out})
    moe, _ = run_job(args.train, w, "moe", "merge", {"method": "btx", "seed": seed, "keep_seed_expert": True,
                                                     "experts": experts, "top_k": 2})
    btm, _ = run_job(args.train, w, "btm", "merge", {"method": "btm", "experts": experts})
    if moe is None or btm is None:
        return False
    ft, _ = run_job(args.train, w, "moe-ft", "finetune",
                    {"model": moe, "train": train, "steps": 2,
                     "mixture": [{"name": n, "weight": 1, "train": data[(n, "train")]} for n in ("code", "math")]})
    if ft is None:
        return False
    models = {"seed": seed, "code": experts[0]["model"], "math": experts[1]["model"], "btm": btm, "moe": moe,
              "moe-ft": ft}
    ev, err = run_job(args.train, w, "eval", "eval",
                      {"models": [{"name": n, "model": d} for n, d in models.items()],
                       "domains": [{"name": n, "valid": [data[(n, "valid")]]} for n in ("code", "math")],
                       "max_tokens": MAX_TOKENS, "seq_len": SEQ_LEN})
    if ev is None:
        return False
    report = json.load(open(os.path.join(ev, "eval.json")))
    sample = "def f12(x):\n    return x * 12 + 5"
    for name, d in models.items():
        auto = AutoTokenizer.from_pretrained(d)
        same = auto.encode(sample, add_special_tokens=False) == tok.encode(sample).ids
        template = auto.chat_template == CHAT
        kept = stored_dtypes(d) == {dtype}
        print(f"{family}/{name}: tokenizer files carried ({'ok' if same and template else 'MISMATCH'}), "
              f"weights kept {FAMILIES[family][4]} ({'ok' if kept else 'MISMATCH: ' + str(stored_dtypes(d))})")
        ok &= same and template and kept
        model = hf_model(family, d)
        model.eval()
        for dom in ("code", "math"):
            ids = [auto.bos_token_id] + auto.encode(open(data[(dom, "valid")]).read(), add_special_tokens=False) + \
                [auto.eos_token_id]
            ids = ids[:MAX_TOKENS + 1]
            theirs = window_loss(model, ids)
            ours = report["models"][name]["domains"][dom]["loss"]
            good = abs(theirs - ours) <= LOSS_TOL and report["models"][name]["domains"][dom]["tokens"] == len(ids) - 1
            print(f"{family}/{name}/{dom}: btx eval loss {ours:.6f}, transformers {theirs:.6f}, "
                  f"|diff| {abs(theirs - ours):.1e} ({'ok' if good else 'MISMATCH'})")
            ok &= good
        if name == "moe-ft" and not isinstance(model, GemmaForCausalLM) and MOE_CLASS[family]:
            transformers.generation.utils.is_fsdp_managed_module = lambda m: False  # torch 1.13 under Python 3.11
            try:
                import jinja2  # noqa: F401  (apply_chat_template needs it; transformers does not install it)
                prompt = auto.apply_chat_template([{"role": "user", "content": "2 + 2"}], tokenize=False)
            except ImportError:
                prompt = "<|user|>2 + 2\n"
            ids = auto(prompt, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=auto.eos_token_id)
            ran = gen.shape[1] == ids.shape[1] + 4
            print(f"{family}/{name}: chat template + generate() on the MoE ({'ok' if ran else 'MISMATCH'})")
            ok &= ran
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--family", action="append", help="only these families (default: all)")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    print("transformers", transformers.__version__, "torch", torch.__version__)
    data = corpora(args.workdir)
    ok = True
    for family in args.family or FAMILIES:
        good = run_family(args, family, data)
        print(f"{family}: whole pipeline {'ok' if good else 'FAILED'}")
        ok &= good
    print("pipeline: all checks passed" if ok else "pipeline: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
