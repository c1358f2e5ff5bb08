// The rwkv-chat kernels compiled for the host emulation (emulation.h), with C entry points that
// the tests call through ctypes on CPU tensors. Build (the tests do this):
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -fvisibility=hidden -fno-gnu-unique -DRWKV_HEAD_SIZE=N \
//       -I<kernels> -I<cuda include> harness.cpp
#include "emulation.h"

#include "wkv4.cu"
#include "wkv5_6.cu"
#include "wkv7.cu"
#include "int8_matmul.cu"

#define EXPORT __attribute__((visibility("default")))

extern "C" {
EXPORT int emu_head_size() { return rwkv_wkv_head_size(); }
EXPORT void emu_wkv4(int dtype, const Wkv4Problem* p) { rwkv_wkv4_forward(static_cast<RwkvDtype>(dtype), *p, nullptr); }
EXPORT void emu_wkv5(int dtype, const Wkv5Problem* p) { rwkv_wkv5_forward(static_cast<RwkvDtype>(dtype), *p, nullptr); }
EXPORT void emu_wkv7(int dtype, const Wkv7Problem* p) { rwkv_wkv7_forward(static_cast<RwkvDtype>(dtype), *p, nullptr); }
EXPORT void emu_int8_matmul(int dtype, const Int8MatmulProblem* p) {
    rwkv_int8_matmul(static_cast<RwkvDtype>(dtype), *p, nullptr);
}
EXPORT void emu_int8_dequantize(int dtype, int N, int K, const int8_t* q, const float* scale, void* w) {
    rwkv_int8_dequantize(static_cast<RwkvDtype>(dtype), N, K, q, scale, w, nullptr);
}
}
