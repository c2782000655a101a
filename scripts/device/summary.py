#!/usr/bin/env python3
"""Prints the table of scripts/device/check.sh from its results.jsonl (one JSON object per step)."""
import json
import sys


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def main(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    out = ["| step | figure | value |", "|---|---|---|"]
    for r in rows:
        s = r.get("step", "?")
        if "skipped" in r:
            out.append(f"| {s} | skipped | {r['skipped']} |")
        elif "error" in r:
            out.append(f"| {s} | failed (exit {r.get('rc')}) | {r['error'].replace('|', '/')} |")
        elif s == "machine":
            out.append(f"| machine | GPU, CPU cores | {r.get('gpu') or 'none'}, {r.get('nproc')} |")
        elif s == "build":
            out.append(f"| build | exit status, seconds | {r.get('rc')}, {r.get('seconds')} |")
        elif s == "cuda-tests":
            out.append(f"| [cuda] tests | exit status, result | {r.get('rc')}, {r.get('summary') or '—'} |")
        elif s.startswith("qlora-"):
            out.append(f"| QLoRA full model, batch 1 x {r.get('seq')} | peak allocated GiB (goal <= 6), tokens/s "
                       f"| {fmt(r.get('peak_allocated_gib'), '.2f')}, {fmt(r.get('tokens_per_second'), ',.0f')} "
                       f"(exit {r.get('rc')}) |")
        elif s.startswith("bf16-step"):
            paths = r.get("moe_forwards") or {}
            took = "+".join(k for k in ("grouped", "loop") if paths.get(k))
            out.append(f"| bf16 fwd+bwd, {r.get('batch')} x {r.get('seq')}, "
                       f"MoE {r.get('moe_dispatch')} ({took or '?'}) | MFU (goal >= 0.40), tokens/s, "
                       f"bf16 GEMM GFLOP/s, peak GiB | {fmt(r.get('mfu'), '.3f')}, "
                       f"{fmt(r.get('tokens_per_second'), ',.0f')}, {fmt(r.get('matmul_gflops'), ',.0f')}, "
                       f"{fmt(r.get('peak_allocated_gib'), '.2f')} |")
        elif s.startswith("decode-"):
            out.append(f"| decode, {r.get('weights')} weights | tokens/s, bound, fraction of bound, GB/s read "
                       f"| {fmt(r.get('decode_tokens_per_second'), '.1f')}, "
                       f"{fmt(r.get('bandwidth_bound_tokens_per_second'), '.1f')}, "
                       f"{fmt(r.get('fraction_of_bound'), '.3f')}, {fmt(r.get('read_bandwidth_gb_per_s'), ',.0f')} |")
        elif s.startswith("matmul"):
            out.append(f"| GEMM {r.get('size')}^3 {r.get('dtype')} | GFLOP/s | {fmt(r.get('gflops'), ',.0f')} |")
        else:
            out.append(f"| {s} | raw | {json.dumps(r)} |")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: summary.py results.jsonl")
    main(sys.argv[1])
