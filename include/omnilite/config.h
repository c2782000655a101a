// Typed configuration of OMNI-LITE.
//
// JSON is parsed once, at the edge (config.cpp), into these structs; modules only ever see the structs.
// Every field carries a comment with its meaning and the full model's value. Validation (unknown keys,
// wrong types, inconsistent dimensions) happens in parse_config/validate and throws ConfigError naming the
// key, the value and the rule.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace omnilite {

// Thrown for every invalid configuration; what() names the dotted key, the value and the rule.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Vision patch embedding + ViT encoder (card layers 1 and 2).
struct VisionOptions {
  int64_t image_size = 224;    // square input side in pixels the position table is built for (224 -> 16x16 patches)
  int64_t in_channels = 3;     // image channels (RGB = 3)
  int64_t patch_size = 14;     // Conv2d kernel and stride of the patch embedding (card: 14)
  int64_t width = 1024;        // ViT embedding width (card: 1024)
  int64_t depth = 12;          // number of pre-norm ViT blocks (card: 12)
  int64_t num_heads = 16;      // attention heads per ViT block (card: 16)
  int64_t mlp_dim = 4096;      // hidden width of the GELU MLP (card: 4096)
  double norm_eps = 1e-6;      // LayerNorm epsilon (1e-6, as in ViT; CLIP: 1e-5)
  // CLIP's variant (an HF CLIPVisionModel imports only with class_token, pre_norm and quick_gelu, see init --from):
  bool class_token = false;    // a learned class embedding before the patches; pos_embed row 0 is its position
  bool pre_norm = false;       // a LayerNorm over the embeddings before block 0 (CLIP's pre_layrnorm)
  std::string activation = "gelu";  // MLP activation: "gelu" (erf, ViT) or "quick_gelu" (x * sigmoid(1.702 x), CLIP)
  bool final_norm = true;      // a LayerNorm over every output token (ViT); false: the last block's output as is
                               // (CLIP's hidden states, LLaVA's features)
};

// Perceiver Resampler (card layer 3): vision features -> num_latents tokens of the text width.
struct ResamplerOptions {
  int64_t num_latents = 64;    // learned latent queries = image tokens in the text sequence (card: 64)
  int64_t depth = 2;           // cross-attention + feed-forward layers (Flamingo uses 6; 2 here)
  int64_t num_heads = 16;      // attention heads; head_dim = text.hidden_size / num_heads (2048/16 = 128)
  int64_t ff_mult = 4;         // feed-forward hidden = ff_mult * text.hidden_size (4 -> 8192)
  double norm_eps = 1e-5;      // LayerNorm epsilon
};

// Text backbone: token embedding, decoder layers of GQA + MoE, final norm, LM head (card layers 4-6).
struct TextOptions {
  int64_t vocab_size = 32000;          // rows of the token embedding and LM head outputs (card: 32000)
  int64_t hidden_size = 2048;          // model width (card: 2048)
  int64_t num_layers = 24;             // decoder layers (card: repeat 24)
  int64_t num_heads = 32;              // query heads (card: 32)
  int64_t num_kv_heads = 8;            // key/value heads shared by groups of query heads (card: 8)
  int64_t head_dim = 64;               // per-head width; num_heads * head_dim == hidden_size (2048/32 = 64)
  int64_t rope_dim = 64;               // leading dims of each head rotated by RoPE (card: 64, i.e. the full head)
  double rope_theta = 1e6;             // RoPE base (Mixtral: 1e6)
  double rms_norm_eps = 1e-5;          // RMSNorm epsilon (Mixtral: 1e-5)
  int64_t max_position_embeddings = 4096;  // longest sequence accepted by the model (positions 0..4095)
  bool tie_word_embeddings = false;    // LM head shares the embedding table (false: separate 2048->32000 head)
};

// Sparse mixture-of-experts feed-forward inside every decoder layer.
struct MoEOptions {
  int64_t num_experts = 16;    // experts per layer (card: 16)
  int64_t top_k = 2;           // experts each token is routed to (card: 2)
  int64_t expert_hidden = 768; // SwiGLU width F of each expert; left open by the card, 768 meets both its claims
};

// Rectified-flow head and its input side (card layer 7): image latent tokens <-> text width.
struct FlowOptions {
  int64_t latent_channels = 4;   // channels of the VQ-VAE latent (card: 4)
  int64_t patch_size = 4;        // latent patch side per token: 4x4 patches -> 4*4*4 = 64 values per token
  int64_t time_embed_dim = 256;  // sinusoidal timestep features before the MLP (DiT: 256)
};

