// Group cross-entropy row kernels, AVX2 instantiation. setup.py compiles this file with -mavx2 -mfma -mf16c
// -DCPU_CAPABILITY=AVX2, so at::vec uses 256-bit registers here.
#include "cpu/group_loss_kernel_impl.h"

namespace aioli_ext {

void group_loss_rows_avx2(const GroupLossRowsArgs& args) {
  switch (args.dtype) {
    case LogitsDtype::Float: return group_loss_rows_for<float>(args);
    case LogitsDtype::Half: return group_loss_rows_for<c10::Half>(args);
    case LogitsDtype::BFloat16: return group_loss_rows_for<c10::BFloat16>(args);
    // The host routes fp64 to the default build.
    case LogitsDtype::Double: return group_loss_rows_default(args);
  }
}

void scale_rows_avx2(const ScaleRowsArgs& args) {
  switch (args.dtype) {
    case LogitsDtype::Float: return scale_rows<float>(args);
    case LogitsDtype::Half: return scale_rows<c10::Half>(args);
    case LogitsDtype::BFloat16: return scale_rows<c10::BFloat16>(args);
    case LogitsDtype::Double: return scale_rows_default(args);
  }
}

}  // namespace aioli_ext
