"""Chat data against transformers 4.46.3: for each family's chat template (chat_templates.py), `btx-model-tool
data-prepare --format chat` renders, tokenizes and masks conversations into shards; transformers'
apply_chat_template renders and tokenizes the same conversations. Token ids must be equal, and so must the loss
mask: transformers' return_assistant_tokens_mask for a template with {% generation %} blocks, else the tokens that
overlap each assistant message's content as it appears in transformers' rendering, plus the end-of-turn token that
follows it (what btx documents). Exit 0 when every family matches."""
import argparse
import json
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chat_templates import CONVERSATIONS, FAMILIES, SPECIAL_TOKENS  # noqa: E402

DATE = "26 Jul 2024"  # btx never reads the clock; transformers gets the same date explicitly
END_OF_TURN = ["<|eot_id|>", "<|im_end|>", "<end_of_turn>", "</s>", "<|end|>", "<|endoftext|>"]


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    text = []
    for conv in CONVERSATIONS:
        text += [m["content"] for m in conv] * 20
    text += ["user assistant system model Hello there, how are you? " * 5] * 20
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(text, trainer)
    tok.save(path)


def read_shards(out):
    ids, mask = [], []
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    for rel in manifest["train"]["shards"]:
        data = open(os.path.join(out, rel), "rb").read()
        version, width, count = struct.unpack_from("<IIQ", data, 8)
        fmt = "<%d%s" % (count, "H" if width == 2 else "I")
        ids += struct.unpack_from(fmt, data, 64)
        if version == 2:
            bits = data[64 + width * count:]
            mask += [(bits[i // 8] >> (i % 8)) & 1 for i in range(count)]
        else:
            mask += [1] * count
    return ids, mask


def expected(tok, template, conv, eos, generation):
    kwargs = {"chat_template": template, "date_string": DATE}
    if generation:
        out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                      **kwargs)
        return list(out["input_ids"]), list(out["assistant_masks"])
    text = tok.apply_chat_template(conv, tokenize=False, **kwargs)
    # Every message's content in order (the templates keep the order), so that an answer such as "4" is not
    # found in an earlier header's date; the assistant ones are the spans.
    spans, cursor = [], 0
    for m in conv:
        for c in (m["content"], m["content"].strip()):
            at = text.find(c, cursor)
            if at >= 0:
                break
        assert at >= 0, f"content {m['content']!r} not in the rendering"
        end = at + len(c)
        cursor = end
        if m["role"] != "assistant":
            continue
        for e in [eos] + END_OF_TURN:
            if e and text.startswith(e, end):
                end += len(e)
                break
        spans.append((at, end))
        cursor = end
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tool", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    from transformers import PreTrainedTokenizerFast
    os.makedirs(args.workdir, exist_ok=True)
    tokenizer_json = os.path.join(args.workdir, "tokenizer.json")
    make_tokenizer(tokenizer_json)
    failures = 0
    for name, (template, bos, eos, system) in FAMILIES.items():
        seed = os.path.join(args.workdir, name)
        os.makedirs(seed, exist_ok=True)
        with open(tokenizer_json) as f:
            open(os.path.join(seed, "tokenizer.json"), "w").write(f.read())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": eos}
        if bos:
            config["bos_token"] = bos
        json.dump(config, open(os.path.join(seed, "tokenizer_config.json"), "w"))
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(seed, "tokenizer.json"), bos_token=bos, eos_token=eos)
        convs = [c if system or c[0]["role"] != "system" else c[1:] for c in CONVERSATIONS]
        data = os.path.join(seed, "chat.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for c in convs:
                f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
        out = os.path.join(seed, "prepared")
        r = subprocess.run([args.tool, "data-prepare", data, "--out", out, "--tokenizer", seed, "--format", "chat",
                            "--valid-fraction", "0"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: btx-model-tool exited {r.returncode}: {r.stdout}{r.stderr}")
            failures += 1
            continue
        got_ids, got_mask = read_shards(out)
        want_ids, want_mask = [], []
        for c in convs:
            ids, mask = expected(tok, template, c, eos, "{% generation %}" in template)
            want_ids += ids
            want_mask += mask
        ok = got_ids == want_ids and got_mask == want_mask
        counted = sum(want_mask)
        print(f"{name}: {len(convs)} conversations, {len(want_ids)} tokens, {counted} with loss: "
              f"{'ok' if ok else 'MISMATCH'}")
        if not ok:
            failures += 1
            for i, (a, b) in enumerate(zip(got_ids + [None] * len(want_ids), want_ids)):
                if a != b:
                    print(f"  first token difference at {i}: btx {got_ids[i:i + 8]} transformers {want_ids[i:i + 8]}")
                    break
            else:
                diff = [i for i, (a, b) in enumerate(zip(got_mask, want_mask)) if a != b]
                print(f"  masks differ at {diff[:10]}; tokens there: {tok.convert_ids_to_tokens(want_ids[diff[0]:diff[0] + 5])}")
    print("chat interop:", "ok" if failures == 0 else f"{failures} families differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
