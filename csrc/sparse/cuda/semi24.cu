// 2:4 semi-structured sparse linear: mma.sp.sync.aligned.m16n8k32 (f16/bf16 in, fp32 accumulate).
//
// y^T = W x^T: the sparse weight is operand A (a 16-row tile of W per instruction), the
// activations are the dense operand B (x rows are the instruction's n = 8 columns; x row-major
// [M, K] is exactly B "col"). Each block computes a BN x BM tile of y^T (BN weight rows, BM
// activation rows); values, metadata and activations stream through a STAGES-deep cp.async
// pipeline in k-blocks of 64 logical columns (two mma k-steps), fragments come from shared
// memory via ldmatrix (A, B) and one 32-bit load (metadata, sparsity selector 0).
//
// Fragment layout (PTX ISA, sparse mma m16n8k32 .f16/.bf16; groupID g = lane / 4,
// t = lane % 4):
//   A (compressed 16 x 16): a0 = row g, packed cols 2t, 2t+1; a1 = row g+8, same cols;
//                           a2 = row g, packed cols 8+2t, 9+2t; a3 = row g+8, same cols
//   B (32 x 8):             b_i = k rows 8i+2t, 8i+2t+1, column g       (i = 0..3)
//   C/D (16 x 8):           c0, c1 = row g, cols 2t, 2t+1; c2, c3 = row g+8, same cols
//   metadata:               lanes with t < 2: bits 0..15 = row g, logical cols 16t..16t+15;
//                           bits 16..31 = row g+8, same cols (pre-ordered by the packer)
#include "sparse/cuda/semi24.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/cuda_check.cuh"
#include "common/cuda_convert.cuh"

