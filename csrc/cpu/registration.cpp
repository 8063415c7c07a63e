// Registers the CPU implementation of every op of the table, decafa::cpu::<op>, for the decafa namespace
// (whose schemas decafa_fast/contract/schemas.py defines). The list is csrc/common/op_list.h, generated from
// the table: an op added there is registered here, and the library fails to load until it is defined.
#include <torch/library.h>

#include "../common/op_list.h"
#include "attention.h"

namespace decafa {
namespace cpu {

TORCH_LIBRARY_IMPL(decafa, CPU, m) {
#define DECAFA_REGISTER_OP(name, returns, params) m.impl(#name, &name);
  DECAFA_OPS(DECAFA_REGISTER_OP)
#undef DECAFA_REGISTER_OP
}

}  // namespace cpu
}  // namespace decafa
