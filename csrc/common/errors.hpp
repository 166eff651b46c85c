// fastml's error types and argument-check macros.
//
// The core throws standard exceptions; csrc/bindings/module.cpp maps each to
// one Python exception, in one place:
//   std::invalid_argument -> ValueError      fastml::TypeError   -> TypeError
//   std::out_of_range     -> IndexError      fastml::IOError     -> OSError
//   fastml::FormatError   -> fastml.FormatError (a ValueError)
//   std::runtime_error    -> RuntimeError    fastml::TimeoutError-> TimeoutError
//   std::bad_alloc        -> MemoryError     fastml::Cancelled   ->
//   concurrent.futures.CancelledError
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fastml {

// Wrong type or dtype of an argument.
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A file could not be opened or read (an I/O failure: missing, unreadable).
struct IOError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The bytes of a file or byte string are malformed: truncated, corrupted,
// foreign or inconsistent (maps to fastml.FormatError, a ValueError). The
// message names the source and the field or byte offset.
struct FormatError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A deadline passed before the work ran.
struct TimeoutError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The work was cancelled before it ran.
struct Cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

// Throws `Exc` with the message pieces streamed together.
template <typename Exc = std::invalid_argument, typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Exc(detail::concat(std::forward<Args>(args)...));
}

}  // namespace fastml

// FASTML_CHECK_ARG(cond, "batch_size", "must be positive, got ", n)
//   -> ValueError("batch_size must be positive, got 0")
#define FASTML_CHECK_ARG(cond, name, ...)                                       \
  do {                                                                          \
    if (!(cond)) ::fastml::fail<std::invalid_argument>(name, " ", __VA_ARGS__); \
  } while (0)

// Same, but raises TypeError (wrong dtype or kind of object).
#define FASTML_CHECK_TYPE(cond, name, ...)                                    \
  do {                                                                        \
    if (!(cond)) ::fastml::fail<::fastml::TypeError>(name, " ", __VA_ARGS__); \
  } while (0)

// An internal invariant; a failure is a fastml bug, reported with its place.
#define FASTML_ASSERT(cond)                                                                   \
  do {                                                                                        \
    if (!(cond))                                                                              \
      ::fastml::fail<std::logic_error>("fastml internal error: ", #cond, " (", __FILE__, ":", \
                                       __LINE__, ")");                                        \
  } while (0)

namespace fastml {

// A file that does not exist (maps to FileNotFoundError, a kind of OSError).
struct FileNotFound : IOError {
  using IOError::IOError;
};

// A bounded queue is full (maps to fastml.infer.QueueFull).
struct QueueFull : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace fastml
