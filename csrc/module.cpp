// Python module pycompress._C: loading it registers every torch.ops.pycompress
// op; it also exposes build and CPU-feature information, and typed entry points
// to the ops that layers call once per forward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"

namespace {

// A Python call through torch.ops converts each argument by walking the op's schema and checks
// every argument for __torch_function__ overrides: about 6 us for the 18 arguments of
// int8_conv2d, several times the work of a small convolution. The functions bound below convert
// their arguments with pybind11's typed casters and call the same op through the dispatcher, so
// every dispatch key (autograd, fake and meta kernels, Python modes, the profiler, the tracer)
// sees the same call; only the Python-level overrides are skipped, which is why the layers use
// them for plain tensors outside torch.compile (pycompress._ext.plain_eager) and torch.ops
// otherwise.
template <class T>
struct PyArg {
  using type = std::decay_t<T>;
};
template <>
struct PyArg<at::IntArrayRef> {
  using type = std::vector<int64_t>;
};
template <>
struct PyArg<c10::string_view> {
  using type = std::string;
};

template <class Sig>
struct DirectCall;

template <class R, class... A>
struct DirectCall<R(A...)> {
  static void def(pybind11::module_& m, const char* name, const char* op, const char* doc) {
    auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, "").typed<R(A...)>();
    m.def(
        name,
        [handle](const typename PyArg<std::decay_t<A>>::type&... args) -> R {
          return handle.call(args...);
        },
        doc, pybind11::call_guard<pybind11::gil_scoped_release>());
  }
};

using OptTensor = c10::optional<at::Tensor>;
using Int8Conv2dSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&,
                                 const at::Tensor&, const at::Tensor&, const OptTensor&,
                                 const OptTensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                 int64_t, c10::string_view, c10::optional<at::ScalarType>, double,
                                 int64_t, const OptTensor&, double, int64_t);
using Int8LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const OptTensor&, const OptTensor&, int64_t);
using Int8LinearW8A16Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const OptTensor&);
using SparseLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, int64_t, const OptTensor&);
using Semi24LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const OptTensor&, int64_t);

pybind11::dict cpu_features_dict() {
  const auto& f = pyc::cpu_features();
  pybind11::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq;
  d["avx512vnni"] = f.avx512vnni;
  d["avx512bf16"] = f.avx512bf16;
  d["amx_tile"] = f.amx_tile;
  d["amx_int8"] = f.amx_int8;
  d["amx_bf16"] = f.amx_bf16;
  d["os_amx"] = f.os_amx;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pycompress compiled kernels";
  m.def("cpu_features", &cpu_features_dict, "CPU features detected at run time");
  m.def("max_cpu_isa", [] { return std::string(pyc::cpu_isa_name(pyc::max_cpu_isa())); });
  m.def("active_cpu_isa", [] { return std::string(pyc::cpu_isa_name(pyc::active_cpu_isa())); });
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        try {
          return std::string(pyc::cpu_isa_name(pyc::set_cpu_isa(name)));
        } catch (const std::invalid_argument& e) {
          throw pybind11::value_error(e.what());
        }
      },
      "Limit the CPU kernels to an ISA level: auto, scalar, avx2, avx512 or amx");
  auto direct = m.def_submodule(
      "direct", "Typed calls of torch.ops.pycompress ops (same schema, all arguments positional)");
  DirectCall<Int8Conv2dSig>::def(direct, "int8_conv2d", "pycompress::int8_conv2d",
                                 "torch.ops.pycompress.int8_conv2d");
  DirectCall<Int8LinearSig>::def(direct, "int8_linear", "pycompress::int8_linear",
                                 "torch.ops.pycompress.int8_linear");
  DirectCall<Int8LinearW8A16Sig>::def(direct, "int8_linear_w8a16", "pycompress::int8_linear_w8a16",
                                      "torch.ops.pycompress.int8_linear_w8a16");
  DirectCall<SparseLinearSig>::def(direct, "sparse_linear", "pycompress::sparse_linear",
                                   "torch.ops.pycompress.sparse_linear");
  DirectCall<Semi24LinearSig>::def(direct, "semi24_linear", "pycompress::semi24_linear",
                                   "torch.ops.pycompress.semi24_linear");
#ifdef PYCOMPRESS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
