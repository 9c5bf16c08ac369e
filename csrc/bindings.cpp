// Python module molrg_ext._C. Importing it loads this shared library, which registers the
// torch.ops.molrg.* operators; the module itself only reports how the library was built.
#ifndef MOLRG_TORCH_VERSION
#define MOLRG_TORCH_VERSION "unknown"
#endif
#include <pybind11/pybind11.h>

#include <string>

#include "cpu_features.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "molrg_ext native operators (registered as torch.ops.molrg.*)";
#ifdef MOLRG_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("torch_version") = MOLRG_TORCH_VERSION;  // torch.__version__ of the build
  // the instruction-set extensions the build uses (space-separated /proc/cpuinfo names); the
  // import reads the same record from the file before loading it
  // through an opaque pointer: with the contents visible (the build uses LTO) GCC folded the
  // string into a second, overlapping constant in the file, a garbled copy of the marker the
  // import scans for
  const char* text = molrg::kCpuFeaturesRecord;
  __asm__("" : "+r"(text));
  const std::string record = text;
  const auto open = record.find('['), close = record.rfind(']');
  std::string features = record.substr(open + 1, close - open - 1);
  const auto first = features.find_first_not_of(' '), last = features.find_last_not_of(' ');
  m.attr("cpu_features") = first == std::string::npos ? std::string()
                                                       : features.substr(first, last - first + 1);
}
