// vlmc CUDA prelude: the scalar semantics of the kernel IR (runtime/src/plan.rs) in f32 and i32.
// Self-contained: no header is included, so NVRTC needs no include path. The tests also compile
// it on the CPU with a host shim (tests/gpu/emulate.hpp).

// Rounding to the storage dtypes held in 4-byte slots (round to nearest even).
static __device__ __forceinline__ float vlmc_f16(float x) {
#ifdef __CUDA_ARCH__
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
  return r;
#else  // the CPU emulation of the tests (tests/gpu/emulate.hpp)
  return (float)(_Float16)x;
#endif
}
static __device__ __forceinline__ float vlmc_bf16(float x) {
  unsigned int u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return x;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __uint_as_float(u & 0xffff0000u);
}

static __device__ __forceinline__ float vlmc_nan() { return __int_as_float(0x7fffffff); }
static __device__ __forceinline__ float vlmc_inf() { return __int_as_float(0x7f800000); }

// max and min propagate NaN (fmaxf would drop it).
static __device__ __forceinline__ float vlmc_max(float a, float b) {
  return (a != a || b != b) ? vlmc_nan() : fmaxf(a, b);
}
static __device__ __forceinline__ float vlmc_min(float a, float b) {
  return (a != a || b != b) ? vlmc_nan() : fminf(a, b);
}

// Floor modulo: x - y * floor(x / y).
static __device__ __forceinline__ float vlmc_fmod(float a, float b) { return a - b * floorf(a / b); }

// i32 division rounds towards negative infinity; a zero divisor gives 0 (the interpreter stops).
static __device__ __forceinline__ int vlmc_idiv(int a, int b) {
  if (b == 0) return 0;
  if (b == -1) return (int)(0u - (unsigned int)a);
  int q = a / b;
  return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}
static __device__ __forceinline__ int vlmc_imod(int a, int b) {
  if (b == 0 || b == -1) return 0;
  int r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
static __device__ __forceinline__ int vlmc_ipow(int a, int b) {
  return (int)(long long)pow((double)a, (double)b);
}
// Float to i32: truncation, saturating at the i64 range, then wrapping (Rust's `v as i64 as i32`).
static __device__ __forceinline__ int vlmc_f2i(float x) { return (int)(long long)x; }

// Index arithmetic: floor division and Euclidean remainder by a positive constant.
template <class I> static __device__ __forceinline__ I vlmc_floordiv(I a, I c) {
  I q = a / c;
  return (q * c != a && a < 0) ? q - 1 : q;
}
template <class I> static __device__ __forceinline__ I vlmc_floormod(I a, I c) {
  I r = a % c;
  return r < 0 ? r + c : r;
}
template <class I> static __device__ __forceinline__ I vlmc_clamp(I a, I lo, I hi) {
  return a < lo ? lo : (a > hi ? hi : a);
}

// Block-level reductions: warp shuffles, then one value per warp through shared memory.
// The result is returned to every thread; `sh` holds at least 33 values.
struct VlmcSum {
  template <class T> static __device__ __forceinline__ T f(T a, T b) { return a + b; }
};
struct VlmcMaxF {
  static __device__ __forceinline__ float f(float a, float b) { return vlmc_max(a, b); }
};
struct VlmcMaxI {
  static __device__ __forceinline__ int f(int a, int b) { return a > b ? a : b; }
};
template <class Op, class T> static __device__ __forceinline__ T vlmc_warp_reduce(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = Op::f(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}
template <class Op, class T> static __device__ T vlmc_block_reduce(T v, T identity, T* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = vlmc_warp_reduce<Op>(v);
  __syncthreads();  // every thread has read the previous result out of sh
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? sh[lane] : identity;
    v = vlmc_warp_reduce<Op>(v);
    if (lane == 0) sh[32] = v;
  }
  __syncthreads();
  return sh[32];
}
