// Memory checks of the emulated CUDA executor: while a GuardedMemoryScope is open on a thread,
// every CPU tensor allocated (the op's outputs, its temporaries, the guarded copies of its
// inputs) gets a buffer of its own between two inaccessible pages, ending exactly where the page
// after it begins, and filled with 0xFF bytes (NaN in every float dtype, -1 in the integer ones).
//
// What that catches: a kernel that leaves an element of a fresh buffer unwritten (the poison
// reaches the comparison with the reference); a read or write past the end of any buffer, from
// its first byte on (a fault that names the kernel, block, thread and buffer); an access before
// the start that crosses a page boundary (less precise: up to a page of slack there); a use after
// free (the pages are unmapped). What it does not: a wild index that lands inside another live
// buffer, or far away in mapped memory.
#pragma once
#include <ATen/ATen.h>

namespace gsae_fast {
namespace emu_memory {

class GuardedMemoryScope {
 public:
  GuardedMemoryScope();
  ~GuardedMemoryScope();
  GuardedMemoryScope(const GuardedMemoryScope&) = delete;
  GuardedMemoryScope& operator=(const GuardedMemoryScope&) = delete;

 private:
  c10::Allocator* previous_;
};

// A copy of t (same sizes and strides) in guarded memory; call inside a scope.
at::Tensor guarded_copy(const at::Tensor& t);

}  // namespace emu_memory
}  // namespace gsae_fast
