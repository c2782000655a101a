// The two ways OMNI-LITE touches large files. AtomicFile writes files that appear whole or not at all; MappedFile
// reads a file through a read-only memory map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace omnilite {

// The bytes go to PATH.tmp, which is synced and renamed over PATH, and then the folder is synced: a crash, a kill or
// a full disk never leaves a partial PATH, nor replaces a good one.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);  // creates PATH.tmp (empty); throws naming it
  ~AtomicFile();                          // before commit(): PATH.tmp is removed and PATH left as it was
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  // Appends n bytes; throws naming PATH.tmp (disk full?).
  void write(const void* data, size_t n);
  void write(const std::string& bytes) { write(bytes.data(), bytes.size()); }
  // Overwrites n bytes already written, from `offset` on.
  void write_at(uint64_t offset, const void* data, size_t n);
  // Syncs PATH.tmp, renames it over PATH and syncs the folder.
  void commit();
  uint64_t size() const { return size_; }  // bytes written so far
  const std::string& temp_path() const { return tmp_; }

 private:
  [[noreturn]] void fail(const std::string& what) const;
  std::string path_, tmp_;
  int fd_ = -1;
  uint64_t size_ = 0;
  bool committed_ = false;
};

// A whole regular file mapped read-only (an empty one maps to nothing). Errors name the file as `what` "PATH".
class MappedFile {
 public:
  // `random`: the pages are read in no order (token shards), so the kernel reads none ahead
  MappedFile(const std::string& path, const std::string& what, bool random = false);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return map_; }
  size_t size() const { return size_; }
  // Drops the mapped pages of [p, p + n) from this process (the page cache keeps them), so that streaming through a
  // file larger than memory does not grow the resident set by its size. Advisory: a failure only costs memory.
  void release(const uint8_t* p, size_t n) const;

 private:
  const uint8_t* map_ = nullptr;
  size_t size_ = 0;
};

// `bytes` as the whole content of `path`, through an AtomicFile.
void write_file_atomically(const std::string& path, const std::string& bytes);

// Syncs a folder's entries (after a rename into it); "" is the current folder. Failures are ignored.
void fsync_directory(const std::string& dir);

}  // namespace omnilite
