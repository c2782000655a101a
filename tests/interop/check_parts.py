"""`omnilite init --from` against the libraries whose checkpoints it reads.

- vision: a CLIPVisionModel with random weights and the card's dimensions (1024 wide, 16 heads, MLP 4096, patch 14,
  224 px; 13 layers, of which the model takes 12), saved by transformers, imported with `--from vision=`: the
  vision features `omnilite embed` writes equal transformers' hidden_states[12] of the same pixels (CLIP's
  normalisation applied by the check, folded into the patch embedding by the import), and with
  model.vision.final_norm = true, post_layernorm of them.
- text: a small random MixtralForCausalLM saved by transformers, imported with `--from text=`: `omnilite score`
  gives transformers' per-token log-probs.
- tokenizer: a SentencePiece BPE model trained by sentencepiece without the markers, extended by `--from
  tokenizer=`: sentencepiece reads the extended file, finds each marker at the id the written config.json gives,
  and encodes held-out text exactly as the original does.
"""
import json
import shutil

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, MixtralConfig, MixtralForCausalLM

from common import FIX, ROOT, finish, held_out_lines, max_logprob_diff, omnilite, report, score_lines

HIDDEN_BOUND = 1e-5   # max |diff| / max(1, max |transformers|), fp32 both sides
LOGPROB_BOUND = 1e-4  # as the export's check
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def base_config(vocab):
    cfg = json.loads((ROOT / "configs/tiny.json").read_text())
    cfg["model"]["text"]["vocab_size"] = vocab
    cfg["data"] = {"tokenizer": str(ROOT / "data/generated/tokenizer.model")}
    return cfg


def write_config(cfg, name):
    path = FIX / "parts" / name
    path.write_text(json.dumps(cfg, indent=2))
    return path


def init(cfg_path, out, *from_specs, extra=()):
    shutil.rmtree(out, ignore_errors=True)
    args = ["init", "--config", cfg_path, "--out", out, "--dtype", "fp32"]
    for f in from_specs:
        args += ["--from", f]
    omnilite(*args, *extra)
    return out


def write_ppm(path, pixels):
    h, w, _ = pixels.shape
    path.write_bytes(f"P6\n{w} {h}\n255\n".encode() + pixels.astype(np.uint8).tobytes())


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / max(1.0, b.double().abs().max().item())).item()


