// Python module pycompress._C: loading it registers every torch.ops.pycompress
// op; it also exposes build and CPU-feature information.
#include <torch/extension.h>

#include "common/cpu_features.h"

namespace {

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
#ifdef PYCOMPRESS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
