// Fused KD softmax-KL on CUDA: one block per row, 128-bit loads, online statistics per thread
// merged with warp shuffles and shared memory, fp32 math for every input dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include "common/cuda_check.cuh"
#include "common/cuda_convert.cuh"
#include "kd/cuda/kd_kl.cuh"

namespace pyc {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Online statistics (see KdPartial in kd/kd.h), in fp32.
struct Part {
  float ms, mt, ss, st, w;
};

__device__ __forceinline__ float safe(float m) { return m == -CUDART_INF_F ? 0.f : m; }

__device__ __forceinline__ Part merge(const Part& p, const Part& q, bool reverse) {
  Part r;
  r.ms = fmaxf(p.ms, q.ms);
  r.mt = fmaxf(p.mt, q.mt);
  const float rs = safe(r.ms), rt = safe(r.mt);
  r.ss = r.st = r.w = 0.f;
  const Part* parts[2] = {&p, &q};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const Part& x = *parts[k];
    const float ds = safe(x.ms) - rs, dt = safe(x.mt) - rt;
    const float fs = x.ss != 0.f ? __expf(ds) : 0.f;
    const float ft = x.st != 0.f ? __expf(dt) : 0.f;
    r.ss += x.ss * fs;
    r.st += x.st * ft;
    if (reverse) {
      if (x.ss != 0.f) r.w += fs * (x.w + x.ss * (ds - dt));
    } else {
      if (x.st != 0.f) r.w += ft * (x.w + x.st * (dt - ds));
    }
  }
  return r;
}

// Partial of VEC elements relative to their own maxima.
template <int VEC>
__device__ __forceinline__ Part local_part(const float* a, const float* b, bool reverse) {
  Part p;
  p.ms = a[0];
  p.mt = b[0];
#pragma unroll
  for (int k = 1; k < VEC; ++k) {
    p.ms = fmaxf(p.ms, a[k]);
    p.mt = fmaxf(p.mt, b[k]);
  }
  const float cs = safe(p.ms), ct = safe(p.mt);
  p.ss = p.st = p.w = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float xa = a[k] - cs, xb = b[k] - ct;
    const float ea = __expf(xa), eb = __expf(xb);
    p.ss += ea;
    p.st += eb;
    if (reverse) {
      p.w += ea > 0.f ? ea * (xa - xb) : 0.f;
    } else {
      p.w += eb > 0.f ? eb * (xb - xa) : 0.f;
    }
  }
  return p;
}

__device__ __forceinline__ Part shfl_part(const Part& p, int off) {
  Part q;
  q.ms = __shfl_xor_sync(0xffffffffu, p.ms, off);
  q.mt = __shfl_xor_sync(0xffffffffu, p.mt, off);
  q.ss = __shfl_xor_sync(0xffffffffu, p.ss, off);
  q.st = __shfl_xor_sync(0xffffffffu, p.st, off);
  q.w = __shfl_xor_sync(0xffffffffu, p.w, off);
  return q;
}

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* s, const T* t, int64_t j, float inv, float* a,
                                         float* b) {
  const Pack<T, VEC> ps = *reinterpret_cast<const Pack<T, VEC>*>(s + j);
  const Pack<T, VEC> pt = *reinterpret_cast<const Pack<T, VEC>*>(t + j);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    a[k] = to_f32(ps.v[k]) * inv;
    b[k] = to_f32(pt.v[k]) * inv;
  }
}

// Gradient of one element (see kd/kd.h); c = coef * T.
__device__ __forceinline__ float grad_elem(float a, float b, const float* st, float c,
                                           bool reverse) {
  const float lps = (a - st[0]) - st[1];
  const float lpt = (b - st[2]) - st[3];
  const float ps = __expf(lps);
  if (reverse) return ps > 0.f ? c * ps * ((lps - lpt) - st[4]) : 0.f;
  return c * (ps - __expf(lpt));
}

