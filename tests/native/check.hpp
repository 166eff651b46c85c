// A minimal check macro for the native tests (no framework dependency):
// they run under ThreadSanitizer/AddressSanitizer as plain executables.
#pragma once

#include <cstdio>
#include <cstdlib>

#define NATIVE_CHECK(cond)                                                          \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)
