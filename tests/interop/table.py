"""Prints build/interop/results.jsonl as one table; exits 1 when a row failed or there are none."""
import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
if not rows:
    print(f"no interop results in {path}")
    sys.exit(1)
def fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)
w = max(len(r["check"]) for r in rows)
print(f"\n{'check':<{w}}  {'measured':>12}  {'bound':>12}  result")
for r in rows:
    print(f"{r['check']:<{w}}  {fmt(r['measured']):>12}  {fmt(r['bound']):>12}  {'pass' if r['ok'] else 'FAIL'}")
failed = sum(not r["ok"] for r in rows)
print(f"\n{len(rows) - failed}/{len(rows)} checks pass")
sys.exit(1 if failed else 0)
