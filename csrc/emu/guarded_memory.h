// Memory checks of the emulated CUDA executor: while a GuardedMemoryScope is open on a thread,
// every CPU tensor that thread allocates (the op's outputs, its temporaries, the guarded copies
// of its inputs) gets pages of its own between two inaccessible pages, the buffer ending exactly
// where the page after it begins (GSAE_FAST_EMU_MEMORY=start: starting right after the page
// before it), every byte of its pages filled with 0xFF (NaN in every float dtype, -1 in int).
//
// What that catches: a kernel that leaves an element of a fresh buffer unwritten (the poison
// reaches the comparison with the reference); a read or write past the end of any buffer from
// its first byte on (a fault that names the kernel, block, thread and buffer; with "start", a
// read or write before the start); a write into the rest of the buffer's pages on the other side
// (found when the buffer is freed: the process aborts naming it); a use after free (the pages
// are unmapped); a write into an input (check_unchanged). What it does not: a read on the other
// side within the buffer's pages (it reads poison, which usually shows), a wild index that lands
// inside another live buffer or far away in mapped memory, an output that aliases an input.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace gsae_fast {
namespace emu_memory {

class GuardedMemoryScope {
 public:
  GuardedMemoryScope();
  ~GuardedMemoryScope();
  GuardedMemoryScope(const GuardedMemoryScope&) = delete;
  GuardedMemoryScope& operator=(const GuardedMemoryScope&) = delete;
};

// A copy of t (same sizes and strides) in guarded memory; call inside a scope.
at::Tensor guarded_copy(const at::Tensor& t);
// Raises if the op `op` changed input number `index` (copy: the guarded copy it was given).
void check_unchanged(const at::Tensor& original, const at::Tensor& copy, const char* op,
                     int index);

template <typename T> T guard(const T& v) { return v; }
inline at::Tensor guard(const at::Tensor& t) { return guarded_copy(t); }
inline std::optional<at::Tensor> guard(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(guarded_copy(*t)) : t;
}

template <typename T> void unchanged(const T&, const T&, const char*, int) {}
inline void unchanged(const at::Tensor& a, const at::Tensor& b, const char* op, int i) {
  check_unchanged(a, b, op, i);
}
inline void unchanged(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                      const char* op, int i) {
  if (a.has_value()) check_unchanged(*a, *b, op, i);
}

// F on guarded copies of its tensor arguments, in a guarded-memory scope; then every input must
// be as it was (the kernels only read their inputs).
template <auto F> struct Guarded;
template <typename R, typename... A, R (*F)(A...)> struct Guarded<F> {
  static R call(A... args) {
    GuardedMemoryScope scope;
    std::tuple<std::decay_t<A>...> copies(guard(args)...);
    R out = std::apply(F, copies);
    check(std::forward_as_tuple(args...), copies, std::index_sequence_for<A...>{});
    return out;
  }
  template <typename Args, typename Copies, size_t... I>
  static void check(const Args& args, const Copies& copies, std::index_sequence<I...>) {
    (unchanged(std::get<I>(args), std::get<I>(copies), "a kernel op", static_cast<int>(I)), ...);
  }
};

}  // namespace emu_memory
}  // namespace gsae_fast
