#include "omnilite/files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace omnilite {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("cannot create it");
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::fail(const std::string& what) const {
  throw std::runtime_error("file \"" + tmp_ + "\": " + what + " (" + std::strerror(errno) + ")");
}

void AtomicFile::write(const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  for (size_t left = n; left > 0;) {
    const ssize_t w = ::write(fd_, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) fail("write failed");
    p += w;
    left -= static_cast<size_t>(w);
  }
  size_ += n;
}

void AtomicFile::write_at(uint64_t offset, const void* data, size_t n) {
  if (offset + n > size_) throw std::logic_error("AtomicFile::write_at: past the bytes written to " + tmp_);
  if (::pwrite(fd_, data, n, static_cast<off_t>(offset)) != static_cast<ssize_t>(n)) fail("pwrite failed");
}

void AtomicFile::commit() {
  if (::fsync(fd_) != 0) fail("fsync failed");
  ::close(fd_);
  fd_ = -1;
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) fail("rename to \"" + path_ + "\" failed");
  committed_ = true;
  fsync_directory(std::filesystem::path(path_).parent_path().string());
}

MappedFile::MappedFile(const std::string& path, const std::string& what, bool random) {
  auto fail = [&](const std::string& why) { throw std::runtime_error(what + " \"" + path + "\": " + why); };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(std::string("cannot open (") + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  void* m = size_ == 0 ? nullptr : ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (m == MAP_FAILED) fail(std::string("cannot map (") + std::strerror(err) + ")");
  map_ = static_cast<const uint8_t*>(m);
  if (map_ && random) ::madvise(m, size_, MADV_RANDOM);
}

MappedFile::~MappedFile() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
}

void MappedFile::release(const uint8_t* p, size_t n) const {
  if (n == 0) return;
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) / page * page;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + n + page - 1) / page * page;
  ::madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED);
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  AtomicFile f(path);
  f.write(bytes);
  f.commit();
}

void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace omnilite
