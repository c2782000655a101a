"""transformers' AutoTokenizer of the export, called as a user calls it (`tok(text)`), gives the ids that omnilite
feeds the model for that text, its prefix included: every line of the embedded held-out text, and lines with digits,
whitespace runs, non-ASCII characters and the image marker strings (those, typed, are special tokens in transformers,
as in every Llama tokenizer, so they are compared as plain text with split_special_tokens=True). And the chat template
the export carries: `tok.apply_chat_template(messages)` gives the ids `omnilite tokenizer encode --chat` trains on,
with and without the generation prompt."""
import json
from pathlib import Path

from transformers import AutoTokenizer

from common import FIX, ROOT, finish, fixtures, omnilite, report, score_lines

CHATS = [
    [{"role": "user", "content": "What is a sandal?"}, {"role": "assistant", "content": "A shoe worn in summer."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Is this a bag?"},
     {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "And this one?"},
     {"role": "assistant", "content": "No."}],
    [{"role": "user", "content": "Continue: In 1984 there were 3,141 of them"},
     {"role": "assistant", "content": "and 2.718 more.\nThe end."}],
    [{"role": "user", "content": "naïve café, Zürich — 東京 🙂"}, {"role": "assistant", "content": "  two spaces"}],
    [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "x"}, {"role": "assistant", "content": "!!!???"}],
]


def chat_ids(tok, messages, generation_prompt):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def check_chat_template(name, path, tok):
    src = FIX / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CHATS), encoding="utf-8")
    model = Path(path) / "tokenizer.model"
    for prompt in (False, True):
        args = ["tokenizer", "encode", "--model", model, "--chat", src] + (["--generation-prompt"] if prompt else [])
        ours = [json.loads(l)["ids"] for l in omnilite(*args).strip().splitlines()]
        theirs = [chat_ids(tok, m[:-1] if prompt else m, prompt) for m in CHATS]
        differ = [i for i in range(len(CHATS)) if ours[i] != theirs[i]]
        if differ:
            i = differ[0]
            print(f"first difference, chat {i}:\n  omnilite     {ours[i]}\n  transformers {theirs[i]}\n"
                  f"  rendered     {tok.apply_chat_template(CHATS[i], tokenize=False)!r}")
        what = "apply_chat_template(add_generation_prompt=True) of all turns but the answer" if prompt else \
            "apply_chat_template of whole conversations"
        report(f"{name}: {what} = omnilite's chat ids, chats that differ of {len(CHATS)}", len(differ), 0, not differ)

EXTRA = ["In 1984 there were 3,141,592 of them (and 2.718 more).", "two  spaces,   three, \ttab and trailing  ",
         "  leading spaces", "naïve café, Zürich — 東京 🙂", "<image_begin><image><image_end> a photo of a bag.",
         "a photo of a<image>sneaker <gen_image>", "x", "!!!???", "line with a % sign and 100%"]


def main():
    lines = [l for l in (ROOT / "data/generated/text/valid.txt").read_text(encoding="utf-8").splitlines()
             if l.strip() and l != "%"]
    lines += EXTRA
    for name, fx in fixtures().items():
        # every fixture with its own tokenizer once: the random models share one, the quickstart has its own
        if fx["kind"] != "hf" or name not in ("hf-untied-1", "hf-quickstart"):
            continue
        path = Path(fx["path"])
        tok = AutoTokenizer.from_pretrained(path)
        ours = [s["tokens"] for s in score_lines(path, lines)]
        special = [t for t in tok.all_special_tokens + ["<image>", "<image_begin>", "<image_end>", "<gen_image>"]]
        typed = [any(t in text for t in special) for text in lines]
        theirs = [tok(text, split_special_tokens=typed[i])["input_ids"] for i, text in enumerate(lines)]
        differ = [i for i in range(len(lines)) if ours[i] != theirs[i]]
        if differ:
            i = differ[0]
            print(f"first difference, line {i}: {lines[i]!r}\n  omnilite     {ours[i]}\n  transformers {theirs[i]}")
        report(f"{name}: AutoTokenizer ({type(tok).__name__}) ids = omnilite's, lines that differ of {len(lines)}",
               len(differ), 0, not differ)
        back = sum(tok.decode(theirs[i], skip_special_tokens=True) != lines[i] for i in range(len(lines)))
        report(f"{name}: AutoTokenizer decode(encode(line)) != line, of {len(lines)}", back, 0, back == 0)
        check_chat_template(name, path, tok)
    finish()


if __name__ == "__main__":
    main()
