// TensorBoard event files, written without TensorFlow or protobuf.
//
// A file `events.out.tfevents.<seconds>.<host>.<pid>` in the log folder is a sequence of TFRecords:
//   uint64 length (little endian) | uint32 masked CRC-32C of those 8 bytes | data | uint32 masked CRC-32C of data
// (masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8). Each record holds one serialised `tensorboard.Event`:
// wall_time = 1 (double), step = 2 (int64), file_version = 3 (string, "brain.Event:2" in the first record),
// summary = 5 { value = 1 { tag = 1, simple_value = 2 (float), image = 4 { height = 1, width = 2,
// colorspace = 3, encoded_image_string = 4 } } }, session_log = 7 { status = 1 (START = 1) }. The field numbers
// are those of TensorBoard's event.proto and summary.proto.
//
// A resumed run starts its file with a SessionLog START at its first new step: TensorBoard then drops the events
// of the earlier attempt from that step on (the steps metrics.jsonl was truncated to), so both show the same values.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

namespace omnilite::io {

// CRC-32C (Castagnoli), as TFRecord uses it, and its masked form.
uint32_t crc32c(const void* data, size_t n);
uint32_t masked_crc32c(const void* data, size_t n);

class EventWriter {
 public:
  // Creates `dir` and a new event file in it. `resume_step` >= 0 writes a SessionLog START at that step.
  explicit EventWriter(const std::string& dir, int64_t resume_step = -1);
  // One scalar (`value` is stored as float32, as TensorBoard's simple_value).
  void scalar(const std::string& tag, int64_t step, double value);
  // One image, PNG-encoded (`png` holds the file's bytes), of `height` x `width` with `channels` colours.
  void image(const std::string& tag, int64_t step, const std::string& png, int height, int width, int channels);
  // A PNG file as an image (its size and colours read from the IHDR chunk); throws naming a file that is not a PNG.
  void png_file(const std::string& tag, int64_t step, const std::string& path);
  // Pushes the records written so far to the file (called after each step, so a crash loses at most one step).
  void flush();
  // The event file.
  const std::string& path() const { return path_; }

 private:
  void record(const std::string& event);
  std::string path_;
  std::ofstream out_;
};

}  // namespace omnilite::io
