"""llama.cpp reads `omnilite export --format gguf` as OMNI-LITE runs the model.

- gguf (PyPI, llama.cpp's gguf-py): every file parses, and every tensor of the f16 / bf16 / q8_0 / q4_0 files is
  byte-identical to gguf.quants.quantize (numpy versions of llama.cpp's reference quantisers) of the f32 file's.
- llama.cpp (llama-cpp-python, built from source): every --type loads; its ids of the held-out text (and of lines
  with digits, whitespace runs, non-ASCII text and the marker strings) equal omnilite's; its per-token log-probs
  (logits_all) equal `omnilite score`: f32 within 1e-4 with an f32 KV cache and within 2e-3 (99th percentile) with
  llama.cpp's default f16 one; every other type within measured bounds of OMNI-LITE on the same dequantised weights
  (the GGUF imported back); greedy
  decoding of 32 tokens from 5 held-out prompts gives `omnilite generate --temperature 0`'s tokens (f32).
- llama.cpp's convert_hf_to_gguf.py converts the `--format hf` export as it is; its f32 GGUF holds the tensors of
  OMNI-LITE's f32 GGUF byte for byte, and its log-probs equal OMNI-LITE's; imported into OMNI-LITE (a GGUF without
  OMNI-LITE's metadata, as one made elsewhere), it scores as the original checkpoint.
- A unigram tokenizer's export warns with the share of lines llama.cpp splits otherwise, which llama.cpp confirms.
"""
from importlib import metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from check_tokenizer import CHATS, EXTRA
from common import FIX, ROOT, finish, fixtures, held_out_lines, omnilite, report, score_lines

LLAMA_CPP = ROOT / ".venv-interop" / "llama.cpp"
F32_BOUND = 2e-3   # the bound with llama.cpp's default f16 KV cache (on the 99th percentile: see below)
EXACT_BOUND = 1e-4  # f32 weights and an f32 KV cache: the export itself, nothing rounded
# Bounds on {99th percentile, max} of |llama.cpp - OMNI-LITE on the same dequantised weights| per token, measured
# here (docs/interop.md) with an f32 KV cache: llama.cpp rounds the activations too (to q8_0 blocks for the q8_0 and
# q4_0 matmuls, to the weights' type for f16 / bf16), and a rounding that swaps a token's top-2 experts moves that
# token's log-prob by up to ~1 (the max), while the 99th percentile stays small.
TYPE_BOUND = {"f16": (5e-3, 0.1), "bf16": (2e-2, 0.3), "q8_0": (0.1, 1.5), "q4_0": (0.2, 2.0)}


def load_llama(path, f32_cache=True):
    """llama.cpp on the file; f32_cache=False keeps its default f16 KV cache."""
    from llama_cpp import Llama
    kv = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32
    return Llama(model_path=str(path), n_ctx=1024, n_batch=1024, logits_all=True, verbose=False, n_threads=2, seed=1,
                 **kv)


def llama_logprobs(m, tokens):
    m.reset()
    m.eval(tokens)
    lg = np.array(m.scores[: len(tokens)], dtype=np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return np.array([lp[i, tokens[i + 1]] for i in range(len(tokens) - 1)])


def diffs(m, scored):
    """|llama.cpp - omnilite| log-prob of every scored token."""
    return np.concatenate([np.abs(llama_logprobs(m, s["tokens"]) - np.array(s["logprobs"])) for s in scored])


def stats(d):
    return f"max {d.max():.3g}, p99 {np.percentile(d, 99):.3g}, mean {d.mean():.3g} over {len(d)} tokens"


def greedy(m, prompt, n, eos):
    m.reset()
    m.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(m.scores[m.n_tokens - 1]))
        out.append(nxt)
        if nxt == eos:
            break
        m.eval([nxt])
    return out


def check_bytes(name, fx, f32_path):
    """Every tensor of the file against gguf.quants.quantize of the f32 file's values."""
    import gguf
    ours, ref = gguf.GGUFReader(fx["path"]), gguf.GGUFReader(f32_path)
    arch = ours.fields["general.architecture"]
    ok_arch = bytes(arch.parts[arch.data[0]]).decode() == "llama"
    ref_t = {t.name: t for t in ref.tensors}
    differ = []
    for t in ours.tensors:
        values = np.asarray(ref_t[t.name].data, dtype=np.float32)
        want = gguf.quants.quantize(values, t.tensor_type)
        if not np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)):
            differ.append(t.name)
    if differ:
        print(f"{name}: tensors that differ: {differ[:5]}")
    report(f"{name}: gguf {metadata.version('gguf')} reads it (llama); tensors not "
           f"byte-identical to gguf.quants.quantize of the f32 file, of {len(ours.tensors)}", len(differ), 0,
           ok_arch and not differ)


