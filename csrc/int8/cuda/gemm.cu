// int8 GEMM on CUDA.
//
// * Tensor-core kernel (sm_80+): mma.sync.aligned.m16n8k32 s8 x s8 -> s32, block tiles of
//   BM x 128 x 64 (BM = 64 or 128 chosen by shape), 8 warps, a multi-stage cp.async
//   pipeline (zero-filled, predicated M/N tails), padded shared-memory rows (80 bytes) so
//   the fragment loads of the 8 row groups hit distinct banks, and the dequantization
//   epilogue applied straight from the accumulator registers.
// * GEMV kernel for small M: one warp per output column, 16-byte loads, __dp4a.
// * Weight-only (w8a16) GEMV: int8 weights converted to fp32 in registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/cuda_convert.cuh"
#include "int8/cuda/gemm.cuh"

namespace pyc {
namespace cuda {
namespace {

// ------------------------------------------------------------------ helpers

template <typename T>
__device__ __forceinline__ void store_out(T* p, float v) { *p = from_f32<T>(v); }

// Writes one accumulator element (row m, column n are in range).
template <typename TOut>
__device__ __forceinline__ void epilogue_one(const Int8GemmEpilogue& ep, int64_t m, int64_t n,
                                             int64_t N, int32_t acc) {
  if constexpr (std::is_same<TOut, int32_t>::value) {
    ep.c[m * N + n] = acc;
  } else {
    float v = __fmul_rn(__int2float_rn(acc), ep.a_scale[m]);
    v = __fmul_rn(v, ep.w_scale[n]);
    if (ep.bias) v = __fadd_rn(v, ep.bias[n]);
    store_out(static_cast<TOut*>(ep.out) + m * N + n, v);
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                       uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  // Not reached: the launcher only selects the tensor-core kernel on sm_80+.
  __trap();
#endif
}

// ------------------------------------------------------------------ tensor-core kernel

constexpr int kBN = 128, kBK = 64, kStages = 4, kThreads = 256;
constexpr int kRow = kBK + 16;  // padded smem row (bytes): conflict-free fragment loads

template <int BM>
constexpr int smem_bytes() {
  return kStages * (BM + kBN) * kRow;
}

template <int BM, typename TOut>
__global__ void __launch_bounds__(kThreads)
    gemm_tc_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B, int64_t M,
                   int64_t N, int64_t K, Int8GemmEpilogue ep) {
  constexpr int WM = BM / 2, WN = kBN / 4;  // 2 x 4 warps
  constexpr int MI = WM / 16, NI = WN / 8;
  extern __shared__ __align__(16) int8_t smem[];
  int8_t* sA = smem;                           // [kStages][BM][kRow]
  int8_t* sB = smem + kStages * BM * kRow;     // [kStages][kBN][kRow]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  const int group = lane / 4, tig = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t ktiles = (K + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int64_t kt) {
    const int64_t k0 = kt * kBK;
    int8_t* a_dst = sA + stage * BM * kRow;
    int8_t* b_dst = sB + stage * kBN * kRow;
#pragma unroll
    for (int i = 0; i < (BM * kBK / 16) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 16), col = (c % (kBK / 16)) * 16;
      const int64_t gm = m0 + row, gk = k0 + col;
      const bool ok = gm < M && gk < K;
      cp_async16(a_dst + row * kRow + col, ok ? A + gm * K + gk : A, ok);
    }
#pragma unroll
    for (int i = 0; i < (kBN * kBK / 16) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 16), col = (c % (kBK / 16)) * 16;
      const int64_t gn = n0 + row, gk = k0 + col;
      const bool ok = gn < N && gk < K;
      cp_async16(b_dst + row * kRow + col, ok ? B + gn * K + gk : B, ok);
    }
  };

  int32_t acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt landed; everyone is done with tile kt - 1
    const int64_t next = kt + kStages - 1;
    if (next < ktiles) load_stage(static_cast<int>(next % kStages), next);
    cp_async_commit();

