"""Shared by the interop checks: paths, the omnilite CLI, the held-out text, and the results table.

Each check appends rows {check, measured, bound, ok} to build/interop/results.jsonl and exits non-zero when a row
fails; scripts/check_interop.sh prints them as one table (tests/interop/table.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = os.environ.get("OMNILITE_CLI", str(ROOT / "build" / "omnilite"))
FIX = Path(os.environ.get("OMNILITE_INTEROP_DIR", str(ROOT / "build" / "interop")))
RESULTS = FIX / "results.jsonl"
_failed = []


def omnilite(*args, json_out=False):
    """Runs the CLI; returns its stdout (parsed as JSON when json_out)."""
    p = subprocess.run([CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"omnilite {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if json_out else p.stdout


def fixtures():
    """The fixture list written by fixtures.py: {name: {"path", "kind", ...}}."""
    return json.loads((FIX / "fixtures.json").read_text())


def held_out_lines(n=40):
    """The first n non-empty lines of the embedded held-out text (fortune format: '%' ends a document)."""
    out = []
    for line in (ROOT / "data/generated/text/valid.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and line != "%":
            out.append(line)
        if len(out) == n:
            break
    return out


def score_lines(checkpoint, lines):
    """`omnilite score --lines` of `lines` under `checkpoint`: [{"line", "tokens", "logprobs"}] per line."""
    src = FIX / "score-lines.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = omnilite("score", "--checkpoint", checkpoint, "--lines", src, "--json")
    return [json.loads(l) for l in out.strip().splitlines()]


def max_logprob_diff(model, scored):
    """Max |log p| difference between a transformers (or PEFT) causal LM and omnilite's scores of the same tokens."""
    import torch
    worst = 0.0
    with torch.no_grad():
        for s in scored:
            ids = torch.tensor([s["tokens"]])
            lp = torch.log_softmax(model(ids).logits.double(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            worst = max(worst, (lp - torch.tensor(s["logprobs"], dtype=torch.float64)).abs().max().item())
    return worst


def report(check, measured, bound, ok):
    """One table row; `measured` and `bound` are printed as given (numbers or short text)."""
    row = {"check": check, "measured": measured, "bound": bound, "ok": bool(ok)}
    FIX.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(("PASS " if ok else "FAIL ") + f"{check}: {measured} (bound {bound})", flush=True)
    if not ok:
        _failed.append(check)


def finish():
    if _failed:
        print(f"{len(_failed)} check(s) failed: {', '.join(_failed)}", file=sys.stderr)
        sys.exit(1)