def convert_hf(hf_dir, out):
    """llama.cpp's own converter on the hf export, as it is."""
    conv = LLAMA_CPP / "src/vendor/llama.cpp/convert_hf_to_gguf.py"
    env = dict(os.environ, PYTHONPATH=str(LLAMA_CPP / "src/vendor/llama.cpp/gguf-py"))
    p = subprocess.run([sys.executable, str(conv), str(hf_dir), "--outtype", "f32", "--outfile", str(out)],
                       capture_output=True, text=True, env=env)
    return p.returncode, (p.stderr or p.stdout).strip().splitlines()[-3:]


def same_tensors(a_path, b_path):
    import gguf
    a, b = gguf.GGUFReader(a_path), gguf.GGUFReader(b_path)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = sorted(set(ta) ^ set(tb))
    for n in set(ta) & set(tb):
        if ta[n].tensor_type != tb[n].tensor_type or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)):
            differ.append(n)
    return differ, len(ta)


def check_chat_template(name, fx, m):
    """The GGUF's tokenizer.chat_template, rendered as llama-cpp-python renders it (Jinja2ChatFormatter) and tokenized
    by llama.cpp with special tokens parsed, gives omnilite's chat ids."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    template = m.metadata.get("tokenizer.chat_template", "")
    report(f"{name}: tokenizer.chat_template present", len(template), "> 0", len(template) > 0)
    if not template:
        return
    src = FIX / "chats-gguf.jsonl"
    src.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CHATS), encoding="utf-8")
    model = Path(fx["imported"]) / "tokenizer.model"
    ours = [json.loads(l)["ids"] for l in omnilite("tokenizer", "encode", "--model", model, "--chat", src)
            .strip().splitlines()]
    fmt = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
    theirs = [m.tokenize(fmt(messages=c).prompt.encode("utf-8"), add_bos=False, special=True) for c in CHATS]
    differ = [i for i in range(len(CHATS)) if ours[i] != theirs[i]]
    if differ:
        i = differ[0]
        print(f"first difference, chat {i}:\n  omnilite  {ours[i]}\n  llama.cpp {theirs[i]}")
    report(f"{name}: llama.cpp's tokens of the rendered tokenizer.chat_template = omnilite's chat ids, chats that "
           f"differ of {len(CHATS)}", len(differ), 0, not differ)


def main():
    fx_all = fixtures()
    ggufs = {n: f for n, f in fx_all.items() if f["kind"] == "gguf"}
    lines = held_out_lines(40)
    all_lines = [l for l in (ROOT / "data/generated/text/valid.txt").read_text(encoding="utf-8").splitlines()
                 if l.strip() and l != "%"] + EXTRA
    scored_source = {}
    for name, fx in ggufs.items():
        src = fx["source"]
        if src not in scored_source:
            scored_source[src] = score_lines(src, lines)
        f32 = str(Path(fx["path"]).with_name(Path(fx["path"]).name.replace(f"-{fx['type']}.gguf", "-f32.gguf")))
        check_bytes(name, fx, f32)
        m = load_llama(fx["path"])
        if fx["type"] == "f32":
            # the ids llama.cpp reads, on every held-out line and the odd ones
            ours = [s["tokens"] for s in score_lines(fx["imported"], all_lines)]
            theirs = [m.tokenize(l.encode("utf-8"), add_bos=True, special=False) for l in all_lines]
            differ = [i for i in range(len(all_lines)) if ours[i] != theirs[i]]
            if differ:
                i = differ[0]
                print(f"first difference, line {i}: {all_lines[i]!r}\n  omnilite  {ours[i]}\n  llama.cpp {theirs[i]}")
            report(f"{name}: llama.cpp token ids = omnilite's, lines that differ of {len(all_lines)}", len(differ), 0,
                   not differ)
            check_chat_template(name, fx, m)
            d = diffs(m, scored_source[src])
            report(f"{name}: log-probs of {len(lines)} held-out lines, f32 KV cache, max |llama.cpp - omnilite "
                   f"score| ({stats(d)})", float(d.max()), EXACT_BOUND, d.max() <= EXACT_BOUND)
            d16 = diffs(load_llama(fx["path"], f32_cache=False), scored_source[src])
            p99 = float(np.percentile(d16, 99))
            report(f"{name}: the same with llama.cpp's default f16 KV cache, p99 ({stats(d16)})", p99, F32_BOUND,
                   p99 <= F32_BOUND)
            prompts = lines[:5]
            eos = m.token_eos()
            n_diff = 0
            for p in prompts:
                o = omnilite("generate", "--checkpoint", src, "--prompt", p, "--temperature", 0, "--max-new-tokens", 32,
                             "--json", json_out=True)
                n_diff += greedy(m, o["prompt_tokens"], 32, eos) != o["tokens"]
            report(f"{name}: greedy decoding (32 tokens) of {len(prompts)} prompts, prompts whose tokens differ",
                   n_diff, 0, n_diff == 0)
        else:
            d_src = diffs(m, scored_source[src])
            d = diffs(m, score_lines(fx["imported"], lines))
            p99_bound, max_bound = TYPE_BOUND[fx["type"]]
            p99 = float(np.percentile(d, 99))
            report(f"{name}: log-probs vs omnilite on the dequantised weights, p99 / max ({stats(d)}; vs the "
                   f"original weights: {stats(d_src)})", f"{p99:.3g} / {d.max():.3g}", f"{p99_bound} / {max_bound}",
                   p99 <= p99_bound and d.max() <= max_bound)
        del m
    # llama.cpp's converter on the hf exports
    conv = LLAMA_CPP / "src/vendor/llama.cpp/convert_hf_to_gguf.py"
    for name, fx in ggufs.items():
        if fx["type"] != "f32":
            continue
        if not conv.exists():
            report(f"{name}: convert_hf_to_gguf.py", "not shipped", "-", True)
            continue
        out = FIX / f"{name}.converted.gguf"
        rc, tail = convert_hf(fx["hf"], out)
        report(f"{name}: convert_hf_to_gguf.py --outtype f32 of the hf export, exit code ({tail[-1] if tail else ''})",
               rc, 0, rc == 0)
        if rc != 0:
            continue
        differ, n = same_tensors(out, fx["path"])
        if differ:
            print(f"{name}: converter tensors that differ from omnilite's: {differ[:5]}")
        report(f"{name}: converter's GGUF vs omnilite's f32 GGUF, tensors not byte-identical of {n}", len(differ), 0,
               not differ)
        m = load_llama(out)
        d = diffs(m, scored_source[fx["source"]])
        report(f"{name}: converter's GGUF log-probs, f32 KV cache, max |llama.cpp - omnilite score| ({stats(d)})",
               float(d.max()), EXACT_BOUND, d.max() <= EXACT_BOUND)
        # A GGUF made elsewhere (no omnilite.* metadata) imports: config from the llama.* keys, tokenizer rebuilt
        # from its vocabulary; OMNI-LITE on it scores as on the original checkpoint.
        back = FIX / f"{name}.converted.imported"
        if not (back / "state.json").exists():
            shutil.rmtree(back, ignore_errors=True)
            omnilite("export", "--checkpoint", out, "--out", back)
        ref = scored_source[fx["source"]]
        got = score_lines(back, lines)
        same_ids = all(a["tokens"] == b["tokens"] for a, b in zip(ref, got))
        worst = max(float(np.abs(np.array(a["logprobs"]) - np.array(b["logprobs"])).max()) for a, b in zip(ref, got))
        # fp32 rounding: the import carries no runtime section, so it scores with the default thread split
        # (runtime.threads 0, blas_threads 1), whose GEMMs sum in another order than the quickstart's (1 / 0); its
        # only other config difference, rms_norm_eps stored as f32, is the same float. Measured 5.9e-6 on the
        # trained model, 6.6e-7 and 8.3e-7 on the random ones (2026-12-02).
        report(f"{name}: the converter's GGUF imported into OMNI-LITE (no omnilite metadata), same ids: {same_ids}; "
               f"max |log-prob - the original checkpoint's|", worst, 2e-5, same_ids and worst <= 2e-5)
        del m
    # A unigram tokenizer: the export warns with the share of held-out lines whose ids llama.cpp changes; llama.cpp
    # itself on that GGUF gives the same count.
    for name, fx in fx_all.items():
        if fx["kind"] != "unigram":
            continue
        import re
        import sentencepiece as spm
        out = FIX / "gguf-unigram-f32.gguf"
        p = subprocess.run([os.environ.get("OMNILITE_CLI", str(ROOT / "build/omnilite")), "export", "--checkpoint",
                            fx["path"], "--format", "gguf", "--type", "f32", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True)
        warned = re.search(r"for (\d+) of (\d+) held-out lines \(([0-9.]+)%", p.stderr)
        report(f"{name}: export of a unigram tokenizer warns with the share of lines llama.cpp splits otherwise",
               warned.group(0) if warned else "no warning", "a warning", p.returncode == 0 and warned is not None)
        if not warned:
            continue
        valid = [l for l in (ROOT / "data/generated/text/valid.txt").read_text(encoding="utf-8").splitlines()
                 if l and l != "%"][: int(warned.group(2))]
        sp = spm.SentencePieceProcessor(model_file=fx["tokenizer"])
        m = load_llama(out)
        real = sum(sp.encode(l) != m.tokenize(l.encode("utf-8"), add_bos=False, special=False) for l in valid)
        report(f"{name}: lines whose ids differ, llama.cpp itself vs the export's warning, of {len(valid)}",
               f"{real} vs {warned.group(1)}", "equal", real == int(warned.group(1)))
        del m
    finish()


if __name__ == "__main__":
    main()