// VQ-VAE (card layer 8): encoder 3 -> latent_channels with 8x downsampling, codebook, decoder ending in
// Conv2d(latent_channels -> 3, kernel 3).
struct VQVAEOptions {
  int64_t in_channels = 3;       // image channels
  int64_t base_channels = 64;    // channels of the first conv; doubled at each downsampling (64,128,256)
  int64_t num_downsamples = 3;   // stride-2 stages: 2^3 = 8x downsampling (card: 8x)
  int64_t codebook_size = 1024;  // number of codes of the quantiser
  double commitment_beta = 0.25; // weight of the commitment term (VQ-VAE paper: 0.25)
  int64_t image_size = 256;      // square image side for the VQ-VAE and generation: latent grid image_size / 2^n
};

// Token ids the model treats specially. Placeholders are replaced by image features inside the model.
struct TokenOptions {
  int64_t bos_id = 1;           // beginning of sequence (SentencePiece default 1)
  int64_t eos_id = 2;           // end of sequence / document separator (SentencePiece default 2)
  int64_t pad_id = 0;           // padding, never a target (0 = <unk> of SentencePiece models without <pad>)
  int64_t image_id = 3;         // placeholder: each run of num_latents of these is filled by one resampled image
  int64_t image_begin_id = 4;   // marks the start of an image (understanding or generation)
  int64_t image_end_id = 5;     // marks the end of an image
  int64_t gen_image_id = 6;     // placeholder: one per latent token of a generated image (bidirectional block)
};

// The whole model.
struct ModelConfig {
  VisionOptions vision;
  ResamplerOptions resampler;
  TextOptions text;
  MoEOptions moe;
  FlowOptions flow;
  VQVAEOptions vqvae;
  TokenOptions tokens;

  // Values per latent token of a generated image: latent_channels * patch_size^2 (4*4*4 = 64).
  int64_t flow_token_dim() const { return flow.latent_channels * flow.patch_size * flow.patch_size; }
  // Pixel downsampling factor of the VQ-VAE (2^num_downsamples = 8).
  int64_t vq_downsample() const { return int64_t{1} << vqvae.num_downsamples; }
};

// Execution settings: where and how the model runs (not part of the model's identity).
struct RuntimeOptions {
  std::string device = "cpu";    // "cpu", "cuda" or "cuda:N"
  std::string dtype = "fp32";    // compute dtype on CUDA with autocast: "fp32" or "bf16" (CPU always runs fp32)
  int64_t threads = 0;           // LibTorch intra-op threads; 0 = number of cores
  int64_t blas_threads = 1;      // OpenBLAS threads, 0 = number of cores; never give both pools all cores: two
                                 // spinning pools fight over them (see docs/benchmarks.md for the measured split)
  uint64_t seed = 1234;          // seed for parameter initialisation and sampling
  std::string moe_dispatch = "auto";  // how MoE layers run their experts: "auto", "loop" or "grouped" (same results;
                                      // MoEDispatch in modules/moe.h, measured in docs/benchmarks.md)
  std::string nf4_activations = "fp32";  // one-row NF4 products (CPU decoding): "fp32" (exact) or "int16" (inputs
                                         // rounded to 16 bits per 64-block: faster, ~3e-5 relative error;
                                         // quant/nf4.h, docs/benchmarks.md)
};

