// Small device helpers shared by the kernels: float conversions and dtype dispatch.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "rwkv_kernels.h"

// Kernel launches go through RWKV_LAUNCH so the same sources also run under the host emulation
// the CPU tests use (tests/engine/cuda_emulation/); with nvcc it is a plain <<<>>> launch.
#ifndef RWKV_LAUNCH
#define RWKV_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace rwkv {

// Explicit conversions only: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename F> __device__ __forceinline__ F from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

template <typename T> struct TypeTag { using type = T; };

// Calls launch(TypeTag<F>{}) with F the CUDA type of `dtype`:
//   dispatch_dtype(dtype, [&](auto tag) { using F = typename decltype(tag)::type; ... });
template <typename Launch>
void dispatch_dtype(RwkvDtype dtype, Launch&& launch) {
    switch (dtype) {
        case RwkvDtype::f32: launch(TypeTag<float>{}); break;
        case RwkvDtype::f16: launch(TypeTag<__half>{}); break;
        case RwkvDtype::bf16: launch(TypeTag<__nv_bfloat16>{}); break;
    }
}

}  // namespace rwkv
