"""Builds the interop fixtures under build/interop/ and lists them in fixtures.json.

- small-untied / small-tied: configs/small.json (4096-token vocabulary, 4 layers, 8 experts) with an untied and a
  tied LM head, randomly initialised in fp32 by `omnilite init`, each exported with `--format hf` in 1, 2 and 3
  shards (hf-untied-1, hf-untied-2, hf-tied-3, ...).
- quickstart: the quickstart's trained model (runs/quickstart), exported the same way, when it exists.
- gguf-*: the untied and tied random models and the quickstart model exported with `--format gguf` in every
  `--type` (f32, f16, bf16, q8_0, q4_0), and each imported back (`export --checkpoint X.gguf --multimodal`): the
  OMNI-LITE model on the GGUF's dequantised weights.
- init-unigram: the untied model with a unigram tokenizer, for the export's warning (llama.cpp splits it otherwise).
Folders that exist are kept (delete build/interop to rebuild).
"""
import json
import math
import shutil
from pathlib import Path

from common import FIX, ROOT, omnilite

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def sharded(src, out, shards, extra=()):
    """Exports `src` with --format hf in exactly `shards` shards (the shard size is searched)."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    total = None
    limit = "50GB"
    for _ in range(8):
        tmp = out.with_name(out.name + ".try")
        shutil.rmtree(tmp, ignore_errors=True)
        omnilite("export", "--checkpoint", src, "--format", "hf", "--out", tmp, "--max-shard-size", limit, *extra)
        files = sorted(tmp.glob("model*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        total = total or size
        if len(files) == shards:
            tmp.rename(out)
            return out
        limit = str(math.ceil(total / shards * (1.0 + 0.05 * (_ + 1)))) if len(files) > shards or shards > 1 else "50GB"
    raise RuntimeError(f"could not export {src} in {shards} shards")


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    base = json.loads((ROOT / "configs/small.json").read_text())
    listed = {}
    for tied in (False, True):
        name = "tied" if tied else "untied"
        cfg = json.loads(json.dumps(base))
        cfg["model"]["text"]["tie_word_embeddings"] = tied
        cfg_path = FIX / f"small-{name}.json"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        init = FIX / f"init-{name}"
        if not (init / "model.safetensors").exists():
            omnilite("init", "--config", cfg_path, "--out", init, "--dtype", "fp32", "--seed", 11 if tied else 12)
        listed[f"init-{name}"] = {"path": str(init), "kind": "omnilite", "tied": tied}
        for shards in (1, 2, 3):
            out = sharded(init, FIX / f"hf-{name}-{shards}", shards)
            listed[out.name] = {"path": str(out), "kind": "hf", "tied": tied, "shards": shards, "layout": "per-expert"}
    # A QLoRA run (fp32 base, so PEFT on the fp32 export sees the base training saw; dropout 0.05 as users run it)
    # on the untied model, text only, its LoRA factors trained away from zero.
    qcfg = json.loads((FIX / "small-untied.json").read_text())
    qcfg["data"].update({"image_train": [], "image_valid": []})
    qcfg["train"].update({"caption_batch_size": 0, "gen_batch_size": 0, "steps": 10, "batch_size": 2, "seq_len": 32,
                          "lr": 5e-3, "warmup_steps": 1, "ckpt_every": 10, "log_every": 5})
    qcfg["lora"] = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.05, "base_dtype": "fp32"}
    qcfg_path = FIX / "qlora.json"
    qcfg_path.write_text(json.dumps(qcfg, indent=2))
    qrun = FIX / "qlora-run"
    if not (qrun / "checkpoints").exists():
        omnilite("train", "--config", qcfg_path, "--base", FIX / "init-untied", "--out", qrun)
    listed["qlora-run"] = {"path": str(qrun), "kind": "qlora", "base": str(FIX / "init-untied"),
                           "base_hf": str(FIX / "hf-untied-1")}
    qs = ROOT / "runs/quickstart"
    if (qs / "checkpoints").exists():
        out = sharded(qs, FIX / "hf-quickstart", 2)
        listed["hf-quickstart"] = {"path": str(out), "kind": "hf", "tied": bool(
            json.loads((out / "config.json").read_text())["tie_word_embeddings"]), "shards": 2, "layout": "per-expert",
            "trained": True}
        listed["quickstart"] = {"path": str(qs), "kind": "run", "trained": True}
    sources = {"untied": FIX / "init-untied", "tied": FIX / "init-tied"}
    if (qs / "checkpoints").exists():
        sources["quickstart"] = qs
    for name, src in sources.items():
        for t in GGUF_TYPES:
            out = FIX / f"gguf-{name}-{t}.gguf"
            if not out.exists():
                omnilite("export", "--checkpoint", src, "--format", "gguf", "--type", t, "--out", out)
            back = FIX / f"gguf-{name}-{t}.imported"
            if not (back / "state.json").exists():
                shutil.rmtree(back, ignore_errors=True)
                omnilite("export", "--checkpoint", out, "--multimodal", src, "--out", back)
            listed[out.stem] = {"path": str(out), "kind": "gguf", "type": t, "source": str(src),
                                "imported": str(back), "trained": name == "quickstart",
                                "hf": str(FIX / ("hf-quickstart" if name == "quickstart" else f"hf-{name}-1"))}
    # A unigram tokenizer (what llama.cpp cannot reproduce) on the untied model: the export must warn with the share.
    uni = FIX / "unigram.model"
    if not uni.exists():
        omnilite("tokenizer", "train", "--input", ROOT / "data/generated/text/train.txt", "--vocab-size", 4096,
                 "--model-type", "unigram", "--out", uni)
    ucfg = json.loads((FIX / "small-untied.json").read_text())
    ucfg["data"]["tokenizer"] = str(uni)
    (FIX / "small-unigram.json").write_text(json.dumps(ucfg, indent=2))
    uinit = FIX / "init-unigram"
    if not (uinit / "model.safetensors").exists():
        omnilite("init", "--config", FIX / "small-unigram.json", "--out", uinit, "--dtype", "fp32", "--seed", 12)
    listed["init-unigram"] = {"path": str(uinit), "kind": "unigram", "tokenizer": str(uni)}
    (FIX / "fixtures.json").write_text(json.dumps(listed, indent=2))
    print(f"interop fixtures: {', '.join(listed)} in {FIX}")


if __name__ == "__main__":
    main()
