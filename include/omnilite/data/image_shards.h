// Image-caption tar shards in WebDataset's layout: streamed images, decoded when a batch asks for them.
//
// A shard is a POSIX (ustar) tar file. Its members are grouped into samples by key, as WebDataset groups them: the
// member path up to the first '.' of its file name is the key, the rest its extension, and consecutive members
// with one key form one sample. A sample holds one image (.png, .jpg, .jpeg, .ppm, .pgm, .webp) and a caption:
// .json {"captions": [..]} or {"caption" | "text": ".."}, else the .txt; an optional class label from .cls (an
// integer) or the .json's "label". Opening reads the tar headers and the small caption members only; images stay
// on disk and are read (pread) and decoded by whoever gathers them: the background loader threads.
//
// Bad data never stops a run: a header whose checksum does not add up or a member cut short ends its shard with
// a warning naming the file and byte offset; a sample without image or caption is skipped with a warning (both
// counted in skipped()); an image that does not decode is replaced by the next one when gathered, with a warning
// naming the shard, the byte offset and the member, and counted by gather(). A shard that cannot be opened is an
// error before step 1.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace omnilite {

struct ImageCaptionSet;

// Whether a data.image_train / image_valid entry names tar shards: a .tar file or a folder holding .tar files.
bool is_image_shard_source(const std::string& entry);

// Streamed images: members of tar shards and, for .jsonl / COCO lists read with ImageLoadOptions::stream, whole
// image files, each read and decoded when gathered.
class ImageShards {
 public:
  // No samples yet; `image_size` is the side images are resized to when gathered.
  explicit ImageShards(int64_t image_size) : size_(image_size) {}
  // The same, then add_shards(entries, max_samples, captions, labels).
  ImageShards(const std::vector<std::string>& entries, int64_t image_size, int64_t max_samples,
              std::vector<std::vector<std::string>>& captions, std::vector<int64_t>& labels);
  // Indexes the shards of `entries` (.tar files, or folders whose .tar files are taken in name order) and appends
  // each sample's captions and label to `captions` / `labels`, until size() reaches `max_samples` (0 = all).
  // Throws naming an entry that holds no shard or a shard that cannot be opened.
  void add_shards(const std::vector<std::string>& entries, int64_t max_samples,
                  std::vector<std::vector<std::string>>& captions, std::vector<int64_t>& labels);
  // One image file as a sample, decoded (decode_image_file) when gathered; its captions are the caller's.
  void add_file(const std::string& path) { items_.push_back({-1, 0, -1, path}); }
  ~ImageShards();
  ImageShards(const ImageShards&) = delete;
  ImageShards& operator=(const ImageShards&) = delete;

  int64_t size() const { return static_cast<int64_t>(items_.size()); }
  int64_t shards() const { return static_cast<int64_t>(files_.size()); }
  int64_t skipped() const { return skipped_; }  // samples skipped while indexing (bad records, truncated shards)
  // Identity of the samples (shard file names and samples taken from each), recorded in checkpoints.
  const std::string& fingerprint() const { return fingerprint_; }
  // Samples `idx` (indices into this set of shards), decoded and resized: [n, size, size, 3] uint8. An image that
  // does not decode is replaced by the next sample's, warned about and counted in *replaced (when given); 64 in a
  // row throw. Thread-safe.
  torch::Tensor gather(const std::vector<int64_t>& idx, int64_t* replaced = nullptr) const;

 private:
  struct Item {
    int32_t file;        // index into files_; -1 for a whole image file
    int64_t offset;      // byte offset of the image's data in its shard
    int64_t bytes;       // the image member's size
    std::string member;  // the image member's path in the tar, or the image file's path
  };
  torch::Tensor decode(const Item& it) const;  // [size, size, 3] uint8; throws naming the member
  void index_shard(const std::string& path, int64_t max_samples, std::vector<std::vector<std::string>>& captions,
                   std::vector<int64_t>& labels);

  std::vector<std::string> files_;  // shard paths
  std::vector<int> fds_;            // their open descriptors (pread is thread-safe)
  std::vector<Item> items_;
  int64_t size_;  // side of the gathered images
  int64_t skipped_ = 0;
  std::string fingerprint_;
};

struct ImageShardWriteOptions {
  std::string out_dir;             // folder the shards are written into (refused when it holds .tar files)
  int64_t shard_samples = 10000;   // samples per shard before the next one starts
  int64_t repeat = 1;              // write the set this many times over (distinct keys), for benchmarks
};

// Writes every image of `set` (PNG) with its captions (.txt: the first; .json: all and the label; .cls: the label
// when known) into shards OUT/shard-000000.tar, ... (each written to a temporary file and renamed when complete).
// Needs OpenCV for PNG encoding. Returns the shard paths.
std::vector<std::string> write_image_shards(const ImageCaptionSet& set, const ImageShardWriteOptions& opts);

}  // namespace omnilite
