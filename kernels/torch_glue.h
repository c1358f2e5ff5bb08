// Helpers shared by the torch bindings (ops.cpp, ops_wkv.cpp): argument checks, dtype mapping,
// the current stream, and launch error checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rwkv_kernels.h"

// TORCH_LIBRARY pastes its namespace argument; going through one more macro expands a macro
// namespace (e.g. one built from -DRWKV_HEAD_SIZE) first.
#define RWKV_CONCAT_(a, b) a##b
#define RWKV_CONCAT(a, b) RWKV_CONCAT_(a, b)
#define RWKV_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define RWKV_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace rwkv_glue {

inline RwkvDtype activation_dtype(const at::Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat: return RwkvDtype::f32;
        case at::kHalf: return RwkvDtype::f16;
        case at::kBFloat16: return RwkvDtype::bf16;
        default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
    }
}

// A contiguous CUDA tensor on `device` with `numel` elements of `dtype`.
inline void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel, const at::Device& device) {
    TORCH_CHECK(t.is_cuda() && t.device() == device, name, " must be on ", device, ", got ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel(), " (shape ", t.sizes(), ")");
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace rwkv_glue
