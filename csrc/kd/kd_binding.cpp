// Torch glue for the fused KD softmax-KL family (CPU): schemas and CPU kernels.
//
//   kd_kl_div_forward(student, teacher, temperature, reverse) -> (loss[N], stats[N, 5])
//   kd_kl_div_backward(grad_loss[N], student, teacher, stats, temperature, reverse) -> grad[N, V]
//   kd_kl_div_fused(student, teacher, coef[N], temperature, reverse) -> (loss, stats, grad)
//
// Inputs are [N, V] logits (unit column stride); loss[i] = T^2 * KL of row i (fp32, or fp64 for
// fp64 inputs); grad rows are d(sum_i coef_i * loss_i)/d student (grad_loss plays the role of
// coef in the backward). Rows whose coefficient is 0 get a zero gradient without being read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/torch_utils.h"
#include "kd/kd.h"

namespace pyc {
namespace {

// Row-parallel loop. at::parallel_for is header-only and runs serially unless this file is
// compiled with OpenMP (the extension is not), so the work is split over std::threads here,
// as many as at::get_num_threads() allows; small problems stay on the calling thread.
template <class F>
void kd_parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  int64_t threads = at::get_num_threads();
  if (grain < 1) grain = 1;
  if (threads > (n + grain - 1) / grain) threads = (n + grain - 1) / grain;
  if (threads <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t k = 1; k < threads; ++k) {
    const int64_t b = begin + k * chunk, e = b + chunk < end ? b + chunk : end;
    if (b < e) pool.emplace_back([&f, b, e] { f(b, e); });
  }
  f(begin, begin + chunk < end ? begin + chunk : end);
  for (auto& th : pool) th.join();
}

// Rows per task: at least ~256k elements, so that starting a thread pays off.
int64_t kd_grain(int64_t V) {
  const int64_t g = V > 0 ? (int64_t(1) << 18) / V : 1;
  return g < 1 ? 1 : g;
}

struct KdArgs {
  at::Tensor s, t;
  int64_t N = 0, V = 0, lds = 0, ldt = 0;
  bool f64 = false;
  DType dt = DType::F32;
};

KdArgs check_inputs(const at::Tensor& s_in, const at::Tensor& t_in, double temperature,
                    const char* op) {
  TORCH_CHECK(s_in.dim() == 2, op, ": student_logits must be 2-D [N, V], got ", s_in.dim(), "-D");
  TORCH_CHECK(s_in.sizes() == t_in.sizes(), op, ": student_logits ", s_in.sizes(),
              " and teacher_logits ", t_in.sizes(), " must have the same shape");
  TORCH_CHECK(s_in.scalar_type() == t_in.scalar_type(), op,
              ": student_logits and teacher_logits must have the same dtype, got ",
              s_in.scalar_type(), " and ", t_in.scalar_type());
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  KdArgs a;
  a.f64 = s_in.scalar_type() == at::kDouble;
  if (!a.f64) a.dt = to_dtype(s_in, op);
  a.s = s_in.stride(1) == 1 ? s_in : s_in.contiguous();
  a.t = t_in.stride(1) == 1 ? t_in : t_in.contiguous();
  a.N = a.s.size(0);
  a.V = a.s.size(1);
  TORCH_CHECK(a.N == 0 || a.V > 0, op, ": the class (last) dimension must not be empty");
  a.lds = a.N > 1 ? a.s.stride(0) : a.V;
  a.ldt = a.N > 1 ? a.t.stride(0) : a.V;
  return a;
}

// The gradient is as large as the logits and is written exactly once. A fresh allocation
// of that size is first touched by the kernel, and with 4 KiB pages the page faults cost as
// much as the arithmetic; ask Linux for transparent huge pages on it (a hint: ignored where
// THP is off, and the tensor stays an ordinary allocation of the torch CPU allocator).
at::Tensor empty_grad(int64_t N, int64_t V, const at::TensorOptions& opts) {
  at::Tensor g = at::empty({N, V}, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = g.nbytes();
  const uintptr_t huge = uintptr_t(2) << 20;
  if (bytes >= 4 * huge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(g.data_ptr());
    const uintptr_t b = (p + huge - 1) & ~(huge - 1), e = (p + bytes) & ~(huge - 1);
    if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
  }
#endif
  return g;
}

size_t elem_size(const KdArgs& a) { return a.f64 ? 8 : (a.dt == DType::F32 ? 4 : 2); }

// Splits rows into `parts` column ranges when there are fewer rows than threads.
int64_t column_parts(int64_t N, int64_t V) {
  const int64_t threads = at::get_num_threads();
  if (N >= threads || V < 32768) return 1;
  int64_t p = (threads + N - 1) / N;
  const int64_t max_p = V / 16384;
  return p < max_p ? p : max_p;
}

// Fills stats [N, 5] (and loss [N] = T^2 * KL) for the fp32/fp16/bf16 path.
void forward_rows(const KdArgs& a, double temperature, bool reverse, float* stats, float* loss) {
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float t2 = static_cast<float>(temperature * temperature);
  const char* sp = static_cast<const char*>(a.s.data_ptr());
  const char* tp = static_cast<const char*>(a.t.data_ptr());
  const size_t es = elem_size(a);
  const int64_t parts = column_parts(a.N, a.V);
  if (parts == 1) {
    kd_parallel_for(0, a.N, kd_grain(a.V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const KdPartial p = kd_partial_cpu(sp + i * a.lds * es, tp + i * a.ldt * es, a.dt, a.V,
                                           inv_t, reverse);
        kd_finalize(p, reverse, stats + i * KD_STATS);
        loss[i] = t2 * stats[i * KD_STATS + 4];
      }
    });
    return;
  }
  const int64_t step = (a.V + parts - 1) / parts;
  std::vector<KdPartial> partials(a.N * parts);
  kd_parallel_for(0, a.N * parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t i = k / parts, c0 = (k % parts) * step;
      const int64_t len = c0 >= a.V ? 0 : (a.V - c0 < step ? a.V - c0 : step);
      partials[k] = len == 0 ? kd_empty_partial()
                             : kd_partial_cpu(sp + (i * a.lds + c0) * es,
                                              tp + (i * a.ldt + c0) * es, a.dt, len, inv_t,
                                              reverse);
    }
  });
  for (int64_t i = 0; i < a.N; ++i) {
    KdPartial acc = partials[i * parts];
    for (int64_t q = 1; q < parts; ++q) acc = kd_merge(acc, partials[i * parts + q], reverse);
    kd_finalize(acc, reverse, stats + i * KD_STATS);
    loss[i] = t2 * stats[i * KD_STATS + 4];
  }
}

