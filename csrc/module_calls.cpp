// Direct CPU inference calls of the nn modules (SparseLinear, SemiSparseLinear, Int8Linear): the
// registered CPU kernel called from the module's forward without the dispatcher and the op's
// Python wrapper, which together cost 2.5 us (SparseLinear) to 25 us (Int8Linear, whose wrapper
// validates every argument in Python) per call: up to half of a single-token product.
//
// Each call checks in C++ what the Python path would, and returns None, so that the module
// takes the general path, whenever anything is unusual: another device or dtype, a tensor
// subclass, shapes or buffers the op would reject (the general path raises the clear error), an
// argument that needs grad, or any dispatch mode, torch-function mode, functorch transform or
// tracer that must see the call. The profiler still records the op under its own name.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <utility>
#include <vector>

#include "int8/gemm.h"
#include "int8/int8_cpu.h"
#include "sparse/sparse_cpu.h"

namespace pyc {
namespace {

namespace py = pybind11;

// True when an op called now would go straight to its CPU kernel: nothing has put a key into
// the thread's included set beyond the two every eager call has (dispatch modes add Python,
// functorch transforms their layer keys, the tracer Tracer), and no torch-function mode is on
// the stack (stack_len exists in every supported torch; a disabled mode still counts, which only
// costs the direct call). Grad mode is checked per call.
bool plain_eager_call() {
  const c10::DispatchKeySet plain{c10::DispatchKey::BackendSelect,
                                  c10::DispatchKey::ADInplaceOrView};
  return (c10::impl::tls_local_dispatch_key_set().included_ - plain).empty() &&
         at::impl::PythonTorchFunctionTLS::stack_len() == 0;
}

// An exact torch.Tensor (or nn.Parameter, which torch treats the same) on the CPU, or nullptr.
const at::Tensor* cpu_tensor(PyObject* obj) {
  if (!obj || !THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.is_cpu() ? &t : nullptr;
}

// A buffer name as an interned Python string, made once per name and kept for the life of the
// process (PyDict_GetItemString would build a new string on every call); obj is null only if
// that allocation failed, and the call then takes the general path.
struct BufferKey {
  explicit BufferKey(const char* name) : obj(PyUnicode_InternFromString(name)) {}
  PyObject* obj;
};

// Entry `key` of a module's _buffers dict when it is a CPU tensor, else nullptr.
const at::Tensor* buffer(const py::dict& buffers, const BufferKey& key) {
  return key.obj ? cpu_tensor(PyDict_GetItem(buffers.ptr(), key.obj)) : nullptr;  // borrowed
}

// An entry that may also be missing or None (no tensor); *ok becomes false when it is anything
// else but a CPU tensor.
const at::Tensor* optional_buffer(const py::dict& buffers, const BufferKey& key, bool* ok) {
  PyObject* obj = key.obj ? PyDict_GetItem(buffers.ptr(), key.obj) : nullptr;
  const at::Tensor* t = cpu_tensor(obj);
  if (!t && obj && obj != Py_None) *ok = false;
  return t;
}

c10::optional<at::Tensor> optional(const at::Tensor* t) {
  return t ? c10::optional<at::Tensor>(*t) : c10::nullopt;
}

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool needs_grad(std::initializer_list<const at::Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : ts)
    if (t && t->requires_grad()) return true;
  return false;
}

// x [..., K] -> fn(x as [M, K]) -> [..., N], with the GIL released and the op recorded for the
// profiler.
template <typename F>
py::object call_2d(const char* name, const at::Tensor& x, int64_t K, F&& fn) {
  at::Tensor y;
  {
    py::gil_scoped_release no_gil;
    RECORD_FUNCTION(name, std::vector<c10::IValue>({x}));
    y = fn(x.dim() == 2 ? x : x.reshape({-1, K}));
    if (x.dim() != 2) {
      std::vector<int64_t> shape = x.sizes().vec();
      shape.back() = y.size(1);
      y = y.reshape(shape);
    }
  }
  return py::cast(std::move(y));
}

// The input every module call starts from: a CPU float tensor [..., K], when the call may go
// direct at all.
const at::Tensor* direct_input(py::handle x_obj, int64_t K) {
  const at::Tensor* x = cpu_tensor(x_obj.ptr());
  if (!x || !float_dtype(x->scalar_type()) || x->dim() < 1 || x->size(-1) != K) return nullptr;
  return plain_eager_call() ? x : nullptr;
}

py::object sparse_linear_module_cpu(py::handle x_obj, const py::dict& buffers, int64_t K) {
  const at::Tensor* x = direct_input(x_obj, K);
  if (!x) return py::none();
  static const BufferKey k_row_ptr("row_ptr"), k_col_idx("col_idx"), k_values("values"),
      k_bias("bias");
  bool ok = true;
  const at::Tensor* row_ptr = buffer(buffers, k_row_ptr);
  const at::Tensor* col_idx = buffer(buffers, k_col_idx);
  const at::Tensor* values = buffer(buffers, k_values);
  const at::Tensor* bias = optional_buffer(buffers, k_bias, &ok);
  if (!ok || !row_ptr || !col_idx || !values || needs_grad({x, values, bias})) return py::none();
  return call_2d("pycompress::sparse_linear", *x, K, [&](const at::Tensor& x2) {
    return sparse_linear_op_cpu(x2, *row_ptr, *col_idx, *values, optional(bias), K);
  });
}

py::object semi24_linear_module_cpu(py::handle x_obj, const py::dict& buffers, int64_t K) {
  const at::Tensor* x = direct_input(x_obj, K);
  if (!x) return py::none();
  static const BufferKey k_values("values"), k_meta("meta"), k_bias("bias");
  bool ok = true;
  const at::Tensor* values = buffer(buffers, k_values);
  const at::Tensor* meta = buffer(buffers, k_meta);
  const at::Tensor* bias = optional_buffer(buffers, k_bias, &ok);
  if (!ok || !values || !meta || needs_grad({x, values, bias})) return py::none();
  return call_2d("pycompress::semi24_linear", *x, K, [&](const at::Tensor& x2) {
    return semi24_linear_op_cpu(x2, *values, *meta, optional(bias), K);
  });
}

py::object int8_linear_module_cpu(py::handle x_obj, const py::dict& buffers, int64_t K,
                                  int64_t act_bits) {
  const at::Tensor* x = direct_input(x_obj, K);
  if (!x || (act_bits != 7 && act_bits != 8)) return py::none();
  static const BufferKey k_weight("weight"), k_scale("weight_scale"), k_bias("bias"),
      k_packed("weight_packed");
  bool ok = true;
  const at::Tensor* w = buffer(buffers, k_weight);
  const at::Tensor* w_scale = buffer(buffers, k_scale);
  const at::Tensor* bias = optional_buffer(buffers, k_bias, &ok);
  const at::Tensor* packed = buffer(buffers, k_packed);
  if (!ok || !w || !w_scale || needs_grad({x, w_scale, bias})) return py::none();
  if (w->scalar_type() != at::kChar || w->dim() != 2 || w->size(0) < 1 || w->size(1) != K)
    return py::none();
  const int64_t N = w->size(0);
  if (w_scale->scalar_type() != at::kFloat || w_scale->dim() != 1 || w_scale->size(0) != N)
    return py::none();
  // the module rounds a bias of another float dtype to float32 first: left to the general path
  if (bias && (bias->dim() != 1 || bias->size(0) != N ||
               (bias->scalar_type() != at::kFloat && bias->scalar_type() != x->scalar_type())))
    return py::none();
  // a packed weight of the wrong size (e.g. a checkpoint of another layout) is ignored, as the
  // module does: the op packs per call
  const bool use_packed = packed && packed->scalar_type() == at::kChar && packed->dim() == 1 &&
                          packed->is_contiguous() && packed->numel() == int8_packed_bytes(N, K);
  const at::Tensor* p = use_packed ? packed : nullptr;
  return call_2d("pycompress::int8_linear", *x, K, [&](const at::Tensor& x2) {
    return int8_linear_op_cpu(x2, *w, *w_scale, optional(bias), optional(p), act_bits);
  });
}

}  // namespace

void register_module_calls(py::module_& m) {
  m.def("sparse_linear_module_cpu", &sparse_linear_module_cpu, py::arg("x"), py::arg("buffers"),
        py::arg("in_features"),
        "SparseLinear's direct CPU inference call; None when the call must take the general path");
  m.def("semi24_linear_module_cpu", &semi24_linear_module_cpu, py::arg("x"), py::arg("buffers"),
        py::arg("in_features"),
        "SemiSparseLinear's direct CPU inference call; None when the call must take the general "
        "path");
  m.def("int8_linear_module_cpu", &int8_linear_module_cpu, py::arg("x"), py::arg("buffers"),
        py::arg("in_features"), py::arg("act_bits"),
        "Int8Linear's (w8a8) direct CPU inference call; None when the call must take the general "
        "path");
}

}  // namespace pyc
