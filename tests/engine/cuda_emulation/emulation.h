// Host emulation of the few CUDA features the rwkv-chat kernels use, so the kernel sources in
// rwkv_chat/kernels/ run (slowly) on a CPU in the tests: every CUDA thread of a block is a
// std::thread, __syncthreads() is a std::barrier, __shared__ arrays are static locals (blocks run
// one after another), and warp shuffles go through a block-wide exchange buffer. Enough to check
// indexing, synchronisation and numerics; it says nothing about speed.
//
// Include this before the .cu files (it defines RWKV_LAUNCH, which common.cuh then leaves alone).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <barrier>
#include <cmath>
#include <functional>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

inline dim3 block_dim, grid_dim;
inline thread_local dim3 thread_index, block_index;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local float* exchange = nullptr;  // one float per thread of the block

inline int linear_thread() {
    return thread_index.x + block_dim.x * (thread_index.y + block_dim.y * thread_index.z);
}

// Runs body() once per thread of every block, one block at a time.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    block_dim = block;
    grid_dim = grid;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> barrier(threads);
                std::vector<float> buffer(threads);
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; ++t) {
                    pool.emplace_back([&, t] {
                        thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                        block_index = dim3(bx, by, bz);
                        block_barrier = &barrier;
                        exchange = buffer.data();
                        body();
                    });
                }
                for (auto& thread : pool) thread.join();
            }
}

}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// Every thread of the block must call this the same number of times (true of warp-wide reductions).
inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
    const int me = emu::linear_thread();
    emu::exchange[me] = value;
    __syncthreads();
    const float other = emu::exchange[me ^ lane_mask];
    __syncthreads();
    return other;
}

#define RWKV_LAUNCH(kernel, grid, block, stream, ...) \
    ::emu::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })
