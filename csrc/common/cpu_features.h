// Run-time CPU feature detection and ISA selection for the CPU kernels.
//
// Kernels are compiled for several instruction sets in the same binary (via
// function-level target attributes, never -march=native) and pick one at run
// time. The chosen level can be lowered (never raised past what the CPU
// supports) with the environment variable PYCOMPRESS_CPU_ISA or set_cpu_isa(),
// which the tests use to exercise every path on one machine.
#pragma once

#include <string>

namespace pyc {

enum class CpuIsa : int {
  Scalar = 0,
  Avx2 = 1,      // AVX2 + FMA + F16C
  Avx512 = 2,    // AVX-512 F/BW/VL/DQ (+ VNNI where present)
  Amx = 3,       // AVX-512 level plus AMX-TILE/AMX-INT8 usable by this process
};

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512vnni = false;
  bool avx512bf16 = false;
  bool amx_tile = false;
  bool amx_int8 = false;
  bool amx_bf16 = false;
  bool os_avx512 = false;  // XCR0 enables ZMM state
  bool os_amx = false;     // XCR0 enables tile state and the kernel granted permission
};

// Hardware features, detected once.
const CpuFeatures& cpu_features();

// Highest ISA level the hardware (and OS) supports.
CpuIsa max_cpu_isa();

// ISA level kernels should use now: min(max_cpu_isa(), requested level).
CpuIsa active_cpu_isa();

// Requests an ISA level ("scalar", "avx2", "avx512", "amx" or "auto"). Returns
// the level actually in effect. Throws std::invalid_argument on a bad name.
CpuIsa set_cpu_isa(const std::string& name);

const char* cpu_isa_name(CpuIsa isa);

// Asks Linux for permission to use AMX tile data (once per process). Returns
// true when AMX instructions may be executed by this process.
bool request_amx_permission();

}  // namespace pyc
