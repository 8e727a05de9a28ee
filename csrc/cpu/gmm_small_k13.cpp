// gmm_em's small-K path for K = 13 ... 16 (see gmm_small.h for why it is split).
#define VOS_GMM_SMALL_KERNELS
#include "gmm_small.h"

namespace vos_kernels {
namespace cpu {
namespace gmm_small {
VOS_GMM_SMALL_ENTRY(13)
}  // namespace gmm_small
}  // namespace cpu
}  // namespace vos_kernels
