// The CUDA kernels of csrc/cuda/kernels.cu, compiled as C++ for the emulator (emu/device.h).
#define GSAE_FAST_CUDA_EMULATED 1
#include "cuda/kernels.cu"