namespace pyc {
namespace cuda {
namespace {

constexpr int kBK = 64;             // logical k per pipeline stage
constexpr int kBKP = kBK / 2;       // packed values per weight row per stage
constexpr int kAStride = kBKP + 8;  // halves; 80-byte rows: ldmatrix rows hit distinct banks
constexpr int kBStride = kBK + 8;   // halves; 144-byte rows

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; `valid == false` zero-fills the destination without reading.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
struct MmaSp;

#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
// The packer always stores the two indices of a group in increasing order.
#define PYC_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#else
#define PYC_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#endif

template <>
struct MmaSp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(PYC_MMA_SP "f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "r"(b[2]), "r"(b[3]), "r"(e));
#else
    __trap();
#endif
  }
};

template <>
struct MmaSp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(PYC_MMA_SP "bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "r"(b[2]), "r"(b[3]), "r"(e));
#else
    __trap();
#endif
  }
};

template <int WN, int WM, int MT, int NT, int STAGES>
struct Cfg {
  static constexpr int kThreads = 32 * WN * WM;
  static constexpr int BN = WN * MT * 16;  // weight rows per block
  static constexpr int BM = WM * NT * 8;   // activation rows per block
  static constexpr int kABytes = BN * kAStride * 2;
  static constexpr int kBBytes = BM * kBStride * 2;
  static constexpr int kEBytes = (BN / 16) * 2 * 64;  // (tiles, 2 k-steps, 64-byte words)
  static constexpr int kStageBytes = kABytes + kBBytes + kEBytes;
  static constexpr int kSmem = STAGES * kStageBytes;
};

template <typename T, typename OutT, int WN, int WM, int MT, int NT, int STAGES>
__global__ void __launch_bounds__(32 * WN * WM)
    semi24_kernel(const T* __restrict__ x, int64_t ldx, int M, int Kx, const T* __restrict__ values,
                  const int16_t* __restrict__ meta, const float* __restrict__ bias,
                  OutT* __restrict__ y, int N, int KT) {
  using C = Cfg<WN, WM, MT, NT, STAGES>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_n = warp % WN, warp_m = warp / WN;
  const int g = lane >> 2, t = lane & 3;
  const int n_block = blockIdx.x * C::BN;
  const int64_t m_block = static_cast<int64_t>(blockIdx.y) * C::BM;
  const int NTILES = (N + 15) / 16;
  const int KP2 = KT * 16;  // packed values per weight row (Kp / 2)
  const int KB = (KT + 1) / 2;

  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * C::kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * C::kStageBytes + C::kABytes); };
  auto stage_e = [&](int s) {
    return reinterpret_cast<uint32_t*>(smem + s * C::kStageBytes + C::kABytes + C::kBBytes);
  };

  auto load_stage = [&](int slot, int kb) {
    T* sa = stage_a(slot);
    T* sb = stage_b(slot);
    uint32_t* se = stage_e(slot);
    // A: BN rows x 4 chunks of 8 packed values
    for (int i = tid; i < C::BN * 4; i += C::kThreads) {
      const int r = i >> 2, cc = i & 3;
      const int n = n_block + r;
      const int col = kb * kBKP + cc * 8;
      const bool ok = n < N && col < KP2;
      const T* src = ok ? values + static_cast<int64_t>(n) * KP2 + col : values;
      cp_async16(sa + r * kAStride + cc * 8, src, ok);
    }
    // B: BM rows x 8 chunks of 8 activations
    for (int i = tid; i < C::BM * 8; i += C::kThreads) {
      const int r = i >> 3, cc = i & 7;
      const int64_t m = m_block + r;
      const int col = kb * kBK + cc * 8;
      const bool ok = m < M && col < Kx;
      const T* src = ok ? x + m * ldx + col : x;
      cp_async16(sb + r * kBStride + cc * 8, src, ok);
    }
    // metadata: (BN/16 tiles) x (2 k-steps) x 4 chunks of 16 bytes; absent tiles get the
    // valid pattern 0x4444 (indices 0, 1) so the instruction never sees an invalid word
    for (int i = tid; i < (C::BN / 16) * 2 * 4; i += C::kThreads) {
      const int tile = i >> 3, ks = (i >> 2) & 1, cc = i & 3;
      const int nt = n_block / 16 + tile, kt = kb * 2 + ks;
      uint32_t* dst = se + (tile * 2 + ks) * 16 + cc * 4;
      if (nt < NTILES && kt < KT) {
        cp_async16(dst, meta + (static_cast<int64_t>(nt) * KT + kt) * 32 + cc * 8, true);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0x44444444u, 0x44444444u, 0x44444444u, 0x44444444u);
      }
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KB) load_stage(s, s);
    cp_async_commit();
  }

  for (int kb = 0; kb < KB; ++kb) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int pf = kb + STAGES - 1;
      if (pf < KB) load_stage(pf % STAGES, pf);
      cp_async_commit();
    }
    const int slot = kb % STAGES;
    const T* sa = stage_a(slot);
    const T* sb = stage_b(slot);
    const uint32_t* se = stage_e(slot);
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      if (kb * 2 + ks >= KT) break;  // odd number of k-steps: the last block has one
      uint32_t a[MT][4], e[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int row = warp_n * MT * 16 + i * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
        const int col = ks * 16 + 8 * (lane >> 4);
        ldmatrix_x4(a[i], sa + row * kAStride + col);
        const int tile = warp_n * MT + i;
        e[i] = t < 2 ? se[(tile * 2 + ks) * 16 + g * 2 + t] : 0u;
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint32_t b[4];
        const int row = warp_m * NT * 8 + j * 8 + (lane & 7);
        const int col = ks * 32 + 8 * (lane >> 3);
        ldmatrix_x4(b, sb + row * kBStride + col);
#pragma unroll
        for (int i = 0; i < MT; ++i) MmaSp<T>::run(acc[i][j], a[i], b, e[i]);
      }
    }
  }
  cp_async_wait<0>();

  // epilogue: acc[i][j] = y^T rows (weights) n0 + {g, g+8}, columns (activations) m0 + 2t, +1
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int n_lo = n_block + warp_n * MT * 16 + i * 16 + g;
    const int n_hi = n_lo + 8;
    const float b_lo = (bias != nullptr && n_lo < N) ? bias[n_lo] : 0.f;
    const float b_hi = (bias != nullptr && n_hi < N) ? bias[n_hi] : 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t m0 = m_block + warp_m * NT * 8 + j * 8 + 2 * t;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int64_t m = m0 + q;
        if (m >= M) continue;
        if (n_lo < N) y[m * N + n_lo] = from_f32<OutT>(acc[i][j][q] + b_lo);
        if (n_hi < N) y[m * N + n_hi] = from_f32<OutT>(acc[i][j][2 + q] + b_hi);
      }
    }
  }
}