    const int stage = static_cast<int>(kt % kStages);
    const int8_t* a_s = sA + stage * BM * kRow;
    const int8_t* b_s = sB + stage * kBN * kRow;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const int r = warp_m * WM + i * 16 + group;
        const int8_t* p = a_s + r * kRow + kk + tig * 4;
        af[i][0] = *reinterpret_cast<const uint32_t*>(p);
        af[i][1] = *reinterpret_cast<const uint32_t*>(p + 8 * kRow);
        af[i][2] = *reinterpret_cast<const uint32_t*>(p + 16);
        af[i][3] = *reinterpret_cast<const uint32_t*>(p + 8 * kRow + 16);
      }
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        const int c = warp_n * WN + j * 8 + group;
        const int8_t* p = b_s + c * kRow + kk + tig * 4;
        bf[j][0] = *reinterpret_cast<const uint32_t*>(p);
        bf[j][1] = *reinterpret_cast<const uint32_t*>(p + 16);
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
          mma_s8(acc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < MI; ++i) {
#pragma unroll
    for (int j = 0; j < NI; ++j) {
      const int64_t r0 = m0 + warp_m * WM + i * 16 + group;
      const int64_t c0 = n0 + warp_n * WN + j * 8 + tig * 2;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = r0 + 8 * h;
        if (r >= M) continue;
        if (c0 < N) epilogue_one<TOut>(ep, r, c0, N, acc[i][j][2 * h]);
        if (c0 + 1 < N) epilogue_one<TOut>(ep, r, c0 + 1, N, acc[i][j][2 * h + 1]);
      }
    }
  }
}

// ------------------------------------------------------------------ GEMV (small M)

constexpr int kGemvWarps = 8;

template <int MT, typename TOut>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_dp4a_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B, int64_t M,
                     int64_t N, int64_t K, Int8GemmEpilogue ep) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  if (n >= N) return;
  int32_t acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = 0;
  const int4* brow = reinterpret_cast<const int4*>(B + n * K);
  const int64_t k16 = K / 16;
  for (int64_t k = lane; k < k16; k += 32) {
    const int4 bv = __ldg(brow + k);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (m0 + i < M) {
        const int4 av = __ldg(reinterpret_cast<const int4*>(A + (m0 + i) * K) + k);
        int32_t s = acc[i];
        s = __dp4a(av.x, bv.x, s);
        s = __dp4a(av.y, bv.y, s);
        s = __dp4a(av.z, bv.z, s);
        s = __dp4a(av.w, bv.w, s);
        acc[i] = s;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    int32_t s = acc[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == i && m0 + i < M) epilogue_one<TOut>(ep, m0 + i, n, N, s);
  }
}

// ------------------------------------------------------------------ w8a16 GEMV

__device__ __forceinline__ void load16(const float* p, float (&f)[16]) {
  const float4* q = reinterpret_cast<const float4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 v = __ldg(q + i);
    f[4 * i] = v.x;
    f[4 * i + 1] = v.y;
    f[4 * i + 2] = v.z;
    f[4 * i + 3] = v.w;
  }
}
__device__ __forceinline__ void load16(const __half* p, float (&f)[16]) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 v = __ldg(q + i);
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 t = __half22float2(h[j]);
      f[8 * i + 2 * j] = t.x;
      f[8 * i + 2 * j + 1] = t.y;
    }
  }
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float (&f)[16]) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 v = __ldg(q + i);
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[8 * i + 2 * j] = __uint_as_float(u[j] << 16);
      f[8 * i + 2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32)
    w8a16_kernel(const T* __restrict__ X, const int8_t* __restrict__ W,
                 const float* __restrict__ ws, const float* __restrict__ bias, T* __restrict__ out,
                 int64_t M, int64_t N, int64_t K) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  if (n >= N) return;
  float acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = 0.f;
  const int4* wrow = reinterpret_cast<const int4*>(W + n * K);
  const int64_t k16 = K / 16;
  for (int64_t k = lane; k < k16; k += 32) {
    const int4 wv = __ldg(wrow + k);
    const int32_t wi[4] = {wv.x, wv.y, wv.z, wv.w};
    float wf[16];
#pragma unroll
    for (int j = 0; j < 16; ++j)
      wf[j] = static_cast<float>(static_cast<int8_t>((wi[j / 4] >> (8 * (j % 4))) & 0xff));
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (m0 + i < M) {
        float xf[16];
        load16(X + (m0 + i) * K + 16 * k, xf);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[i] = fmaf(xf[j], wf[j], acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    float s = acc[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == i && m0 + i < M) {
      float v = __fmul_rn(s, ws[n]);
      if (bias) v = __fadd_rn(v, bias[n]);
      store_out(out + (m0 + i) * N + n, v);
    }
  }
}

// ------------------------------------------------------------------ launchers

int sm_count_and_arch(int* major) {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
  return sms;
}

template <int MT, typename TOut>
cudaError_t launch_gemv(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                        const Int8GemmEpilogue& ep, cudaStream_t stream) {
  const dim3 grid(ceil_div_u(N, kGemvWarps), ceil_div_u(M, MT));
  gemv_dp4a_kernel<MT, TOut><<<grid, kGemvWarps * 32, 0, stream>>>(a, b, M, N, K, ep);
  return cudaGetLastError();
}

template <int BM, typename TOut>
cudaError_t launch_tc(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                      const Int8GemmEpilogue& ep, cudaStream_t stream) {
  constexpr int smem = smem_bytes<BM>();
  cudaError_t err = cudaFuncSetAttribute(gemm_tc_kernel<BM, TOut>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div_u(N, kBN), ceil_div_u(M, BM));
  gemm_tc_kernel<BM, TOut><<<grid, kThreads, smem, stream>>>(a, b, M, N, K, ep);
  return cudaGetLastError();
}

template <typename TOut>
cudaError_t dispatch_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                          const Int8GemmEpilogue& ep, cudaStream_t stream) {
  int major = 0;
  const int sms = sm_count_and_arch(&major);
  if (M <= 1) return launch_gemv<1, TOut>(a, b, M, N, K, ep, stream);
  if (M <= 4) return launch_gemv<4, TOut>(a, b, M, N, K, ep, stream);
  if (M <= 8) return launch_gemv<8, TOut>(a, b, M, N, K, ep, stream);
  // up to 16 rows in one pass over the weight; pre-Ampere GPUs (no int8 mma.sync) stay here
  if (M <= 16 || major < 8) {
    if ((M + 15) / 16 > 65535) return cudaErrorInvalidValue;  // gridDim.y limit
    return launch_gemv<16, TOut>(a, b, M, N, K, ep, stream);
  }
  // Tile config: 128-row tiles once they alone fill the GPU, 64-row tiles otherwise.
  const int64_t big_tiles = ((M + 127) / 128) * ((N + kBN - 1) / kBN);
  if (big_tiles >= sms) return launch_tc<128, TOut>(a, b, M, N, K, ep, stream);
  return launch_tc<64, TOut>(a, b, M, N, K, ep, stream);
}

