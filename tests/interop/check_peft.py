"""PEFT applies OMNI-LITE's adapter: `omnilite export --adapter RUN --format peft` gives a folder that
PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(hf export of the base), folder) loads with every tensor
used; its log-probs equal `omnilite score` on the merged export (--merge --format hf) within 1e-4, and PEFT's
merge_and_unload() gives the merged export's weights within 1e-5 relative."""
import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import MixtralForCausalLM

from common import FIX, finish, fixtures, held_out_lines, max_logprob_diff, omnilite, report, score_lines

LOGPROB_BOUND = 1e-4
WEIGHT_BOUND = 1e-5


def main():
    fx = fixtures()["qlora-run"]
    peft_dir, merged_dir = FIX / "qlora-peft", FIX / "qlora-merged-hf"
    omnilite("export", "--adapter", fx["path"], "--format", "peft", "--out", peft_dir)
    if not (merged_dir / "config.json").exists():
        omnilite("export", "--checkpoint", fx["base"], "--adapter", fx["path"], "--merge", "--format", "hf",
                 "--out", merged_dir)
    base = MixtralForCausalLM.from_pretrained(fx["base_hf"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, peft_dir)
    model.eval()
    saved = load_file(str(peft_dir / "adapter_model.safetensors"))
    nonzero_b = sum(int(v.abs().sum() > 0) for k, v in saved.items() if "lora_B" in k)
    report(f"peft: lora_B tensors that training moved away from zero, of {sum('lora_B' in k for k in saved)}",
           nonzero_b, ">0", nonzero_b > 0)
    # Every saved tensor is one PEFT holds, with the same values.
    from peft import get_peft_model_state_dict
    held = get_peft_model_state_dict(model)
    unused = sorted(set(saved) - set(held)) + sorted(set(held) - set(saved))
    mism = sum(not torch.equal(held[k], saved[k]) for k in set(saved) & set(held))
    report("peft: adapter tensors PEFT does not hold (or holds differently)", len(unused) + mism, 0,
           not unused and mism == 0)
    scored = score_lines(merged_dir, held_out_lines(20))
    worst = max_logprob_diff(model, scored)
    report(f"peft: log-probs of {len(scored)} held-out lines, max |PeftModel - omnilite score (merged export)|",
           worst, LOGPROB_BOUND, worst <= LOGPROB_BOUND)
    merged = model.merge_and_unload()
    ours = {}
    for f in sorted(Path(merged_dir).glob("model*.safetensors")):
        ours.update(load_file(str(f)))
    theirs = {k: v for k, v in merged.state_dict().items()}
    worst, compared = 0.0, 0
    for layer in range(merged.config.num_hidden_layers):
        ex = merged.model.layers[layer].mlp.experts
        for e in range(merged.config.num_local_experts):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            w13 = torch.cat([ours[p + "w1.weight"], ours[p + "w3.weight"]])
            for a, b in ((ex.gate_up_proj[e], w13), (ex.down_proj[e], ours[p + "w2.weight"])):
                worst = max(worst, ((a.detach() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
                compared += 1
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            k = f"model.layers.{layer}.self_attn.{proj}.weight"
            worst = max(worst, ((theirs[k] - ours[k]).abs().max() / ours[k].abs().max()).item())
            compared += 1
    report(f"peft: merge_and_unload() vs omnilite export --merge, max relative |diff| over {compared} matrices",
           worst, WEIGHT_BOUND, worst <= WEIGHT_BOUND)


def reverse():
    """An adapter PEFT trained (here: PEFT-initialised with random A and B) on the hf export of the base loads into
    OMNI-LITE: `omnilite export --checkpoint BASE --adapter PEFT_DIR --merge --format hf` scores as PeftModel does."""
    from peft import LoraConfig, get_peft_model
    fx = fixtures()["qlora-run"]
    base = MixtralForCausalLM.from_pretrained(fx["base_hf"], dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)
    model = get_peft_model(base, cfg)
    model.eval()
    src_dir, merged_dir = FIX / "peft-trained", FIX / "peft-trained-merged-hf"
    model.save_pretrained(src_dir)
    omnilite("export", "--checkpoint", fx["base"], "--adapter", src_dir, "--merge", "--format", "hf",
             "--out", merged_dir)
    scored = score_lines(merged_dir, held_out_lines(20))
    worst = max_logprob_diff(model, scored)
    report(f"peft -> omnilite: a PEFT-made adapter merged by omnilite, log-probs of {len(scored)} lines, max |diff|",
           worst, LOGPROB_BOUND, worst <= LOGPROB_BOUND)
    # The same adapter as the starting adapter of an OMNI-LITE run (lora.init_adapter), one step at lr 1e-12.
    run = FIX / "peft-started-run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    qcfg = json.loads((FIX / "qlora.json").read_text())
    qcfg["lora"].update({"alpha": 16, "init_adapter": str(src_dir)})
    qcfg["train"].update({"steps": 1, "lr": 1e-12, "ckpt_every": 1})
    (FIX / "peft-started.json").write_text(json.dumps(qcfg))
    omnilite("train", "--config", FIX / "peft-started.json", "--base", fx["base"], "--out", run)
    run_merged = FIX / "peft-started-merged-hf"
    omnilite("export", "--checkpoint", fx["base"], "--adapter", run, "--merge", "--format", "hf", "--out", run_merged)
    worst = max_logprob_diff(model, score_lines(run_merged, held_out_lines(20)))
    report("peft -> omnilite: a run started from the PEFT adapter (lora.init_adapter), log-probs, max |diff|",
           worst, LOGPROB_BOUND, worst <= LOGPROB_BOUND)


if __name__ == "__main__":
    main()
    reverse()
    finish()
