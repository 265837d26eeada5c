// Group cross-entropy row kernels, portable instantiation. Built without ISA flags: at::vec falls back to its
// generic Vectorized (plain loops the compiler may auto-vectorise for the baseline ISA) and std::exp. Also the
// only home of the fp64 path (gradcheck): the AVX2/AVX-512 Vectorized<double>::exp_u20 calls Sleef.
#include "cpu/group_loss_kernel_impl.h"

namespace aioli_ext {

void group_loss_rows_default(const GroupLossRowsArgs& args) {
  switch (args.dtype) {
    case LogitsDtype::Float: return group_loss_rows_for<float>(args);
    case LogitsDtype::Half: return group_loss_rows_for<c10::Half>(args);
    case LogitsDtype::BFloat16: return group_loss_rows_for<c10::BFloat16>(args);
    case LogitsDtype::Double: return group_loss_rows_for<double>(args);
  }
}

void scale_rows_default(const ScaleRowsArgs& args) {
  switch (args.dtype) {
    case LogitsDtype::Float: return scale_rows<float>(args);
    case LogitsDtype::Half: return scale_rows<c10::Half>(args);
    case LogitsDtype::BFloat16: return scale_rows<c10::BFloat16>(args);
    case LogitsDtype::Double: return scale_rows<double>(args);
  }
}

}  // namespace aioli_ext
