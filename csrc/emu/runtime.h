// The host-side CUDA runtime names that csrc/cuda's host code (ops_cuda.cpp, kernels.h) uses,
// for the emulated build, where the CUDA kernels run on the CPU (emu/device.h, emu/cuda_emu.cpp).
// No torch headers: the emulator itself does not depend on torch.
#pragma once
#include <cstddef>
#include <cstdint>

typedef struct gsae_emu_stream* cudaStream_t;  // never dereferenced: launches run at once
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 4 };

// A kernel fault (bad warp collective, deadlock, shared-memory index out of range) is kept, as
// a CUDA sticky error would be, until the host asks: the first one wins.
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);

namespace gsae_emu {

// The order in which the emulator resumes blocks, and the threads within a block, at every
// scheduling point. Deterministic kernels give bitwise equal results under every order; a race
// (a read of another thread's write without a barrier between) shows as a difference.
enum class Order { Forward, Reverse, Shuffle };
void set_schedule(Order order, uint64_t seed);
// Reads GSAE_FAST_EMU_SCHEDULE ("forward", "reverse" or "shuffle:SEED") once, at the first
// launch; set_schedule overrides it.
void schedule(Order* order, uint64_t* seed);

// Where a segmentation fault in emulated kernel code lands: describe(addr, buf, n) writes what
// the address is (e.g. "8 bytes past the end of a 1200-byte buffer") and returns true if it
// knows it. Set by the guarded-memory code of the emulated executor.
using FaultDescriber = bool (*)(const void* addr, char* buf, size_t n);
void set_fault_describer(FaultDescriber describe);

}  // namespace gsae_emu
