// The "cuda_emulated" executor: the host code of the CUDA executor (csrc/cuda/ops_cuda.cpp,
// compiled again with GSAE_FAST_CUDA_EMULATED) on CPU tensors, its kernels run by the emulator,
// registered as the ops of library gsae_fast_emu. Each call copies its inputs into guarded
// memory and allocates everything in guarded, poisoned memory (emu/guarded_memory.h).
#define GSAE_FAST_CUDA_EMULATED 1
#include "cuda/ops_cuda.cpp"

#include <string>

#include "emu/guarded_memory.h"
#include "emu/runtime.h"
#include "kernel_ops.h"

namespace gsae_fast {
namespace {

void set_schedule(std::string order, int64_t seed) {
  gsae_emu::Order o;
  if (order == "forward") o = gsae_emu::Order::Forward;
  else if (order == "reverse") o = gsae_emu::Order::Reverse;
  else if (order == "shuffle") o = gsae_emu::Order::Shuffle;
  else TORCH_CHECK(false, "gsae_fast_emu::set_schedule: order must be forward, reverse or "
                          "shuffle, got '", order, "'");
  gsae_emu::set_schedule(o, static_cast<uint64_t>(seed));
}

}  // namespace
}  // namespace gsae_fast

TORCH_LIBRARY(gsae_fast_emu, m) {
  gsae_fast::define_kernel_ops(m);
  // The order of blocks and threads of every following emulated launch (see emu/runtime.h).
  m.def("set_schedule(str order, int seed) -> ()", &gsae_fast::set_schedule);
}

TORCH_LIBRARY_IMPL(gsae_fast_emu, CPU, m) {
  using namespace gsae_fast;
  m.impl("gated_encode", &emu_memory::Guarded<&gated_encode_cuda>::call);
  m.impl("encode_grad_scatter", &emu_memory::Guarded<&encode_grad_scatter_cuda>::call);
  m.impl("sparse_decode", &emu_memory::Guarded<&sparse_decode_cuda>::call);
  m.impl("sparse_decode_backward", &emu_memory::Guarded<&sparse_decode_backward_cuda>::call);
  m.impl("sparse_decode_pair", &emu_memory::Guarded<&sparse_decode_pair_cuda>::call);
  m.impl("sparse_decode_pair_backward",
         &emu_memory::Guarded<&sparse_decode_pair_backward_cuda>::call);
}