template <typename T>
cudaError_t launch_w8a16(const T* x, const int8_t* w, const float* ws, const float* bias, T* out,
                         int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const unsigned gx = ceil_div_u(N, kGemvWarps);
  if (M <= 1) {
    w8a16_kernel<T, 1><<<dim3(gx, 1), kGemvWarps * 32, 0, stream>>>(x, w, ws, bias, out, M, N, K);
  } else if (M <= 4) {
    w8a16_kernel<T, 4><<<dim3(gx, 1), kGemvWarps * 32, 0, stream>>>(x, w, ws, bias, out, M, N, K);
  } else if (M <= 8) {
    w8a16_kernel<T, 8><<<dim3(gx, 1), kGemvWarps * 32, 0, stream>>>(x, w, ws, bias, out, M, N, K);
  } else {
    w8a16_kernel<T, 16><<<dim3(gx, ceil_div_u(M, 16)), kGemvWarps * 32, 0, stream>>>(
        x, w, ws, bias, out, M, N, K);
  }
  return cudaGetLastError();
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

cudaError_t int8_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                      const Int8GemmEpilogue& ep, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (N < 1 || K < 16 || K % 16 != 0 || !aligned16(a) || !aligned16(b)) return cudaErrorInvalidValue;
  if ((M + 127) / 128 > 65535) return cudaErrorInvalidValue;  // gridDim.y limit
  if (ep.out == nullptr) return dispatch_gemm<int32_t>(a, b, M, N, K, ep, stream);
  switch (ep.out_dtype) {
    case DType::F32: return dispatch_gemm<float>(a, b, M, N, K, ep, stream);
    case DType::F16: return dispatch_gemm<__half>(a, b, M, N, K, ep, stream);
    case DType::BF16: return dispatch_gemm<__nv_bfloat16>(a, b, M, N, K, ep, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t int8_w8a16(const void* x, DType dtype, const int8_t* w, const float* w_scale,
                       const float* bias, void* out, int64_t M, int64_t N, int64_t K,
                       cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (M > kW8A16MaxM || N < 1 || K < 16 || K % 16 != 0 || !aligned16(x) || !aligned16(w))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::F32:
      return launch_w8a16(static_cast<const float*>(x), w, w_scale, bias, static_cast<float*>(out),
                          M, N, K, stream);
    case DType::F16:
      return launch_w8a16(static_cast<const __half*>(x), w, w_scale, bias,
                          static_cast<__half*>(out), M, N, K, stream);
    case DType::BF16:
      return launch_w8a16(static_cast<const __nv_bfloat16*>(x), w, w_scale, bias,
                          static_cast<__nv_bfloat16*>(out), M, N, K, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pyc
