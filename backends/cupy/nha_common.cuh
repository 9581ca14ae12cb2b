// Shared helpers of the CuPy backend's kernels (forward.cu, backward.cu, decode.cu).
//
// Compile-time knobs (NVRTC or nvcc -D...; the defaults make every .cu compile on its own):
//   IN_T     element type of q, k, v, g, s and of the outputs: float, __half or __nv_bfloat16
//   CACHE_T  element type of the decode window cache (defaults to IN_T)
//   BT       tokens per chunk = queries per block (the slot recurrence is chunked on the same grid)
//   BS       keys per window tile (the forward keeps BS == BT: the slot pass reuses the key tile)
//   RMAX     registers per thread for one state row/column = ceil(max(K, V, M) / LANES)
//
// Thread layout of the "slot passes": a block has NT threads; LANES consecutive lanes share one
// column (or row) of a state matrix and each owns every LANES-th element of it, so the reduction
// along the column is 3 warp shuffles and needs no __syncthreads. A pass covers NT / LANES
// columns; that is the BM / BK / BV of the pass (32 with NT = 256).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef IN_T
#define IN_T float
#endif
#ifndef CACHE_T
#define CACHE_T IN_T
#endif
#ifndef BT
#define BT 64
#endif
#ifndef BS
#define BS BT
#endif
#ifndef RMAX
#define RMAX 32  // head dims and M up to 8 * 32 = 256
#endif

#define NT 256               // threads per block
#define LANES 8              // lanes sharing one state column in a slot pass
#define BM (NT / LANES)      // slot columns per pass
#define BK (NT / LANES)      // key rows per pass
#define BV (NT / LANES)      // value columns per pass

typedef long long i64;

#ifndef INFINITY  // NVRTC does not always see <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, i64 i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, i64 i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, i64 i, float x) { p[i] = x; }
__device__ __forceinline__ void st(__half* p, i64 i, float x) { p[i] = __float2half_rn(x); }
__device__ __forceinline__ void st(__nv_bfloat16* p, i64 i, float x) { p[i] = __float2bfloat16_rn(x); }

// Sum over the LANES lanes of a group (aligned groups of 8 inside a warp). Every lane of the
// warp must call it: callers keep out-of-range columns running with zeros instead of branching.
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// exp(a - b) for a softmax weight where b is the running max; an all-masked row has b = -inf
// and must give 0, never exp(-inf + inf) = NaN.
__device__ __forceinline__ float exp_sub(float a, float b) {
    return (b == -INFINITY) ? 0.f : expf(a - b);
}

// Block-wide reductions for the decode kernel (NT threads, result broadcast to all).
__device__ __forceinline__ float block_max(float x, float* red) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < NT / 32; ++w) r = fmaxf(r, red[w]);
    return r;
}

__device__ __forceinline__ float block_sum(float x, float* red) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < NT / 32; ++w) r += red[w];  // fixed order: deterministic
    return r;
}