// Optimisation and run settings of `omnilite train`.
struct TrainOptions {
  int64_t steps = 200;            // optimizer steps of the run (--max-steps overrides)
  int64_t batch_size = 8;         // sequences per micro-batch
  int64_t grad_accum = 1;         // micro-batches per optimizer step
  int64_t seq_len = 128;          // tokens per packed text sequence
  double lr = 3e-4;               // peak learning rate of AdamW
  double min_lr_ratio = 0.1;      // cosine decays to lr * min_lr_ratio
  int64_t warmup_steps = 20;      // linear warmup from 0 to lr
  double weight_decay = 0.1;      // AdamW decay of matrices (never of norms, biases, embeddings)
  double beta1 = 0.9;             // AdamW beta1
  double beta2 = 0.95;            // AdamW beta2
  double eps = 1e-8;              // AdamW epsilon
  double grad_clip = 1.0;         // max global gradient norm (0 = no clipping)
  double aux_coef = 0.01;         // alpha: weight of the load-balancing loss
  double z_coef = 0.001;          // beta: weight of the router z-loss
  double rf_weight = 1.0;         // lambda_rf: weight of the rectified-flow loss
  int64_t log_every = 10;         // steps between progress lines
  int64_t ckpt_every = 100;       // steps between checkpoints (the last step always writes one)
  int64_t keep_last = 2;          // checkpoints kept in the run folder
  int64_t max_bad_steps = 5;      // consecutive NaN/Inf losses that stop the run
  uint64_t seed = 1234;           // global seed: initialisation, data order, noise
  std::string stage = "omni";     // what `omnilite train` trains: "omni" (the model), "vqvae" (the VQ-VAE alone) or
                                  // "classifier" (the image classifier that judges generated images in eval)
  int64_t caption_batch_size = 0; // omni: image -> caption samples per micro-batch (image understanding)
  int64_t gen_batch_size = 0;     // omni: caption -> image samples per micro-batch (rectified-flow generation)
  int64_t image_seq_len = 0;      // omni: tokens per image-caption row (0 = the shortest that holds every sample)
  int64_t sft_batch_size = 0;     // omni: rows of conversations (data.sft_train) per micro-batch (supervised fine-tuning)
  int64_t sft_seq_len = 0;        // omni: tokens per conversation row (0 = the longest sample; a longer one is skipped)
  bool sft_packing = true;        // omni: pack several conversations into a row, each attending only to itself
                                  // (block-diagonal causal mask, positions from 0 per sample); false = one per row
  bool train_on_input = false;    // omni: conversations' loss on every token, not only the assistant turns and their
                                  // end-of-turn token
  bool document_masks = false;    // omni: packed text rows attend within their own document (a new one at each BOS,
                                  // positions from 0); false = across document boundaries, as GPT-style packing does
  double cfg_dropout = 0.1;       // omni: probability that a generation sample's prompt is dropped (for CFG)
  std::string flow_time = "logit_normal";  // omni: flow-time distribution, "logit_normal" (SD3) or "uniform"
  double flow_time_mean = 0.0;    // omni: mean of the logit-normal's underlying normal
  double flow_time_std = 1.0;     // omni: std of the logit-normal's underlying normal
  std::vector<std::string> freeze = {};  // parameters to freeze, by name pattern ('*' matches any text), e.g.
                                         // "vision.*"; omni always freezes vqvae.*
  bool activation_checkpointing = false; // recompute each decoder layer in backward instead of keeping activations
  int64_t loader_threads = 1;     // background threads preparing micro-batches ahead (0 = in the step thread)
  int64_t valid_every = 0;        // steps between validation passes (0 = only at the end)
  int64_t valid_batches = 4;      // micro-batches per validation pass
  int64_t vq_restart_every = 50;  // vqvae: codes unused over this many steps restart at encoder outputs (0 = never)
  std::string base_checkpoint;    // omni: the weights to start from (an `omnilite init`, pretraining or HF export
                                  // folder or .safetensors file). With lora.enabled the frozen base (NF4: quantised
                                  // tensor by tensor on load); without, a full fine-tune from it (strict load)
  double dist_timeout_s = 600;    // data-parallel runs: a rendezvous or collective that waits longer (a rank died or
                                  // hangs) stops every rank with an error
  double bucket_mb = 25;          // data-parallel runs: MiB of gradients per all-reduce bucket
  int64_t zero = 0;               // data-parallel runs: ZeRO stage (include/omnilite/train/zero.h, distributed.md).
                                  // 0 replicates everything; 1 shards the AdamW state (checkpoints stay unsharded);
                                  // 2 also the gradients (reduce-scattered); 3 also the parameters (each decoder layer
                                  // gathered around its forward and backward). 2 and 3 write sharded checkpoints
  bool zero1 = false;             // the older spelling of zero = 1 (kept working; zero1 with zero = 2 or 3 is refused)
  // The ZeRO stage the run uses: train.zero, or 1 for train.zero1.
  int64_t zero_stage() const { return zero > 0 ? zero : (zero1 ? 1 : 0); }
  bool tensorboard = true;        // also write every metrics.jsonl scalar as TensorBoard events into RUN/tb/
};

// One weighted source of a data mixture (data.mixture; docs/training.md, "Mixtures").
struct MixtureSource {
  std::string name;                  // the source in metrics (mix_<name>) and messages: [a-z0-9_]+, unique
  std::string kind = "text";         // "text": rows of train.batch_size (entries as data.text_train takes them);
                                     // "images": caption and generation samples (entries as data.image_train);
                                     // "sft": conversation rows of train.sft_batch_size (as data.sft_train)
  std::vector<std::string> sources;  // its files / folders
  double weight = 1;                 // its share of its kind's rows: weight / the sum of the kind's weights
};

