// torch ops of a head-size build (-DRWKV_HEAD_SIZE=N): the RWKV-5.2/6 and RWKV-7 WKV.
// Registered as torch.ops.rwkv_chat_wkv_hs<N>.*, so builds for several head sizes can be loaded
// into one process; rwkv_chat/engine/cuda.py wraps them.
#include "torch_glue.h"

#ifndef RWKV_HEAD_SIZE
#error "compile with -DRWKV_HEAD_SIZE=<head size>, e.g. -DRWKV_HEAD_SIZE=64"
#endif
#define RWKV_WKV_NAMESPACE RWKV_CONCAT(rwkv_chat_wkv_hs, RWKV_HEAD_SIZE)

using rwkv_glue::activation_dtype;
using rwkv_glue::check;

namespace {

constexpr int64_t N = RWKV_HEAD_SIZE;

struct Shape {
    int64_t B, T, H;
};

// r: [B, T, H, N] with N the compiled head size.
Shape token_shape(const at::Tensor& r) {
    TORCH_CHECK(r.dim() == 4, "r must be [B, T, H, N], got ", r.sizes());
    TORCH_CHECK(r.size(3) == N, "this build is for head size ", N, ", got ", r.size(3));
    return {r.size(0), r.size(1), r.size(2)};
}

// r, k, v, y [B, T, H, N]; decay [H, N] or [B, T, H, N] float32; bonus [H, N] float32;
// state_in, state_out [B, H, N, N] float32 (S[k][v]); state_out may be state_in.
void wkv5(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& decay,
          const at::Tensor& bonus, const at::Tensor& state_in, at::Tensor& state_out, at::Tensor& y) {
    const Shape s = token_shape(r);
    const int64_t tokens = s.B * s.T * s.H * N;
    const at::Device device = r.device();
    const auto token_tensor = [&](const at::Tensor& t, const char* name) { check(t, name, r.scalar_type(), tokens, device); };
    token_tensor(r, "r"); token_tensor(k, "k"); token_tensor(v, "v"); token_tensor(y, "y");
    // v5.2: one decay per head channel; v6: one per token (the same thing when B * T == 1)
    const bool per_token_decay = decay.numel() != s.H * N;
    check(decay, "decay", at::kFloat, per_token_decay ? tokens : s.H * N, device);
    check(bonus, "bonus", at::kFloat, s.H * N, device);
    check(state_in, "state_in", at::kFloat, s.B * s.H * N * N, device);
    check(state_out, "state_out", at::kFloat, s.B * s.H * N * N, device);

    const c10::cuda::CUDAGuard guard(device);
    Wkv5Problem p{};
    p.B = s.B; p.T = s.T; p.H = s.H;
    p.per_token_decay = per_token_decay;
    p.r = r.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
    p.decay = decay.data_ptr<float>(); p.bonus = bonus.data_ptr<float>();
    p.state_in = state_in.data_ptr<float>(); p.state_out = state_out.data_ptr<float>();
    p.y = y.data_ptr();
    rwkv_wkv5_forward(activation_dtype(r, "r"), p, rwkv_glue::stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// r, k, v, kk, a, y [B, T, H, N]; decay [B, T, H, N] float32;
// state_in, state_out [B, H, N, N] float32 (S[v][k]); state_out may be state_in.
void wkv7(const at::Tensor& r, const at::Tensor& decay, const at::Tensor& k, const at::Tensor& v,
          const at::Tensor& kk, const at::Tensor& a, const at::Tensor& state_in, at::Tensor& state_out,
          at::Tensor& y) {
    const Shape s = token_shape(r);
    const int64_t tokens = s.B * s.T * s.H * N;
    const at::Device device = r.device();
    const auto token_tensor = [&](const at::Tensor& t, const char* name) { check(t, name, r.scalar_type(), tokens, device); };
    token_tensor(r, "r"); token_tensor(k, "k"); token_tensor(v, "v");
    token_tensor(kk, "kk"); token_tensor(a, "a"); token_tensor(y, "y");
    check(decay, "decay", at::kFloat, tokens, device);
    check(state_in, "state_in", at::kFloat, s.B * s.H * N * N, device);
    check(state_out, "state_out", at::kFloat, s.B * s.H * N * N, device);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(state_in.data_ptr()) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(state_out.data_ptr()) % 16 == 0, "wkv7 states must be 16-byte aligned");

    const c10::cuda::CUDAGuard guard(device);
    Wkv7Problem p{};
    p.B = s.B; p.T = s.T; p.H = s.H;
    p.r = r.data_ptr(); p.decay = decay.data_ptr<float>(); p.k = k.data_ptr(); p.v = v.data_ptr();
    p.kk = kk.data_ptr(); p.a = a.data_ptr();
    p.state_in = state_in.data_ptr<float>(); p.state_out = state_out.data_ptr<float>();
    p.y = y.data_ptr();
    rwkv_wkv7_forward(activation_dtype(r, "r"), p, rwkv_glue::stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

RWKV_TORCH_LIBRARY(RWKV_WKV_NAMESPACE, m) {
    m.def("wkv5(Tensor r, Tensor k, Tensor v, Tensor decay, Tensor bonus, Tensor state_in, Tensor(a!) state_out, "
          "Tensor(b!) y) -> ()");
    m.def("wkv7(Tensor r, Tensor decay, Tensor k, Tensor v, Tensor kk, Tensor a, Tensor state_in, "
          "Tensor(a!) state_out, Tensor(b!) y) -> ()");
    m.def("head_size() -> int", []() -> int64_t { return rwkv_wkv_head_size(); });
}

RWKV_TORCH_LIBRARY_IMPL(RWKV_WKV_NAMESPACE, CUDA, m) {
    m.impl("wkv5", &wkv5);
    m.impl("wkv7", &wkv7);
}