template <typename T, int VEC>
__device__ __forceinline__ void grad_row(const T* sr, const T* tr, T* gr, int64_t V, float inv,
                                         const float* st, float c, bool reverse) {
  if (c == 0.f) {  // excluded row: zeros without reading the logits
    for (int64_t j = threadIdx.x; j < V; j += kThreads) gr[j] = from_f32<T>(0.f);
    return;
  }
  const int64_t nv = V / VEC * VEC;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < nv; j += kThreads * VEC) {
    float a[VEC], b[VEC];
    load_vec<T, VEC>(sr, tr, j, inv, a, b);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_f32<T>(grad_elem(a[k], b[k], st, c, reverse));
    *reinterpret_cast<Pack<T, VEC>*>(gr + j) = out;
  }
  for (int64_t j = nv + threadIdx.x; j < V; j += kThreads)
    gr[j] = from_f32<T>(grad_elem(to_f32(sr[j]) * inv, to_f32(tr[j]) * inv, st, c, reverse));
}

template <typename T, int VEC, bool FUSED>
__global__ void __launch_bounds__(kThreads)
    kd_forward_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t lds, int64_t ldt,
                      int64_t V, float inv, float temperature, bool reverse,
                      float* __restrict__ stats, float* __restrict__ loss,
                      const float* __restrict__ coef, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const T* sr = s + row * lds;
  const T* tr = t + row * ldt;
  Part acc{-CUDART_INF_F, -CUDART_INF_F, 0.f, 0.f, 0.f};
  const int64_t nv = V / VEC * VEC;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * VEC; j < nv; j += kThreads * VEC) {
    float a[VEC], b[VEC];
    load_vec<T, VEC>(sr, tr, j, inv, a, b);
    acc = merge(acc, local_part<VEC>(a, b, reverse), reverse);
  }
  for (int64_t j = nv + threadIdx.x; j < V; j += kThreads) {
    const float a = to_f32(sr[j]) * inv, b = to_f32(tr[j]) * inv;
    acc = merge(acc, local_part<1>(&a, &b, reverse), reverse);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc = merge(acc, shfl_part(acc, off), reverse);
  __shared__ Part warp_parts[kThreads / 32];
  __shared__ float row_stats[kKdStats];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_parts[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Part r = warp_parts[0];
    for (int w = 1; w < kThreads / 32; ++w) r = merge(r, warp_parts[w], reverse);
    const float ls = logf(r.ss), lt = logf(r.st);
    const float kl = reverse ? r.w / r.ss - ls + lt : r.w / r.st - lt + ls;
    float* st = stats + row * kKdStats;
    st[0] = row_stats[0] = r.ms;
    st[1] = row_stats[1] = ls;
    st[2] = row_stats[2] = r.mt;
    st[3] = row_stats[3] = lt;
    st[4] = row_stats[4] = kl;
    loss[row] = temperature * temperature * kl;
  }
  if (FUSED) {
    __syncthreads();
    float st[kKdStats];
#pragma unroll
    for (int k = 0; k < kKdStats; ++k) st[k] = row_stats[k];
    grad_row<T, VEC>(sr, tr, grad + row * V, V, inv, st, coef[row] * temperature, reverse);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    kd_backward_kernel(const float* __restrict__ coef, const T* __restrict__ s,
                       const T* __restrict__ t, int64_t lds, int64_t ldt, int64_t V, float inv,
                       float temperature, bool reverse, const float* __restrict__ stats,
                       T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  float st[kKdStats];
#pragma unroll
  for (int k = 0; k < kKdStats; ++k) st[k] = stats[row * kKdStats + k];
  grad_row<T, VEC>(s + row * lds, t + row * ldt, grad + row * V, V, inv, st,
                   coef[row] * temperature, reverse);
}

// 128-bit accesses need 16-byte aligned rows: every row start of s, t (and grad) aligned.
template <typename T>
bool can_vectorize(const void* s, const void* t, const void* g, int64_t lds, int64_t ldt,
                   int64_t V) {
  constexpr int64_t vec = 16 / sizeof(T);
  auto al = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return al(s) && al(t) && (g == nullptr || al(g)) && lds % vec == 0 && ldt % vec == 0 &&
         V % vec == 0;
}

template <typename T>
cudaError_t launch_forward(const void* s, const void* t, int64_t lds, int64_t ldt, int64_t N,
                           int64_t V, float temperature, bool reverse, float* stats, float* loss,
                           const float* coef, void* grad, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const float inv = 1.f / temperature;
  const T* sp = static_cast<const T*>(s);
  const T* tp = static_cast<const T*>(t);
  T* gp = static_cast<T*>(grad);
  const unsigned int blocks = static_cast<unsigned int>(N);
  const bool vec = can_vectorize<T>(s, t, grad, lds, ldt, V);
  if (grad != nullptr) {
    if (vec)
      kd_forward_kernel<T, VEC, true><<<blocks, kThreads, 0, stream>>>(
          sp, tp, lds, ldt, V, inv, temperature, reverse, stats, loss, coef, gp);
    else
      kd_forward_kernel<T, 1, true><<<blocks, kThreads, 0, stream>>>(
          sp, tp, lds, ldt, V, inv, temperature, reverse, stats, loss, coef, gp);
  } else {
    if (vec)
      kd_forward_kernel<T, VEC, false><<<blocks, kThreads, 0, stream>>>(
          sp, tp, lds, ldt, V, inv, temperature, reverse, stats, loss, nullptr, nullptr);
    else
      kd_forward_kernel<T, 1, false><<<blocks, kThreads, 0, stream>>>(
          sp, tp, lds, ldt, V, inv, temperature, reverse, stats, loss, nullptr, nullptr);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const float* coef, const void* s, const void* t, int64_t lds,
                            int64_t ldt, int64_t N, int64_t V, float temperature, bool reverse,
                            const float* stats, void* grad, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const float inv = 1.f / temperature;
  const T* sp = static_cast<const T*>(s);
  const T* tp = static_cast<const T*>(t);
  T* gp = static_cast<T*>(grad);
  const unsigned int blocks = static_cast<unsigned int>(N);
  if (can_vectorize<T>(s, t, grad, lds, ldt, V))
    kd_backward_kernel<T, VEC><<<blocks, kThreads, 0, stream>>>(coef, sp, tp, lds, ldt, V, inv,
                                                                temperature, reverse, stats, gp);
  else
    kd_backward_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(coef, sp, tp, lds, ldt, V, inv,
                                                              temperature, reverse, stats, gp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t kd_forward(const void* s, const void* t, DType dtype, int64_t lds, int64_t ldt,
                       int64_t N, int64_t V, float temperature, bool reverse, float* stats,
                       float* loss, const float* coef, void* grad, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffffLL || V <= 0 || !(temperature > 0.f)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::F32:
      return launch_forward<float>(s, t, lds, ldt, N, V, temperature, reverse, stats, loss, coef,
                                   grad, stream);
    case DType::F16:
      return launch_forward<__half>(s, t, lds, ldt, N, V, temperature, reverse, stats, loss, coef,
                                    grad, stream);
    case DType::BF16:
      return launch_forward<__nv_bfloat16>(s, t, lds, ldt, N, V, temperature, reverse, stats,
                                           loss, coef, grad, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kd_backward(const float* coef, const void* s, const void* t, DType dtype, int64_t lds,
                        int64_t ldt, int64_t N, int64_t V, float temperature, bool reverse,
                        const float* stats, void* grad, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffffLL || V <= 0 || !(temperature > 0.f)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::F32:
      return launch_backward<float>(coef, s, t, lds, ldt, N, V, temperature, reverse, stats, grad,
                                    stream);
    case DType::F16:
      return launch_backward<__half>(coef, s, t, lds, ldt, N, V, temperature, reverse, stats,
                                     grad, stream);
    case DType::BF16:
      return launch_backward<__nv_bfloat16>(coef, s, t, lds, ldt, N, V, temperature, reverse,
                                            stats, grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pyc