// Where the training data is.
struct DataOptions {
  std::string tokenizer = "data/generated/tokenizer.model";  // SentencePiece model
  std::vector<std::string> text_train = {"data/generated/text/train.txt"};  // .txt / .jsonl documents
  std::vector<std::string> text_valid = {"data/generated/text/valid.txt"};  // held-out documents
  // Image-caption sources: an IDX prefix (".../fashion-mnist/train" -> train-images-idx3-ubyte and
  // train-labels-idx1-ubyte, captions from the class names), a .jsonl of {"image": path, "text": caption
  // [, "label": k]}, a COCO captions .json ({"images": [{id, file_name}], "annotations": [{image_id, caption}]})
  // or WebDataset tar shards (a .tar, or a folder of them; image_shards.h), streamed.
  std::vector<std::string> image_train = {"data/generated/fashion-mnist/train"};
  std::vector<std::string> image_valid = {"data/generated/fashion-mnist/t10k"};  // held-out image-caption sources
  // Conversations for supervised fine-tuning (train.sft_batch_size rows per micro-batch): .json / .jsonl records,
  // instruction (Alpaca), chat ({"messages": ...}) or image conversations (LLaVA); docs/training.md has the formats.
  std::vector<std::string> sft_train = {};
  std::vector<std::string> sft_valid = {};  // held-out conversations (valid_loss_sft)
  std::string image_root;         // folder of relative image paths ("" = the folder of the .jsonl / .json file)
  int64_t max_images = 0;         // images read per source list (0 = all)
  std::string vqvae;              // omni: VQ-VAE run or checkpoint folder (stage "vqvae") whose frozen encoder
                                  // supplies the flow targets; required when train.gen_batch_size > 0
  std::string classifier;         // eval: classifier run or checkpoint folder (stage "classifier") for t2i_accuracy
  // omni stage: weighted sources; the text sources, when any, replace data.text_train, the image ones
  // data.image_train, the sft ones data.sft_train (each row or sample drawn from one source, deterministically, in
  // proportion to the weights)
  std::vector<MixtureSource> mixture = {};
};

// QLoRA fine-tuning: LoRA adapters on some projections, their frozen bases in NF4. Only adapters train.
struct LoRAOptions {
  bool enabled = false;      // build adapters (and NF4 bases); every other parameter is frozen
  int64_t rank = 16;         // r: inner width of each adapter
  double alpha = 32.0;       // scale of the update: alpha / r
  double dropout = 0.05;     // dropout on the adapter's input
  // Projections that get an adapter, by checkpoint path pattern ('*' = any text): attention q/k/v/o and the
  // experts' w1/w2/w3 of every layer, the resampler's and the vision encoder's projections. The LM head and the
  // routers (moe.gate) are never builder-made, so they stay in full precision.
  std::vector<std::string> target_modules = {"text.layers.*.self_attn.*", "text.layers.*.moe.experts.*",
                                             "resampler.*", "vision.*"};
  std::string base_dtype = "nf4";  // frozen bases of builder-made projections: "nf4" or "fp32"
  std::vector<std::string> full_precision = {"flow.*"};  // projections kept out of NF4 (besides in % 64 != 0)
  std::string init_adapter;        // adapter the run starts from instead of B = 0: a QLoRA run or checkpoint
                                   // folder, or a PEFT adapter folder of the hf export (same rank, alpha, targets)
  // Parameters trained in full beside the adapters (PEFT's modules_to_save), by checkpoint-name pattern, e.g.
  // "resampler.*" (LLaVA stage 2): their projections are plain fp32 (no NF4, no adapter), they are saved with the
  // adapters, and merging writes them as trained.
  std::vector<std::string> modules_to_save;
};

// A config file: {"model": {...}, "runtime": {...}, "train": {...}, "data": {...}, "lora": {...}}.
struct Config {
  ModelConfig model;
  RuntimeOptions runtime;
  TrainOptions train;
  DataOptions data;
  LoRAOptions lora;
};

// Applies "a.b.c=VALUE" (`train --set`) to a config JSON; VALUE is read as JSON when it parses (numbers, true,
// [..]) and as a string otherwise. Throws ConfigError for a malformed assignment; the result is validated like a
// file by parse_config.
void apply_config_override(nlohmann::json& j, const std::string& assignment);

// Parses and validates a config JSON object. Throws ConfigError.
Config parse_config(const nlohmann::json& j);
// Reads a config file as JSON: a file with "extends": "other.json" (a path relative to the file) is that file with
// this one's keys merged over it, section by section. Throws ConfigError naming the file.
nlohmann::json read_config_json(const std::string& path);
// Reads a JSON file (config or design card, detected by its "layers" key) and parses it. Throws ConfigError.
Config load_config_file(const std::string& path);
// Builds the model configuration described by the design card (../shared/spec/omni-lite.spec.json); values the
// card leaves open keep the defaults above. Throws ConfigError naming the layer when the card is inconsistent.
Config config_from_spec(const nlohmann::json& spec);
// Checks the dimensional rules (heads divide width, ...). Throws ConfigError naming key, value and rule.
void validate(const Config& c);
// The config back as JSON, every field present (used by `info --json`, checkpoints and the spec test).
nlohmann::json to_json(const Config& c);

}  // namespace omnilite
