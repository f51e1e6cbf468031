// Element types understood by the torch-free kernels, and scalar conversions.
#pragma once

#include <cstdint>
#include <cstring>

namespace pyc {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "unknown";
}

// Scalar helpers for host code (the SIMD paths convert in registers).
inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round-to-nearest-even float -> bf16 (NaN kept quiet).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float half_bits_to_float(uint16_t h);
uint16_t float_to_half_bits(float f);

inline float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.f;
}

inline void store_from_float(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_half_bits(v); break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v); break;
  }
}

}  // namespace pyc
