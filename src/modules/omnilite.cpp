#include "omnilite/modules/omnilite.h"

namespace omnilite {

// tokens: [B, T] -> [B, T] int64 block ids
torch::Tensor generated_block_ids(const torch::Tensor& tokens, int64_t gen_image_id) {
  auto is_gen = tokens.eq(gen_image_id);                                             // [B, T]
  auto prev = torch::cat({torch::zeros_like(is_gen.narrow(1, 0, 1)), is_gen.narrow(1, 0, is_gen.size(1) - 1)}, 1);
  auto starts = is_gen.logical_and(prev.logical_not());                              // first token of each run
  return starts.to(torch::kInt64).cumsum(1) * is_gen.to(torch::kInt64);
}

// tokens: [B, T] -> [B, 1, T, T]
torch::Tensor mixed_attention_mask(const torch::Tensor& tokens, int64_t gen_image_id) {
  const int64_t T = tokens.size(1);
  auto blk = generated_block_ids(tokens, gen_image_id);                               // [B, T]
  auto causal = torch::ones({T, T}, tokens.options().dtype(torch::kBool)).tril();  // [T, T]
  auto same_block = blk.unsqueeze(2).eq(blk.unsqueeze(1)).logical_and(blk.unsqueeze(2).gt(0));  // [B, T, T]
  return causal.unsqueeze(0).logical_or(same_block).unsqueeze(1);
}

// segments [B, T] -> [B, T]
torch::Tensor segment_positions(const torch::Tensor& segments) {
  const int64_t T = segments.size(1);
  auto idx = torch::arange(T, segments.options()).unsqueeze(0).expand_as(segments);  // [B, T]
  auto prev = torch::cat({segments.narrow(1, 0, 1) - 1, segments.narrow(1, 0, T - 1)}, 1);
  auto start = torch::where(segments.ne(prev), idx, torch::zeros_like(idx));         // index where a segment starts
  return idx - std::get<0>(start.cummax(1));
}

// tokens [B, T] -> [B, T]
torch::Tensor segments_from_bos(const torch::Tensor& tokens, int64_t bos_id) {
  return tokens.eq(bos_id).to(torch::kInt64).cumsum(1);
}

OmniLiteImpl::OmniLiteImpl(const ModelConfig& c, const LinearBuilder& builder) : cfg(c) {
  const int64_t D = c.text.hidden_size;
  vision = register_module("vision", VisionEncoder(c.vision, builder, "vision"));
  resampler = register_module("resampler", PerceiverResampler(c.vision.width, D, c.resampler, builder, "resampler"));
  text = register_module("text", TextDecoder(c.text, c.moe, builder, "text"));
  lm_head = register_module("lm_head", LMHead(D, c.text.vocab_size,
                                              c.text.tie_word_embeddings ? text->embed_tokens : TokenEmbedding(nullptr)));
  flow = register_module("flow", RFMHead(D, c.flow, c.flow_token_dim(), builder, "flow"));
  vqvae = register_module("vqvae", VQVAE(c.vqvae, c.flow.latent_channels));
}

std::vector<ModelPart> model_parts(const ModelConfig& c, const LinearBuilder& builder) {
  const int64_t D = c.text.hidden_size;
  std::vector<ModelPart> parts;
  parts.push_back({"vision", [&c, &builder] { return VisionEncoder(c.vision, builder, "vision").ptr(); }});
  parts.push_back({"resampler", [&c, &builder, D] {
                     return PerceiverResampler(c.vision.width, D, c.resampler, builder, "resampler").ptr();
                   }});
  parts.push_back({"text.embed_tokens", [&c, D] { return TokenEmbedding(c.text.vocab_size, D).ptr(); }});
  for (int64_t i = 0; i < c.text.num_layers; ++i) {
    const std::string path = "text.layers." + std::to_string(i);
    parts.push_back({path, [&c, &builder, path] { return DecoderLayer(c.text, c.moe, builder, path).ptr(); }});
  }
  parts.push_back({"text.norm", [&c, D] { return RMSNorm(D, c.text.rms_norm_eps).ptr(); }});
  if (!c.text.tie_word_embeddings)
    parts.push_back({"lm_head", [&c, D] { return LMHead(D, c.text.vocab_size, TokenEmbedding(nullptr)).ptr(); }});
  parts.push_back({"flow", [&c, &builder, D] { return RFMHead(D, c.flow, c.flow_token_dim(), builder, "flow").ptr(); }});
  parts.push_back({"vqvae", [&c] { return VQVAE(c.vqvae, c.flow.latent_channels).ptr(); }});
  return parts;
}

// images: [N, C, H, W] -> [N, L, D]
torch::Tensor OmniLiteImpl::encode_images(const torch::Tensor& images) {
  return resampler->forward(vision->forward(images));
}

namespace {

// Writes rows of `values` [n, D] into the positions of `where` (bool [B, T]) of x [B, T, D], differentiably.
torch::Tensor scatter_rows(const torch::Tensor& x, const torch::Tensor& where, const torch::Tensor& values) {
  const int64_t D = x.size(2);
  auto idx = where.reshape(-1).nonzero().squeeze(1);  // [n]
  return x.reshape({-1, D}).index_copy(0, idx, values.to(x.scalar_type())).view(x.sizes());
}

}  // namespace

OmniOutput OmniLiteImpl::forward(const OmniInput& in) {
  const auto& tok = cfg.tokens;
  TORCH_CHECK(in.tokens.defined() && in.tokens.dim() == 2, "OmniLite: expected tokens [B, T], got ",
              in.tokens.defined() ? in.tokens.sizes() : torch::IntArrayRef{});
  const int64_t T = in.tokens.size(1);
  auto x = text->embed_tokens->forward(in.tokens);  // [B, T, D]
  // A table stored narrower than the decoder (QLoRA's frozen bf16 embedding on the CPU) gives rows widened exactly.
  if (x.scalar_type() != text->norm->weight.scalar_type()) x = x.to(text->norm->weight.scalar_type());

  // Image understanding: num_latents resampled tokens per image_id run.
  auto is_img = in.tokens.eq(tok.image_id);
  const int64_t n_img_tokens = is_img.sum().item<int64_t>();
  const int64_t n_images = in.images.defined() ? in.images.size(0) : 0;
  TORCH_CHECK(n_img_tokens == n_images * cfg.resampler.num_latents, "OmniLite: the tokens hold ", n_img_tokens,
              " image placeholders (id ", tok.image_id, ") but ", n_images, " images x ",
              cfg.resampler.num_latents, " latents were given; hint: each image needs exactly num_latents "
              "placeholders");
  if (n_images > 0) x = scatter_rows(x, is_img, encode_images(in.images).reshape({-1, x.size(2)}));

  // Image generation: flow input embeddings at gen_image_id tokens.
  auto is_gen = in.tokens.eq(tok.gen_image_id);
  const int64_t n_gen = is_gen.sum().item<int64_t>();
  const int64_t n_lat = in.gen_latents.defined() ? in.gen_latents.size(0) : 0;
  TORCH_CHECK(n_gen == n_lat, "OmniLite: the tokens hold ", n_gen, " generated-image placeholders (id ",
              tok.gen_image_id, ") but gen_latents has ", n_lat, " rows");
  torch::Tensor allowed;
  bool causal = true;
  if (n_gen > 0) {
    TORCH_CHECK(in.gen_times.defined() && in.gen_times.numel() == n_gen, "OmniLite: gen_times must hold ", n_gen,
                " values, got ", in.gen_times.defined() ? in.gen_times.numel() : 0);
    x = scatter_rows(x, is_gen, flow->embed(in.gen_latents.to(x.scalar_type()), in.gen_times));
    allowed = mixed_attention_mask(in.tokens, tok.gen_image_id);
    causal = false;
  }

  const int64_t past = in.cache ? in.cache->length() : 0;
  if (past > 0 && allowed.defined())  // the new tokens see every cached position
    allowed = torch::cat({torch::ones({allowed.size(0), 1, T, past}, allowed.options()), allowed}, 3);
  auto positions = torch::arange(past, past + T, in.tokens.options());  // [T]
  if (in.segments.defined()) {
    TORCH_CHECK(!in.cache, "OmniLite: packed segments are a training input; hint: decode one sample at a time");
    TORCH_CHECK(in.segments.sizes() == in.tokens.sizes(), "OmniLite: segments ", in.segments.sizes(),
                " must match tokens ", in.tokens.sizes());
    auto same = in.segments.unsqueeze(2).eq(in.segments.unsqueeze(1)).unsqueeze(1);  // [B, 1, T, T]
    allowed = allowed.defined() ? allowed.logical_and(same) : same;
    positions = segment_positions(in.segments);                                       // [B, T]
  }
  auto dec = text->forward(x, positions, allowed, causal, in.cache);
  OmniOutput out;
  out.hidden = dec.hidden;
  out.router_logits = std::move(dec.router_logits);
  if (in.compute_logits)
    out.logits = lm_head->forward(in.last_logits ? dec.hidden.narrow(1, dec.hidden.size(1) - 1, 1) : dec.hidden);
  if (n_gen > 0) {
    auto idx = is_gen.reshape(-1).nonzero().squeeze(1);
    out.velocity = flow->forward(dec.hidden.reshape({-1, dec.hidden.size(2)}).index_select(0, idx));  // [n_gen, P]
  }
  return out;
}

}  // namespace omnilite
