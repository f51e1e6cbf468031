// Minimal test helpers for the C++ kernel tests (no framework needed).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <random>

namespace pyc_test {

inline int& failures() {
  static int n = 0;
  return n;
}

#define PYC_EXPECT(cond, ...)                                   \
  do {                                                          \
    if (!(cond)) {                                              \
      std::fprintf(stderr, "%s:%d: expectation failed: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
      ++pyc_test::failures();                                   \
    }                                                           \
  } while (0)

inline int finish(const char* name) {
  if (failures()) {
    std::fprintf(stderr, "%s: %d failure(s)\n", name, failures());
    return 1;
  }
  std::printf("%s: all passed\n", name);
  return 0;
}

}  // namespace pyc_test
