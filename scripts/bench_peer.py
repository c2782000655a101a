#!/usr/bin/env python3
"""The eager PyTorch peer of `omnilite bench train`: whole optimizer steps of transformers' MixtralForCausalLM
(eager attention, the per-expert loop of MixtralExperts) with OMNI-LITE's text dimensions, AdamW and gradient
clipping, on random token rows of the same shape. Prints one JSON object (tokens/s, seconds per step, the fp32
2048^3 GEMM rate measured in the same process with the same threads, MFU against it).

Run it from the interop environment (scripts/check_interop.sh builds .venv-interop); scripts/bench_vs_peer.sh runs
it beside `omnilite bench train` and prints the ratio. The config is read as omnilite reads it ("extends" merged,
--set KEY=VALUE applied), so both sides get the same dimensions:

  .venv-interop/bin/python scripts/bench_peer.py --config configs/small.json --threads 2 --steps 20
"""
import argparse
import json
import os
import sys
import time


def merge(base, over):
    """Deep merge of config objects, as the config loader's "extends" does (objects merge, the rest replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config(path):
    with open(path) as f:
        j = json.load(f)
    if "extends" in j:
        parent = os.path.join(os.path.dirname(path), j.pop("extends"))
        j = merge(read_config(parent), j)
    return j


def apply_set(j, assignment):
    if "=" not in assignment:
        sys.exit(f"bench_peer: --set {assignment!r}: expected KEY=VALUE, e.g. train.seq_len=512")
    key, value = assignment.split("=", 1)
    node = j
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    try:
        node[parts[-1]] = json.loads(value)
    except json.JSONDecodeError:
        node[parts[-1]] = value


def gemm_gflops(n=2048, reps=5):
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="OMNI-LITE config JSON (its model.text, model.moe and train)")
    ap.add_argument("--set", action="append", default=[], help="override a config value, KEY=VALUE (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="transformers attn_implementation")
    ap.add_argument("--flops-per-token", type=float, default=0.0,
                    help="model FLOPs per token for the MFU (omnilite bench train's model_flops_per_token)")
    args = ap.parse_args()
    if args.threads < 1 or args.steps < 1 or args.warmup < 0:
        sys.exit("bench_peer: --threads and --steps must be at least 1, --warmup at least 0")
    if not os.path.isfile(args.config):
        sys.exit(f"bench_peer: --config {args.config}: no such file")
    cfg = read_config(args.config)
    for s in args.set:
        apply_set(cfg, s)

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t, moe, tr = cfg["model"]["text"], cfg["model"]["moe"], cfg["train"]
    if t.get("rope_dim", t["head_dim"]) != t["head_dim"]:
        sys.exit("bench_peer: rope_dim != head_dim has no Mixtral equivalent")
    mc = MixtralConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=moe["expert_hidden"],
                       num_hidden_layers=t["num_layers"], num_attention_heads=t["num_heads"],
                       num_key_value_heads=t["num_kv_heads"], head_dim=t["head_dim"],
                       max_position_embeddings=t["max_position_embeddings"], rope_theta=t.get("rope_theta", 1e6),
                       rms_norm_eps=t.get("rms_norm_eps", 1e-5), num_local_experts=moe["num_experts"],
                       num_experts_per_tok=moe["top_k"], router_aux_loss_coef=tr.get("aux_coef", 0.01),
                       output_router_logits=True, tie_word_embeddings=t.get("tie_word_embeddings", False),
                       attention_dropout=0.0, attn_implementation=args.attn)
    model = MixtralForCausalLM(mc).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tr.get("lr", 1e-3), weight_decay=tr.get("weight_decay", 0.0))
    B, T = tr["batch_size"], tr["seq_len"]
    clip = tr.get("grad_clip", 1.0)

    def step():
        tokens = torch.randint(0, t["vocab_size"], (B, T))
        out = model(input_ids=tokens, labels=tokens)  # loss = CE + router_aux_loss_coef * load balancing
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sps = (time.perf_counter() - t0) / args.steps
    gemm = gemm_gflops()
    r = {"benchmark": "peer", "peer": f"transformers {__import__('transformers').__version__} MixtralForCausalLM, "
                                      f"torch {torch.__version__}, attn {args.attn}",
         "threads": args.threads, "steps": args.steps, "tokens_per_step": B * T, "seconds_per_step": sps,
         "tokens_per_second": B * T / sps, "matmul_gflops": gemm,
         "parameters": sum(p.numel() for p in model.parameters())}
    if args.flops_per_token > 0:
        r["model_flops_per_token"] = args.flops_per_token
        r["mfu"] = args.flops_per_token * r["tokens_per_second"] / (gemm * 1e9)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
