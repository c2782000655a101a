"""transformers reads the `--format hf` export: no missing or unexpected keys, the fused experts it builds equal the
exported per-expert weights, its per-token log-probs equal `omnilite score` (fp32, 1e-4), and its greedy generate
gives the tokens of `omnilite generate --temperature 0`."""
import json

import torch
from safetensors import safe_open
from transformers import MixtralForCausalLM

from common import finish, fixtures, held_out_lines, max_logprob_diff, omnilite, report, score_lines

LOGPROB_BOUND = 1e-4


def exported_tensor(folder, name):
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(folder / shard), "pt") as f:
        return f.get_tensor(name)


def main():
    from pathlib import Path
    lines = held_out_lines(40)
    for name, fx in fixtures().items():
        if fx["kind"] != "hf":
            continue
        path = Path(fx["path"])
        model, info = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        model.eval()
        bad = {k: list(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
        report(f"{name}: transformers load, missing/unexpected/mismatched keys", sum(map(len, bad.values())), 0,
               not bad)
        # transformers fuses the per-expert tensors on load: gate_up_proj[e] = [w1; w3], down_proj[e] = w2.
        cfg = json.loads((path / "config.json").read_text())
        worst = 0.0
        for layer in range(cfg["num_hidden_layers"]):
            experts = model.model.layers[layer].mlp.experts
            for e in range(cfg["num_local_experts"]):
                p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
                w13 = torch.cat([exported_tensor(path, p + "w1.weight"), exported_tensor(path, p + "w3.weight")])
                worst = max(worst, (experts.gate_up_proj[e].detach() - w13).abs().max().item(),
                            (experts.down_proj[e].detach() - exported_tensor(path, p + "w2.weight")).abs().max().item())
        report(f"{name}: fused experts (gate_up_proj, down_proj) vs exported w1/w3/w2, max |diff|", worst, 0.0,
               worst == 0.0)
        scored = score_lines(path, lines)
        worst = max_logprob_diff(model, scored)
        report(f"{name}: log-probs of {len(scored)} held-out lines, max |transformers - omnilite score|", worst,
               LOGPROB_BOUND, worst <= LOGPROB_BOUND)
        differ = 0
        prompts = lines[:5]
        for p in prompts:
            o = omnilite("generate", "--checkpoint", path, "--prompt", p, "--temperature", 0, "--max-new-tokens", 16,
                         "--json", json_out=True)
            ids = torch.tensor([o["prompt_tokens"]])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                     eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["eos_token_id"])
            hf = out[0, ids.shape[1]:].tolist()
            if cfg["eos_token_id"] in hf:
                hf = hf[: hf.index(cfg["eos_token_id"]) + 1]
            differ += hf != o["tokens"]
        report(f"{name}: greedy generate (16 tokens) of {len(prompts)} prompts, prompts whose tokens differ", differ,
               0, differ == 0)
    finish()


if __name__ == "__main__":
    main()