def check_vision():
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=13, num_attention_heads=16,
                          image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    clip = CLIPVisionModel(vc).eval()
    src = FIX / "parts" / "clip"
    shutil.rmtree(src, ignore_errors=True)
    clip.save_pretrained(src)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3)) for _ in range(2)]
    files = []
    for i, img in enumerate(images):
        files.append(FIX / "parts" / f"image{i}.ppm")
        write_ppm(files[-1], img)
    pixels = torch.tensor(np.stack([(img / 255.0 - CLIP_MEAN) / CLIP_STD for img in images]).transpose(0, 3, 1, 2),
                          dtype=torch.float32)
    with torch.no_grad():
        out = clip(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states[12]                       # after the 12th encoder layer
        post = clip.post_layernorm if hasattr(clip, "post_layernorm") else clip.vision_model.post_layernorm
        normed = post(hidden)
    for final_norm, want in ((False, hidden), (True, normed)):
        cfg = base_config(4096)
        cfg["model"]["vision"] = {"image_size": 224, "in_channels": 3, "patch_size": 14, "width": 1024, "depth": 12,
                                  "num_heads": 16, "mlp_dim": 4096, "norm_eps": 1e-5, "class_token": True,
                                  "pre_norm": True, "activation": "quick_gelu", "final_norm": final_norm}
        path = write_config(cfg, f"clip-{final_norm}.json")
        ck = init(path, FIX / "parts" / f"init-clip-{final_norm}", f"vision={src}")
        feats = FIX / "parts" / "features.safetensors"
        args = ["embed", "--checkpoint", ck, "--out", feats]
        for f in files:
            args += ["--image", f]
        omnilite(*args)
        got = load_file(str(feats))["vision"]
        ok_shape = tuple(got.shape) == tuple(want.shape)
        err = rel(got, want) if ok_shape else float("inf")
        what = "post_layernorm(hidden_states[12])" if final_norm else "hidden_states[12]"
        report(f"parts: CLIPVisionModel (1024 wide, 13 layers) -> init --from vision, depth 12: embed vs transformers' "
               f"{what} of 2 images, max |diff| / max(1, max |transformers|)",
               f"{err:.2e} (|diff| {(got - want).abs().max().item():.2e}, scale {want.abs().max().item():.3g}, "
               f"{list(got.shape)})" if ok_shape else f"shape {list(got.shape)}", HIDDEN_BOUND,
               ok_shape and err <= HIDDEN_BOUND)
        shutil.rmtree(ck, ignore_errors=True)  # 0.6 GB each
    shutil.rmtree(src, ignore_errors=True)


def check_text():
    torch.manual_seed(1)
    mc = MixtralConfig(vocab_size=4096, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5)
    model = MixtralForCausalLM(mc).eval()
    src = FIX / "parts" / "mixtral"
    shutil.rmtree(src, ignore_errors=True)
    model.save_pretrained(src)
    cfg = base_config(4096)
    cfg["model"]["text"]["rms_norm_eps"] = 1e-5
    ck = init(write_config(cfg, "mixtral.json"), FIX / "parts" / "init-mixtral", f"text={src}")
    lines = held_out_lines(40)
    scored = score_lines(ck, lines)
    worst = max_logprob_diff(model, scored)
    report(f"parts: MixtralForCausalLM (random, 2 layers) -> init --from text: log-probs of {len(scored)} held-out "
           "lines, max |transformers - omnilite score|", worst, LOGPROB_BOUND, worst <= LOGPROB_BOUND)


def check_tokenizer():
    import sentencepiece as spm
    corpus = FIX / "parts" / "corpus.txt"
    corpus.write_text("\n".join(held_out_lines(400)) + "\n", encoding="utf-8")
    prefix = FIX / "parts" / "llama-like"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=600, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    cfg = base_config(1000)
    ck = init(write_config(cfg, "tokenizer.json"), FIX / "parts" / "init-tokenizer",
              f"tokenizer={prefix}.model")
    written = json.loads((ck / "config.json").read_text())
    tokens, vocab = written["model"]["tokens"], written["model"]["text"]["vocab_size"]
    ext = spm.SentencePieceProcessor(model_file=str(ck / "tokenizer.model"))
    orig = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    markers = {"<image>": "image_id", "<image_begin>": "image_begin_id", "<image_end>": "image_end_id",
               "<gen_image>": "gen_image_id"}
    wrong = [m for m, k in markers.items() if ext.piece_to_id(m) != tokens[k] or tokens[k] < orig.get_piece_size()]
    report("parts: extended tokenizer: sentencepiece finds each marker at config.json's id (after the original "
           "pieces), vocab_size = pieces", f"{len(wrong)} wrong, {ext.get_piece_size()} pieces / vocab {vocab}", 0,
           not wrong and ext.get_piece_size() == vocab == orig.get_piece_size() + 4)
    lines = held_out_lines(100)
    differ = sum(ext.encode(l) != orig.encode(l) for l in lines)
    report(f"parts: extended tokenizer encodes {len(lines)} held-out lines as the original (sentencepiece)", differ, 0,
           differ == 0)
    joined = ext.encode("a <image_begin> b")
    report("parts: the extended tokenizer's marker is one user-defined piece in sentencepiece",
           int(tokens["image_begin_id"] in joined), 1, tokens["image_begin_id"] in joined)


def main():
    (FIX / "parts").mkdir(parents=True, exist_ok=True)
    check_tokenizer()
    check_text()
    check_vision()
    finish()


if __name__ == "__main__":
    main()
