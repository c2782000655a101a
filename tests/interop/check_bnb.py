"""bitsandbytes' NF4 is OMNI-LITE's NF4: for every weight that `omnilite export --format hf --quant nf4` stores in
4 bits, bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) on the
same fp32 weight gives the same bytes in every serialised tensor (codes, double-quantised absmax, code maps, nested
absmax) and the same quant_state; bitsandbytes dequantises OMNI-LITE's bytes to its own weight exactly; and
transformers loads the 4-bit export on the CPU with log-probs equal to OMNI-LITE's from the same codes. Random
(init) and trained (quickstart) weights."""
import json
from pathlib import Path

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors import safe_open
from transformers import MixtralForCausalLM

from common import FIX, finish, fixtures, held_out_lines, max_logprob_diff, omnilite, report, score_lines

LOGPROB_BOUND = 1e-4
BF16_BOUND = 0.25  # bf16 activations: measured 0.03 (random) and 0.07 (trained) on the dev VM


def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def main():
    fx = fixtures()
    sources = [("random", "hf-untied-1")] + ([("trained", "hf-quickstart")] if "hf-quickstart" in fx else [])
    for label, name in sources:
        fp = Path(fx[name]["path"])
        q_dir = FIX / f"nf4-{name}"
        if not (q_dir / "config.json").exists():
            omnilite("export", "--checkpoint", fp, "--format", "hf", "--quant", "nf4", "--out", q_dir)
        full, ours = tensors(fp), tensors(q_dir)
        quantised = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in ours if k.endswith("bitsandbytes__nf4")]
        differing_bytes = total_bytes = state_diff = 0
        worst_dq = 0.0
        for k in quantised:
            w = full[k].float()
            packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            ref = {k: packed, **{f"{k}.{n}": v for n, v in st.as_dict(packed=True).items()}}
            for n, v in ref.items():
                if n.endswith("bitsandbytes__nf4"):
                    a = json.loads(bytes(v.numpy()).decode())
                    b = json.loads(bytes(ours[n].numpy()).decode())
                    state_diff += a != b
                    continue
                mine = ours[n]
                same_layout = mine.dtype == v.dtype and mine.shape == v.shape
                va = v.contiguous().view(torch.uint8).reshape(-1)
                vb = mine.contiguous().view(torch.uint8).reshape(-1) if same_layout else None
                total_bytes += va.numel()
                differing_bytes += va.numel() if vb is None or vb.numel() != va.numel() else int((va != vb).sum())
            qs = F.QuantState.from_dict({n[len(k) + 1:]: ours[n] for n in ours if n.startswith(k + ".")}, device="cpu")
            dq_ours = F.dequantize_4bit(ours[k], qs)
            dq_ref = F.dequantize_4bit(packed, st)
            worst_dq = max(worst_dq, (dq_ours - dq_ref).abs().max().item())
        report(f"bnb NF4 ({label} weights, {len(quantised)} matrices): stored bytes that differ of {total_bytes}",
               differing_bytes, 0, differing_bytes == 0 and total_bytes > 0)
        report(f"bnb NF4 ({label}): quant_state JSON that differs", state_diff, 0, state_diff == 0)
        report(f"bnb NF4 ({label}): max |dequantize_4bit(omnilite bytes) - dequantize_4bit(bnb bytes)|", worst_dq,
               0.0, worst_dq == 0.0)
        # transformers loads the 4-bit export on the CPU (bitsandbytes' Linear4bit) and scores as OMNI-LITE does
        # with the same codes (omnilite reads the 4-bit export: NF4 attention, the rest in full precision).
        model, info = MixtralForCausalLM.from_pretrained(q_dir, device_map="cpu", output_loading_info=True)
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        missing = sum(len(info.get(k, [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        report(f"bnb 4-bit export ({label}): transformers loads {n4} Linear4bit layers, missing/unexpected keys",
               missing, 0, missing == 0 and n4 == len(quantised))
        scored = score_lines(q_dir, held_out_lines(20))
        # In eval mode on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks the weights for its fused CPU kernel,
        # which computes in bf16; in train mode (Mixtral has no dropout, so the function is the same) Linear4bit
        # dequantises and multiplies in the fp32 compute dtype, which is what is compared here.
        model.train()
        worst = max_logprob_diff(model, scored)
        report(f"bnb 4-bit export ({label}): log-probs, max |transformers 4-bit (fp32 path) - omnilite score|", worst,
               LOGPROB_BOUND, worst <= LOGPROB_BOUND)
        model.eval()
        worst = max_logprob_diff(model, scored)
        report(f"bnb 4-bit export ({label}): the same in eval mode (bitsandbytes' bf16 CPU kernel where it runs)",
               worst, BF16_BOUND, worst <= BF16_BOUND)
    finish()


if __name__ == "__main__":
    main()
