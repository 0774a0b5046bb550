#!/usr/bin/env python3
"""Token-for-token comparison of btx's HfTokenizer (model/hf_tokenizer.cc) with the Python `tokenizers` library.

Trains, at test time and from generated text (nothing downloaded but the pinned wheel, no weights), small byte-level
BPE tokenizers configured like GPT-2, Llama 3 (its Split regex, ignore_merges, <|begin_of_text|>...; and a variant
whose merges hold several pairs per token, as tiktoken-converted ones do), Qwen2 (its regex, NFC, <|im_start|>...),
SmolLM (Digits + ByteLevel) and one with every other supported option (Split
behaviours, invert, String patterns, added tokens with lstrip/rstrip/single_word/normalized, an unknown token). Each
tokenizer.json is encoded by both on >= 1 MB of mixed text (prose, code, math, many scripts, emoji with ZWJ, whitespace
runs, digit runs, special tokens inside text) and on documents with invalid UTF-8 (which btx repairs as Python's
bytes.decode("utf-8", "replace") does). Ids must be identical; decoding must give what `tokenizers` decodes, and the
input itself where the tokenizer loses nothing. The first mismatch is printed with its context.

usage: tokenizers_hf.py --tool BTX_HF_TOKENIZE --workdir DIR [--venv DIR] [--seed N] [--mb 1.1]
       tokenizers_hf.py --make-assets DIR [--vocab 32000] [--mb 4]   (tokenizers + corpus for bench/tokenizer)
With --venv, a virtual environment with tokenizers==0.20.3 (what transformers 4.46.3 uses) is created there when
this interpreter lacks it; exit code 77 when PyPI is unreachable.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
import unicodedata

TOKENIZERS_VERSION = "0.20.3"

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"] +
                  [f"<|reserved_special_token_{i}|>" for i in range(12)])
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                 "<|file_sep|>"]
SMOLLM_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                  "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>"]
GPT2_SPECIAL = ["<|endoftext|>"]
EXOTIC_SPECIAL = ["<unk>", "<s>", "</s>"]
# Added tokens with flags (for the "exotic" tokenizer): (content, special, single_word, lstrip, rstrip, normalized)
EXOTIC_ADDED = [("<tab>", False, False, True, True, False), ("hello world", False, True, False, False, True),
                ("Ünïcödé", False, False, False, False, True), ("[MASK]", True, False, True, False, False),
                ("<sep>", True, False, False, True, False), ("wörd", False, True, True, True, True),
                ("\u0065\u0301t\u00e9", False, False, False, False, True), ("  ", False, False, False, False, False),
                ("<s>", True, False, False, False, False)]
ALL_SPECIAL = sorted(set(LLAMA3_SPECIAL + QWEN2_SPECIAL + SMOLLM_SPECIAL + GPT2_SPECIAL + EXOTIC_SPECIAL +
                         [a[0] for a in EXOTIC_ADDED]))


def bootstrap(venv):
    """Without --venv: this interpreter's tokenizers, any version. With it: re-runs this script under that venv,
    creating it with the pinned tokenizers if needed."""
    try:
        import tokenizers  # noqa: F401
        if venv is None or tokenizers.__version__ == TOKENIZERS_VERSION or \
                os.environ.get("BTX_TOKENIZERS_BOOTSTRAPPED"):
            return
    except ImportError:
        if os.environ.get("BTX_TOKENIZERS_BOOTSTRAPPED"):
            sys.exit("tokenizers_hf: the venv has no tokenizers")
        if venv is None:
            sys.exit(f"tokenizers_hf: no tokenizers here; pass --venv DIR to make one with tokenizers=={TOKENIZERS_VERSION}")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call(["/usr/bin/python3", "-m", "venv", venv])
    ok = subprocess.run([py, "-c", f"import tokenizers; assert tokenizers.__version__ == '{TOKENIZERS_VERSION}'"],
                        stderr=subprocess.DEVNULL).returncode == 0
    if not ok:
        rc = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             f"tokenizers=={TOKENIZERS_VERSION}"]).returncode
        if rc != 0:
            try:
                import urllib.request
                urllib.request.urlopen("https://pypi.org/simple/", timeout=10)
            except Exception:
                print("tokenizers_hf: SKIPPED: PyPI is unreachable, cannot install tokenizers", file=sys.stderr)
                sys.exit(77)
            sys.exit("tokenizers_hf: pip install failed although PyPI is reachable")
    env = dict(os.environ, BTX_TOKENIZERS_BOOTSTRAPPED="1")
    os.execve(py, [py, os.path.abspath(__file__)] + sys.argv[1:], env)


# ----------------------------------------------------------------------------------------------------------------
# Text

WORDS_EN = ("the of and to in is was that for it with as on be at by this had not are but from or have an they which "
            "one you were her all she there would their we him been has when who will more no if out so said what up "
            "its about into than them can only other new some could time these two may then do first any my now such "
            "like our over man me even most made after also did many before must through back years where much your "
            "way well down should because each just those people how too little state good very make world still own "
            "see men work long get here between both life being under never day same another know while last might "
            "us great old year off come since against go came right used take three tokenizer merge expert branch "
            "transformer attention gradient").split()
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'LL", "'D", "’s", "'ſ", "'K"]
LATIN_ACCENTS = ("café naïve façade crème brûlée Straße Größe Übermaß déjà vu señor niño São Paulo Łódź Kraków "
                 "Tiếng Việt được người Ærø Ångström smörgåsbord İstanbul ağaç œuvre Čeština příliš žluťoučký").split()
CYRILLIC = "Привет мир съешь же ещё этих мягких французских булок да выпей чаю Україна їжак ґанок Ђорђе".split()
GREEK = "Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο ΑΒΓΔ αβγδ ᾅ ῷ".split()
CJK = ["中文分词测试", "我们在北京大学学习", "東京都渋谷区", "ひらがなとカタカナ", "日本語のテキストです", "한국어 텍스트입니다",
       "안녕하세요", "漢字", "第一章", "人工智能", "𠀀𠀁𠀂", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３", "「引用」、。"]
ARABIC = "مرحبا بالعالم اللُّغَةُ العَرَبِيَّةُ كِتَابٌ ١٢٣ السلام عليكم".split()
HEBREW = "שלום עולם עִבְרִית".split()
DEVANAGARI = "नमस्ते दुनिया हिन्दी भाषा क़लम ज़रूर १२३ संस्कृतम् क्षत्रिय".split()
THAI = "สวัสดีครับ ภาษาไทย ๑๒๓".split()
EMOJI = ["😀", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "❤️", "👩🏾‍💻", "🧑‍🤝‍🧑", "✨", "🤖", "1️⃣", "©️",
         "🫠", "👁️‍🗨️", "🐈‍⬛"]
NFC_CASES = ["e\u0301", "A\u030a", "\u1100\u1161\u11a8", "a\u0323\u0302", "a\u0302\u0323", "\u212b", "\u2126",
             "\u0958", "\u0344", "o\u0308\u0304", "\u00c5\u0301", "\u0041\u0301\u0328", "\u1e9b\u0323",
             "\u0915\u093c", "\u3099", "\u304b\u3099", "\u30cf\u309a", "\uac00\u11a8", "\u0ddd", "\u0dd9\u0dcf\u0dca"]
WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r", " \n", "\n ", " \t ",
              "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2000", "\u2003", "\u200a", "\u2028", "\u2029", "\u202f",
              "\u205f", "\u3000", "\u180e", "\u200b", "\ufeff", "\u200d", "\u200c"]
DIGITS = ["0", "7", "42", "123", "2024", "31415926535", "1,000,000", "3.14", "1e-9", "0x1F", "٠١٢٣", "०१२३",
          "০৯", "๐๑", "０１２", "²³¹", "½¾", "ⅣⅫ", "①②", "𝟘𝟙", "۱۲۳"]
CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "if (x != nullptr && *x >= 0) { std::cout << \"ok\\n\"; }",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
    "const re = /^[a-z0-9_-]{3,16}$/i; // regex\n",
    "    \n        pass\n\n\n    return None\n",
    "<div class=\"x\">&amp;&lt;</div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "x = [i for i in range(10) if i % 2 == 0]\nprint(f'{x!r:>10}')",
    "#include <vector>\nint main() { return 0; }\n",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "$ ls -la | grep '^d' >> out.txt 2>&1",
    "aGVsbG8gd29ybGQgdGhpcyBpcyBhIGJhc2U2NCBibG9iIHRoYXQgaXMgcXVpdGUgbG9uZyBpbmRlZWQgYW5kIGdvZXMgb24gYW5kIG9u==",
]
MATH = ["\\frac{a}{b}", "x^2 + y^2 = z^2", "∑_{i=1}^{n} i = n(n+1)/2", "∫₀^∞ e^{-x²} dx = √π/2", "a ≤ b ≥ c ≠ d",
        "∀x ∈ ℝ, ∃y: y > x", "f'(x) = lim_{h→0}", "α + β = γ", "±∞", "E = mc²", "P(A|B) = P(B|A)P(A)/P(B)",
        "\\mathbb{R}^{n \\times m}", "(a+b)(a-b) = a²-b²", "∂L/∂w", "⌊x⌋ ⌈y⌉"]
# Code point ranges (assigned by Unicode 9, so every library's tables agree) for random "soup".
RANGES = [(0x21, 0x7E), (0xA1, 0x24F), (0x250, 0x2FF), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x52F),
          (0x531, 0x556), (0x5D0, 0x5EA), (0x591, 0x5BD), (0x620, 0x64A), (0x64B, 0x65F), (0x660, 0x669),
          (0x900, 0x97F), (0x980, 0x9FB), (0xE01, 0xE3A), (0xE40, 0xE5B), (0x10A0, 0x10FA), (0x1100, 0x11FF),
          (0x1E00, 0x1EFF), (0x1F00, 0x1FFE), (0x2010, 0x2027), (0x2030, 0x205E), (0x20A0, 0x20BE),
          (0x20D0, 0x20F0), (0x2100, 0x214F), (0x2150, 0x218B), (0x2190, 0x21FF), (0x2200, 0x22FF),
          (0x2460, 0x24FF), (0x2500, 0x257F), (0x3001, 0x303F), (0x3041, 0x3096), (0x3099, 0x30FF),
          (0x4E00, 0x9FA5), (0xAC00, 0xD7A3), (0xFB00, 0xFB06), (0xFE20, 0xFE2D), (0xFF01, 0xFF5E),
          (0x1D400, 0x1D6A5), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x20000, 0x2A6D6)]


def soup(rng, n):
    out = []
    for _ in range(n):
        lo, hi = rng.choice(RANGES)
        c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) not in ("Cn", "Cs", "Co"):
            out.append(c)
    return "".join(out)


def piece(rng, specials, long_runs=True):
    r = rng.random() * (1.0 if long_runs else 0.95)
    if r < 0.30:
        n = rng.randint(3, 25)
        words = []
        for _ in range(n):
            w = rng.choice(WORDS_EN)
            if rng.random() < 0.15:
                w = w.capitalize()
            if rng.random() < 0.03:
                w = w.upper()
            if rng.random() < 0.08:
                w += rng.choice(CONTRACTIONS)
            words.append(w)
        s = " ".join(words)
        return s + rng.choice([".", ",", "!", "?", ";", ":", "...", " —", "", "\n"])
    if r < 0.38:
        return rng.choice(CODE)
    if r < 0.43:
        return rng.choice(MATH)
    if r < 0.58:
        pool = rng.choice([LATIN_ACCENTS, CYRILLIC, GREEK, CJK, ARABIC, HEBREW, DEVANAGARI, THAI])
        return " ".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))
    if r < 0.63:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4)))
    if r < 0.68:
        return rng.choice(NFC_CASES) + rng.choice(["", " ", "x", "é"])
    if r < 0.76:
        return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 6)))
    if r < 0.82:
        return rng.choice(DIGITS) if rng.random() < 0.6 else str(rng.randint(0, 10 ** rng.randint(1, 25)))
    if r < 0.88 and specials:
        return rng.choice(specials)
    if r < 0.95:
        return soup(rng, rng.randint(1, 20))
    # Long runs: words past the BPE cache and the quadratic merge scan, long whitespace and punctuation runs.
    kind = rng.randint(0, 4)
    n = rng.choice([30, 70, 200, 1500])
    if kind == 0:
        return rng.choice("ab=-_ ") * n
    if kind == 1:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
    if kind == 2:
        return " " * n + rng.choice(["x", "\n", ""])
    if kind == 3:
        return "".join(rng.choice("0123456789") for _ in range(n))
    return "".join(rng.choice("ааббвгдеёжз") for _ in range(n // 4))


def document(rng, size, specials, long_runs=True):
    parts = []
    total = 0
    while total < size:
        p = piece(rng, specials, long_runs)
        parts.append(p)
        total += len(p.encode())
        sep = rng.random()
        if sep < 0.55:
            parts.append(" ")
        elif sep < 0.65:
            parts.append("\n")
        # else: glued to the next piece (special tokens adjacent to text)
    return "".join(parts)


def documents(rng, total_bytes, specials):
    """Small ones (edge cases first), then ever bigger ones, up to total_bytes of UTF-8."""
    docs = ["", " ", "  ", "\n", "\t", "\r\n", "   \n\n  ", "a", "é", "e\u0301", "'s", "<|", "|>"]
    docs += [s for s in specials]
    docs += [s + s for s in specials[:5]] + [" " + s + " " for s in specials[:5]] + ["x" + s + "y" for s in specials[:5]]
    total = sum(len(d.encode()) for d in docs)
    while total < total_bytes:
        size = rng.choices([1, 5, 20, 80, 300, 1000, 4000, 20000, 100000], [12, 12, 12, 12, 10, 8, 5, 2, 1])[0]
        d = document(rng, size, specials).replace("\0", "\1")
        docs.append(d)
        total += len(d.encode())
    return docs


def corrupt(rng, s):
    """Valid UTF-8 with invalid sequences spliced in."""
    b = bytearray(s.encode())
    bad = [b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
           b"\xf5", b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28",
           b"\xc3\x28", b"\xa0\xa1", b"\xe0\xa0", b"\xf8\x88\x80\x80\x80"]
    for _ in range(rng.randint(1, 6)):
        pos = rng.randint(0, len(b))
        b[pos:pos] = rng.choice(bad)
    if rng.random() < 0.3:
        b += rng.choice(bad)
    return bytes(b)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers

def build(name, train_docs, vocab_size):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    bl_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if name == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = GPT2_SPECIAL
    elif name == "gpt2_prefix":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        specials = GPT2_SPECIAL
    elif name in ("llama3", "llama3_alt"):
        tok = Tokenizer(models.BPE(ignore_merges=name == "llama3"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        specials = LLAMA3_SPECIAL
    elif name == "qwen2":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        specials = QWEN2_SPECIAL
    elif name == "smollm":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
        specials = SMOLLM_SPECIAL
    elif name == "exotic":
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.NFC()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(" ", behavior="merged_with_next", invert=False),
            pre_tokenizers.Split(Regex(r"[.!?]+"), behavior="merged_with_previous", invert=False),
            pre_tokenizers.Split(Regex(r"\w+|\p{N}"), behavior="contiguous", invert=True),
            pre_tokenizers.Split(Regex(r"\t+"), behavior="removed", invert=False),
            pre_tokenizers.Split(Regex(r"[\h]{4,}|\p{Han}+|\s{3,}"), behavior="isolated", invert=False),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
        specials = EXOTIC_SPECIAL
        bl_alphabet = []  # bytes never seen in training stay unknown: exercises unk_token + fuse_unk
    else:
        raise ValueError(name)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=bl_alphabet, special_tokens=specials)
    tok.train_from_iterator(train_docs, trainer)
    if name == "exotic":
        tok.add_tokens([AddedToken(c, special=s, single_word=w, lstrip=l, rstrip=r, normalized=n)
                        for c, s, w, l, r, n in EXOTIC_ADDED if not s])
        tok.add_special_tokens([AddedToken(c, special=s, single_word=w, lstrip=l, rstrip=r, normalized=n)
                                for c, s, w, l, r, n in EXOTIC_ADDED if s])
    return tok, specials + ([a[0] for a in EXOTIC_ADDED] if name == "exotic" else [])


def alternative_merges(merges, vocab, rng):
    """Merges as converted from tiktoken (Llama 3's): other pairs that form an existing token, at random ranks, and
    repeated pairs (a later copy overrides the rank)."""
    have = set(map(tuple, merges))
    extra = []
    for tok in vocab:
        for k in range(1, len(tok)):
            pair = (tok[:k], tok[k:])
            if pair not in have and pair[0] in vocab and pair[1] in vocab:
                extra.append(list(pair))
                have.add(pair)
    merges = [list(m) for m in merges]
    for m in extra[:4000] + [list(m) for m in rng.sample(merges, min(200, len(merges)))]:
        merges.insert(rng.randint(0, len(merges)), m)
    return merges, len(extra)


def save(tok, name, path):
    data = json.loads(tok.to_str())
    if name == "llama3_alt":
        data["model"]["merges"], n = alternative_merges(data["model"]["merges"], data["model"]["vocab"],
                                                        random.Random(len(data["model"]["vocab"])))
        assert n > 100, n
    if name in ("gpt2", "exotic"):
        # Legacy "a b" merges, as in older files (byte-level tokens never contain a space).
        data["model"]["merges"] = [f"{a} {b}" for a, b in data["model"]["merges"]]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)  # what both sides load


NAMES = ["gpt2", "gpt2_prefix", "llama3", "llama3_alt", "qwen2", "smollm", "exotic"]
LOSSLESS = {"gpt2", "llama3", "llama3_alt", "smollm"}  # decode(encode(x)) == x for valid x


def run_tool(tool, args):
    r = subprocess.run([tool] + args, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr}")


def show(tok, ids, at):
    lo, hi = max(0, at - 6), at + 6
    return " ".join(f"{i}:{tok.id_to_token(i)!r}" for i in ids[lo:hi])


def compare(name, tok, tjson, tool, workdir, docs_bytes, docs_text, check_roundtrip):
    """docs_bytes: what btx reads; docs_text: what tokenizers encodes (the repaired text)."""
    inp = os.path.join(workdir, f"{name}.in")
    out = os.path.join(workdir, f"{name}.ids")
    with open(inp, "wb") as f:
        f.write(b"\0".join(docs_bytes))
    t0 = time.time()
    run_tool(tool, [tjson, inp, out])
    t_btx = time.time() - t0
    with open(out) as f:
        got = [[int(x) for x in line.split()] for line in f.read().split("\n")[:-1]]
    t0 = time.time()
    want = [e.ids for e in tok.encode_batch(docs_text, add_special_tokens=False)]
    t_hf = time.time() - t0
    if len(got) != len(want):
        raise SystemExit(f"{name}: btx wrote {len(got)} documents, expected {len(want)}")
    for d, (g, w) in enumerate(zip(got, want)):
        if g != w:
            k = next((i for i in range(min(len(g), len(w))) if g[i] != w[i]), min(len(g), len(w)))
            text = docs_text[d]
            ctx_text = tok.decode(w[max(0, k - 8):k + 8], skip_special_tokens=False)
            print(f"FAIL {name}: document {d} ({len(text.encode())} bytes), first difference at token {k} "
                  f"(btx {len(g)} tokens, tokenizers {len(w)})\n"
                  f"  text around it: {ctx_text!r}\n"
                  f"  tokenizers: {show(tok, w, k)}\n"
                  f"  btx:        {show(tok, g, k)}", file=sys.stderr)
            with open(os.path.join(workdir, f"{name}.mismatch.txt"), "w", encoding="utf-8") as f:
                f.write(text)
            return False
    n_bytes = sum(len(b) for b in docs_bytes)
    n_tokens = sum(len(w) for w in want)
    # Decoding: what tokenizers decodes, and the input itself when nothing is lost.
    dec = os.path.join(workdir, f"{name}.dec")
    run_tool(tool, ["--decode", tjson, out, dec])
    with open(dec, "rb") as f:
        decoded = f.read().split(b"\0")
    want_dec = tok.decode_batch(want, skip_special_tokens=False)
    for d, (g, w) in enumerate(zip(decoded, want_dec)):
        g = g.decode("utf-8")
        if g != w:
            print(f"FAIL {name}: decode of document {d} differs from tokenizers': {g[:200]!r} vs {w[:200]!r}",
                  file=sys.stderr)
            return False
        if check_roundtrip(docs_text[d]) and g != docs_text[d]:
            print(f"FAIL {name}: decode(encode(x)) != x for document {d}: {g[:200]!r} vs {docs_text[d][:200]!r}",
                  file=sys.stderr)
            return False
    print(f"ok {name}: {len(docs_bytes)} documents, {n_bytes} bytes, {n_tokens} tokens identical "
          f"(btx_hf_tokenize {t_btx:.2f}s incl. load, tokenizers encode_batch {t_hf:.2f}s); decode ok")
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool")
    ap.add_argument("--workdir")
    ap.add_argument("--venv")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--mb", type=float)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--only", help="comma-separated tokenizer names")
    ap.add_argument("--make-assets", metavar="DIR")
    args = ap.parse_args()
    bootstrap(args.venv)
    import tokenizers
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)

    if args.make_assets:
        os.makedirs(args.make_assets, exist_ok=True)
        mb = args.mb or 4.0
        train = documents(random.Random(1), 3_000_000, ALL_SPECIAL)
        # Plain text for throughput: no special tokens, none of the 30-1500 character runs the comparison uses.
        corpus = document(random.Random(2), int(mb * 1_000_000), [], long_runs=False)
        with open(os.path.join(args.make_assets, "corpus.txt"), "w", encoding="utf-8") as f:
            f.write(corpus)
        for name in ["gpt2", "llama3", "qwen2", "smollm"]:
            tok, _ = build(name, train, args.vocab or 32000)
            save(tok, name, os.path.join(args.make_assets, f"{name}.json"))
        print(f"assets in {args.make_assets}: corpus.txt ({len(corpus.encode())} bytes), gpt2/llama3/qwen2/smollm.json")
        return 0

    if not args.tool or not args.workdir:
        ap.error("--tool and --workdir are required")
    os.makedirs(args.workdir, exist_ok=True)
    print(f"tokenizers {tokenizers.__version__}, seed {seed} (rerun with --seed {seed})")
    train = documents(random.Random(rng.randrange(1 << 30)), 1_500_000, ALL_SPECIAL)
    names = args.only.split(",") if args.only else NAMES
    ok = True
    total = int((args.mb or 1.1) * 1_000_000)
    for name in names:
        t0 = time.time()
        tok, specials = build(name, train, args.vocab or 6000)
        tjson = os.path.join(args.workdir, f"{name}.json")
        tok = save(tok, name, tjson)
        print(f"trained {name}: vocab {tok.get_vocab_size()} in {time.time() - t0:.1f}s")
        drng = random.Random(rng.randrange(1 << 30))
        docs = documents(drng, total, specials)
        if name in LOSSLESS:
            check = lambda x: True  # noqa: E731
        elif name == "qwen2":
            check = lambda x: unicodedata.is_normalized("NFC", x)  # noqa: E731
        else:
            check = lambda x: False  # noqa: E731
        ok &= compare(name, tok, tjson, args.tool, args.workdir, [d.encode() for d in docs], docs, check)
        # Invalid UTF-8: btx gets the bytes, tokenizers the text Python repairs them to.
        bad = [corrupt(drng, d) for d in docs if d] + [b"\xff", b"\xc3", b"a\x80b", b"\xed\xa0\x80\xed\xb0\x80"]
        bad = [b.replace(b"\0", b"\1") for b in bad]
        ok &= compare(name + "_invalid", tok, tjson, args.tool, args.workdir, bad,
                      [b.decode("utf-8", errors="replace") for b in bad], lambda x: False)
        if not ok:
            break
    if not ok:
        print(f"FAILED (seed {seed}; inputs and tokenizer.json files are in {args.workdir})", file=sys.stderr)
        return 1
    print("all identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
