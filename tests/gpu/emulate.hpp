// A CPU emulation of the CUDA execution model, enough to run vlmc's generated kernels without a
// GPU (tests/cuda_emulate.rs): every thread of a block is an OS thread, `__syncthreads` a
// barrier of the block, `__shfl_down_sync` an exchange through memory with a barrier per warp,
// `__shared__` a static (blocks run one after another, every thread walks all blocks in the
// same order, so the threads of a block always meet at its barriers).
#pragma once
#include <barrier>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

static std::barrier<>* vlmc_block_barrier = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> vlmc_warp_barriers;
static std::vector<uint64_t> vlmc_lanes;

static inline void __syncthreads() { vlmc_block_barrier->arrive_and_wait(); }

template <class T> static inline T __shfl_down_sync(unsigned, T v, int offset) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  vlmc_lanes[threadIdx.x] = bits;
  vlmc_warp_barriers[warp]->arrive_and_wait();
  T r = v;
  if (lane + offset < 32) std::memcpy(&r, &vlmc_lanes[warp * 32 + lane + offset], sizeof(T));
  vlmc_warp_barriers[warp]->arrive_and_wait();
  return r;
}

static inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
static inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
static inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }

// Runs `kernel` over a grid of blocks of `block` threads (a multiple of 32).
template <class F> static void vlmc_launch(dim3 grid, unsigned block, F kernel) {
  gridDim = grid;
  blockDim = dim3{block, 1, 1};
  std::barrier<> bar(block);
  vlmc_block_barrier = &bar;
  vlmc_warp_barriers.clear();
  for (unsigned w = 0; w < (block + 31) / 32; ++w)
    vlmc_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  vlmc_lanes.assign(block, 0);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([t, grid, &kernel] {
      threadIdx = dim3{t, 0, 0};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3{x, y, z};
            kernel();
          }
    });
  }
  for (auto& th : threads) th.join();
  vlmc_block_barrier = nullptr;
}

// cublasSgemmStridedBatched's definition (column-major, alpha = 1, beta = 0), to check the
// parameters the launch plan passes: C[i + j·ldc] = Σ_p op(A)(i, p) · op(B)(p, j).
static void vlmc_sgemm_strided_batched(bool ta, bool tb, int m, int n, int k, const float* a,
                                       int lda, long long sa, const float* b, int ldb,
                                       long long sb, float* c, int ldc, long long sc, int batch) {
  for (int z = 0; z < batch; ++z)
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        double acc = 0;
        for (int p = 0; p < k; ++p) {
          const float x = ta ? a[z * sa + p + (long long)i * lda] : a[z * sa + i + (long long)p * lda];
          const float y = tb ? b[z * sb + j + (long long)p * ldb] : b[z * sb + p + (long long)j * ldb];
          acc += (double)x * y;
        }
        c[z * sc + i + (long long)j * ldc] = (float)acc;
      }
}