void zero_row(void* g, int64_t V, size_t es) { std::memset(g, 0, V * es); }

void grad_rows(const KdArgs& a, double temperature, bool reverse, const float* stats,
               const float* coef, void* g) {
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float temp = static_cast<float>(temperature);
  const char* sp = static_cast<const char*>(a.s.data_ptr());
  const char* tp = static_cast<const char*>(a.t.data_ptr());
  char* gp = static_cast<char*>(g);
  const size_t es = elem_size(a);
  const int64_t parts = column_parts(a.N, a.V);
  const int64_t step = (a.V + parts - 1) / parts;
  kd_parallel_for(0, a.N * parts, parts == 1 ? kd_grain(a.V) : 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t i = k / parts, c0 = (k % parts) * step;
      const int64_t len = c0 >= a.V ? 0 : (a.V - c0 < step ? a.V - c0 : step);
      if (len == 0) continue;
      void* gr = gp + (i * a.V + c0) * es;
      if (coef[i] == 0.f) {
        zero_row(gr, len, es);
        continue;
      }
      kd_grad_cpu(sp + (i * a.lds + c0) * es, tp + (i * a.ldt + c0) * es, gr, a.dt, len, inv_t,
                  temp, reverse, stats + i * KD_STATS, coef[i]);
    }
  });
}

// One pass per row: statistics, then the gradient while the row is still in cache.
void fused_rows(const KdArgs& a, double temperature, bool reverse, const float* coef,
                float* stats, float* loss, void* g) {
  if (column_parts(a.N, a.V) > 1) {
    forward_rows(a, temperature, reverse, stats, loss);
    grad_rows(a, temperature, reverse, stats, coef, g);
    return;
  }
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float temp = static_cast<float>(temperature);
  const float t2 = static_cast<float>(temperature * temperature);
  const char* sp = static_cast<const char*>(a.s.data_ptr());
  const char* tp = static_cast<const char*>(a.t.data_ptr());
  char* gp = static_cast<char*>(g);
  const size_t es = elem_size(a);
  kd_parallel_for(0, a.N, kd_grain(a.V), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const void* sr = sp + i * a.lds * es;
      const void* tr = tp + i * a.ldt * es;
      float* st = stats + i * KD_STATS;
      kd_finalize(kd_partial_cpu(sr, tr, a.dt, a.V, inv_t, reverse), reverse, st);
      loss[i] = t2 * st[4];
      if (coef[i] == 0.f) {
        zero_row(gp + i * a.V * es, a.V, es);
      } else {
        kd_grad_cpu(sr, tr, gp + i * a.V * es, a.dt, a.V, inv_t, temp, reverse, st, coef[i]);
      }
    }
  });
}

// float64 path (scalar double math): used for gradcheck and float64 training.
void forward_rows_f64(const KdArgs& a, double temperature, bool reverse, double* stats,
                      double* loss) {
  const double* sp = a.s.data_ptr<double>();
  const double* tp = a.t.data_ptr<double>();
  kd_parallel_for(0, a.N, kd_grain(a.V), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      kd_row_stats_f64(sp + i * a.lds, tp + i * a.ldt, a.V, 1.0 / temperature, reverse,
                       stats + i * KD_STATS);
      loss[i] = temperature * temperature * stats[i * KD_STATS + 4];
    }
  });
}

