// TEMPORARY while the kernel is written: replaced in the next commit.
#include "dispatch/dense_fwd.h"
#include "bsk/error.h"
namespace bsk::detail {
void dense_fwd_cuda(const DenseFwdArgs&, int, cudaStream_t) { throw Unsupported("dense kernel not built yet"); }
}
