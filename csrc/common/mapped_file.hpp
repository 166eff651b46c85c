// A read-only memory map of a whole file (POSIX mmap), unmapped on destruction.
#pragma once

#include <cstdint>
#include <string>

namespace fastml {

class MappedFile {
 public:
  // Maps `path`; throws FileNotFound or IOError naming the path.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  int64_t size_ = 0;
};

}  // namespace fastml
