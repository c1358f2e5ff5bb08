// torch ops of the build without a head size: the RWKV-4 WKV and the int8 matmuls.
// Registered as torch.ops.rwkv_chat_ops.*; rwkv_chat/engine/cuda.py wraps them.
#include "torch_glue.h"

using rwkv_glue::activation_dtype;
using rwkv_glue::check;

namespace {

// k, v, y [B, T, C]; decay, first [C]; aa, bb, pp [B, C] float32, updated in place.
void wkv4(const at::Tensor& k, const at::Tensor& v, const at::Tensor& decay, const at::Tensor& first,
          at::Tensor& aa, at::Tensor& bb, at::Tensor& pp, at::Tensor& y) {
    TORCH_CHECK(k.dim() == 3, "wkv4: k must be [B, T, C], got ", k.sizes());
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    const at::Device device = k.device();
    check(k, "k", k.scalar_type(), B * T * C, device);
    check(v, "v", k.scalar_type(), B * T * C, device);
    check(y, "y", k.scalar_type(), B * T * C, device);
    check(decay, "decay", at::kFloat, C, device);
    check(first, "first", at::kFloat, C, device);
    check(aa, "aa", at::kFloat, B * C, device);
    check(bb, "bb", at::kFloat, B * C, device);
    check(pp, "pp", at::kFloat, B * C, device);

    const c10::cuda::CUDAGuard guard(device);
    Wkv4Problem p{};
    p.B = B; p.T = T; p.C = C;
    p.k = k.data_ptr(); p.v = v.data_ptr();
    p.decay = decay.data_ptr<float>(); p.first = first.data_ptr<float>();
    p.aa = aa.data_ptr<float>(); p.bb = bb.data_ptr<float>(); p.pp = pp.data_ptr<float>();
    p.y = y.data_ptr();
    rwkv_wkv4_forward(activation_dtype(k, "k"), p, rwkv_glue::stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_int8(const at::Tensor& q, const at::Tensor& scale, int64_t K, const at::Device& device) {
    TORCH_CHECK(q.dim() == 2 && q.size(1) == K, "q must be [N, ", K, "], got ", q.sizes());
    TORCH_CHECK(K % 32 == 0, "the int8 kernels need in_features % 32 == 0, got ", K);
    check(q, "q", at::kChar, q.numel(), device);
    check(scale, "scale", at::kFloat, q.size(0) * (K / 32), device);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0, "q must be 16-byte aligned");
}

// x [M, K], q [N, K] int8, scale [N, K / 32] float32, y [M, N]; M <= kInt8GemvMaxRows.
void int8_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, at::Tensor& y) {
    TORCH_CHECK(x.dim() == 2, "int8_matmul: x must be [M, K], got ", x.sizes());
    const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
    TORCH_CHECK(M <= kInt8GemvMaxRows, "int8_matmul: at most ", kInt8GemvMaxRows, " rows, got ", M);
    const at::Device device = x.device();
    check_int8(q, scale, K, device);
    check(x, "x", x.scalar_type(), M * K, device);
    check(y, "y", x.scalar_type(), M * N, device);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");

    const c10::cuda::CUDAGuard guard(device);
    Int8MatmulProblem p{};
    p.M = M; p.K = K; p.N = N;
    p.x = x.data_ptr(); p.q = static_cast<const int8_t*>(q.data_ptr());
    p.scale = scale.data_ptr<float>(); p.y = y.data_ptr();
    rwkv_int8_matmul(activation_dtype(x, "x"), p, rwkv_glue::stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// w [N, K] = q * scale (one per group of 32 inputs) in w's dtype.
void int8_dequantize(const at::Tensor& q, const at::Tensor& scale, at::Tensor& w) {
    TORCH_CHECK(w.dim() == 2, "int8_dequantize: w must be [N, K], got ", w.sizes());
    const at::Device device = w.device();
    check_int8(q, scale, w.size(1), device);
    check(w, "w", w.scalar_type(), q.numel(), device);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, "w must be 16-byte aligned");

    const c10::cuda::CUDAGuard guard(device);
    rwkv_int8_dequantize(activation_dtype(w, "w"), q.size(0), q.size(1), static_cast<const int8_t*>(q.data_ptr()),
                         scale.data_ptr<float>(), w.data_ptr(), rwkv_glue::stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY(rwkv_chat_ops, m) {
    m.def("wkv4(Tensor k, Tensor v, Tensor decay, Tensor first, Tensor(a!) aa, Tensor(b!) bb, Tensor(c!) pp, "
          "Tensor(d!) y) -> ()");
    m.def("int8_matmul(Tensor x, Tensor q, Tensor scale, Tensor(a!) y) -> ()");
    m.def("int8_dequantize(Tensor q, Tensor scale, Tensor(a!) w) -> ()");
    m.def("gemv_max_rows() -> int", []() -> int64_t { return kInt8GemvMaxRows; });
}

TORCH_LIBRARY_IMPL(rwkv_chat_ops, CUDA, m) {
    m.impl("wkv4", &wkv4);
    m.impl("int8_matmul", &int8_matmul);
    m.impl("int8_dequantize", &int8_dequantize);
}