void grad_rows_f64(const KdArgs& a, double temperature, bool reverse, const double* stats,
                   const double* coef, double* g) {
  const double* sp = a.s.data_ptr<double>();
  const double* tp = a.t.data_ptr<double>();
  kd_parallel_for(0, a.N, kd_grain(a.V), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (coef[i] == 0.0) {
        std::memset(g + i * a.V, 0, a.V * sizeof(double));
        continue;
      }
      kd_row_grad_f64(sp + i * a.lds, tp + i * a.ldt, g + i * a.V, a.V, 1.0 / temperature,
                      temperature, reverse, stats + i * KD_STATS, coef[i]);
    }
  });
}

at::ScalarType acc_type(const KdArgs& a) { return a.f64 ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> kd_forward_cpu(const at::Tensor& student,
                                                  const at::Tensor& teacher, double temperature,
                                                  bool reverse) {
  const KdArgs a = check_inputs(student, teacher, temperature, "kd_kl_div_forward");
  auto opts = a.s.options().dtype(acc_type(a));
  auto loss = at::empty({a.N}, opts);
  auto stats = at::empty({a.N, KD_STATS}, opts);
  if (a.N == 0) return {loss, stats};
  if (a.f64) {
    forward_rows_f64(a, temperature, reverse, stats.data_ptr<double>(), loss.data_ptr<double>());
  } else {
    forward_rows(a, temperature, reverse, stats.data_ptr<float>(), loss.data_ptr<float>());
  }
  return {loss, stats};
}

at::Tensor checked_coef(const at::Tensor& c, const KdArgs& a, const char* op, const char* name) {
  TORCH_CHECK(c.dim() == 1 && c.size(0) == a.N, op, ": ", name, " must have shape [", a.N,
              "], got ", c.sizes());
  return c.to(acc_type(a)).contiguous();
}

at::Tensor kd_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                           const at::Tensor& teacher, const at::Tensor& stats_in,
                           double temperature, bool reverse) {
  const KdArgs a = check_inputs(student, teacher, temperature, "kd_kl_div_backward");
  const at::Tensor coef = checked_coef(grad_loss, a, "kd_kl_div_backward", "grad_loss");
  TORCH_CHECK(stats_in.dim() == 2 && stats_in.size(0) == a.N && stats_in.size(1) == KD_STATS,
              "kd_kl_div_backward: stats must have shape [", a.N, ", ", KD_STATS, "]");
  const at::Tensor stats = stats_in.to(acc_type(a)).contiguous();
  auto grad = empty_grad(a.N, a.V, a.s.options());
  if (a.N == 0) return grad;
  if (a.f64) {
    grad_rows_f64(a, temperature, reverse, stats.data_ptr<double>(), coef.data_ptr<double>(),
                  grad.data_ptr<double>());
  } else {
    grad_rows(a, temperature, reverse, stats.data_ptr<float>(), coef.data_ptr<float>(),
              grad.data_ptr());
  }
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fused_cpu(const at::Tensor& student,
                                                            const at::Tensor& teacher,
                                                            const at::Tensor& coef_in,
                                                            double temperature, bool reverse) {
  const KdArgs a = check_inputs(student, teacher, temperature, "kd_kl_div_fused");
  const at::Tensor coef = checked_coef(coef_in, a, "kd_kl_div_fused", "coef");
  auto opts = a.s.options().dtype(acc_type(a));
  auto loss = at::empty({a.N}, opts);
  auto stats = at::empty({a.N, KD_STATS}, opts);
  auto grad = empty_grad(a.N, a.V, a.s.options());
  if (a.N == 0) return {loss, stats, grad};
  if (a.f64) {
    forward_rows_f64(a, temperature, reverse, stats.data_ptr<double>(), loss.data_ptr<double>());
    grad_rows_f64(a, temperature, reverse, stats.data_ptr<double>(), coef.data_ptr<double>(),
                  grad.data_ptr<double>());
  } else {
    fused_rows(a, temperature, reverse, coef.data_ptr<float>(), stats.data_ptr<float>(),
               loss.data_ptr<float>(), grad.data_ptr());
  }
  return {loss, stats, grad};
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def("kd_kl_div_forward(Tensor student, Tensor teacher, float temperature, bool reverse) -> "
        "(Tensor, Tensor)");
  m.def("kd_kl_div_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, "
        "float temperature, bool reverse) -> Tensor");
  m.def("kd_kl_div_fused(Tensor student, Tensor teacher, Tensor coef, float temperature, "
        "bool reverse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("kd_kl_div_forward", &pyc::kd_forward_cpu);
  m.impl("kd_kl_div_backward", &pyc::kd_backward_cpu);
  m.impl("kd_kl_div_fused", &pyc::kd_fused_cpu);
}
