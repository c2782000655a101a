"""transformers' AutoTokenizer of the export, called as a user calls it (`tok(text)`), gives the ids that omnilite
feeds the model for that text, its prefix included: every line of the embedded held-out text, and lines with digits,
whitespace runs, non-ASCII characters and the image marker strings."""
from pathlib import Path

from transformers import AutoTokenizer

from common import ROOT, finish, fixtures, report, score_lines

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
        theirs = [tok(text)["input_ids"] for text in lines]
        differ = [i for i in range(len(lines)) if ours[i] != theirs[i]]
        if differ:
            i = differ[0]
            print(f"first difference, line {i}: {lines[i]!r}\n  omnilite     {ours[i]}\n  transformers {theirs[i]}")
        report(f"{name}: AutoTokenizer ({type(tok).__name__}) ids = omnilite's, lines that differ of {len(lines)}",
               len(differ), 0, not differ)
        back = sum(tok.decode(theirs[i], skip_special_tokens=True) != lines[i] for i in range(len(lines)))
        report(f"{name}: AutoTokenizer decode(encode(line)) != line, of {len(lines)}", back, 0, back == 0)
    finish()


if __name__ == "__main__":
    main()