template <typename T, typename OutT, int WN, int WM, int MT, int NT, int STAGES>
cudaError_t launch(const void* x, int64_t ldx, int64_t M, int64_t Kx, const void* values,
                   const int16_t* meta, const float* bias, void* y, int64_t N, int64_t KT,
                   cudaStream_t stream) {
  using C = Cfg<WN, WM, MT, NT, STAGES>;
  auto kernel = semi24_kernel<T, OutT, WN, WM, MT, NT, STAGES>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div_u(N, C::BN), ceil_div_u(M, C::BM));
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(
      static_cast<const T*>(x), ldx, static_cast<int>(M), static_cast<int>(Kx),
      static_cast<const T*>(values), meta, bias, static_cast<OutT*>(y), static_cast<int>(N),
      static_cast<int>(KT));
  return cudaGetLastError();
}

template <typename T, typename OutT>
cudaError_t dispatch_tile(const void* x, int64_t ldx, int64_t M, int64_t Kx, const void* values,
                          const int16_t* meta, const float* bias, void* y, int64_t N, int64_t KT,
                          cudaStream_t stream) {
  if (M <= 32) {
    // decode-sized batches: narrow activation tile, more blocks along N
    return launch<T, OutT, 4, 1, 1, 4, 4>(x, ldx, M, Kx, values, meta, bias, y, N, KT, stream);
  }
  return launch<T, OutT, 2, 2, 2, 8, 3>(x, ldx, M, Kx, values, meta, bias, y, N, KT, stream);
}

template <typename T>
cudaError_t dispatch_out(const void* x, int64_t ldx, int64_t M, int64_t Kx, const void* values,
                         const int16_t* meta, const float* bias, void* y, DType ydt, int64_t N,
                         int64_t KT, cudaStream_t stream) {
  switch (ydt) {
    case DType::F32: return dispatch_tile<T, float>(x, ldx, M, Kx, values, meta, bias, y, N, KT, stream);
    case DType::F16: return dispatch_tile<T, __half>(x, ldx, M, Kx, values, meta, bias, y, N, KT, stream);
    case DType::BF16:
      return dispatch_tile<T, __nv_bfloat16>(x, ldx, M, Kx, values, meta, bias, y, N, KT, stream);
  }
  return cudaErrorInvalidValue;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

cudaError_t semi24_linear(const void* x, int64_t ldx, int64_t M, int64_t K, const void* values,
                          const int16_t* meta, const float* bias, DType dt, void* y, DType ydt,
                          int64_t N, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const int64_t Kp = (K + 31) / 32 * 32, KT = Kp / 32, Kx = (K + 7) / 8 * 8;
  if (dt == DType::F32 || M < 0 || N < 0 || K < 0 || ldx % 8 != 0 || (M > 1 && ldx < Kx) ||
      !aligned16(x) || !aligned16(values) || !aligned16(meta) || M > INT32_MAX ||
      N > INT32_MAX - 64 || Kp > INT32_MAX / 2)
    return cudaErrorInvalidValue;
  if (K == 0) return cudaErrorInvalidValue;  // the binding handles the empty product
  if (dt == DType::F16)
    return dispatch_out<__half>(x, ldx, M, Kx, values, meta, bias, y, ydt, N, KT, stream);
  return dispatch_out<__nv_bfloat16>(x, ldx, M, Kx, values, meta, bias, y, ydt, N, KT, stream);
}

}  // namespace cuda
}  // namespace pyc
