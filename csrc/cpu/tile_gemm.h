// Small register-blocked matrix products for the CPU fused renderer (csrc/cpu/render.cpp), which runs
// its decoder over tiles of a few hundred samples instead of one sample at a time:
//   Y [n, M] (+)= X [n, K] @ W [K, M]      (W and Y row-major with row strides ldw, ldy; X element
//                                           (r, k) at X[r * ldx + k * kx], so X may be a transpose)
// n = tile samples (or hidden units for the weight gradients), K and M = C, hidden or 1 + D.
// Loops are plain C++ (no BLAS call): deterministic (a fixed summation order, independent of
// alignment and thread count), no per-call overhead, and compiled once per ISA with the kernel that
// inlines them (render.cpp's G3DR_CPU_KERNEL). With GCC/Clang the kRows x NV accumulator block is a
// set of generic vectors (vector_size 64 bytes: one AVX-512 register, two AVX2 registers; NV = 4 only
// where wide_blocks()), so it stays in registers while K streams; each row of W is then loaded once
// per kRows rows of X. gemm_nt_narrow is the output layer's product with a narrow transposed W.
// Summation order for every gemm output: the initial value (0 or Y), then k = 0, 1, ..., K-1.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// The vector helpers below are always inlined into the per-ISA kernels; the ABI note GCC gives
// for 64-byte vector returns in the baseline clone does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace g3dr {
namespace render {
namespace tile {

// Rows of X per register block.
constexpr int kRows = 4;

// Generic block: any nr <= kRows, any width.
template <typename T>
inline void block_scalar(int nr, int jb, int K, const T* X, int64_t ldx, int64_t kx, const T* W, int64_t ldw, T* Y,
                         int64_t ldy, bool accumulate) {
  for (int r = 0; r < nr; ++r) {
    T* y = Y + r * ldy;
    for (int j = 0; j < jb; ++j) {
      T acc = accumulate ? y[j] : T(0);
      for (int k = 0; k < K; ++k) acc += X[r * ldx + k * kx] * W[k * ldw + j];
      y[j] = acc;
    }
  }
}

#if defined(__GNUC__) || defined(__clang__)
#define G3DR_TILE_VECTORS 1
// A 64-byte generic vector of T.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(T);
};

// Whether 4 x 4 accumulator blocks fit the registers (32 AVX-512 registers; with AVX2 a 64-byte
// vector takes two of 16 registers, so blocks stay at 4 x 2 there).
inline bool wide_blocks() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool wide = __builtin_cpu_supports("avx512f");
  return wide;
#else
  return false;
#endif
}

template <typename T>
__attribute__((always_inline)) inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
__attribute__((always_inline)) inline void store(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// A kRows x (NV * lanes) block: kRows x NV accumulators in registers while K streams.
template <int NV, typename T>
inline void block_vec(int K, const T* X, int64_t ldx, int64_t kx, const T* W, int64_t ldw, T* Y, int64_t ldy,
                      bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  constexpr int kVecs = NV;
  V acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) acc[r][v] = accumulate ? load(Y + r * ldy + v * L) : V{};
  }
  for (int k = 0; k < K; ++k) {
    V w[kVecs];
    for (int v = 0; v < kVecs; ++v) w[v] = load(W + k * ldw + v * L);
    for (int r = 0; r < kRows; ++r) {
      const T x = X[r * ldx + k * kx];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += x * w[v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) store(Y + r * ldy + v * L, acc[r][v]);
  }
}

// The sum of a vector's lanes: halves added until two lanes are left (a fixed order: lane l of the
// lower half with lane l of the upper, recursively), then lane 0 + lane 1.
template <typename T, int Bytes>
struct HalvingSum {
  typedef T V __attribute__((vector_size(Bytes)));
  typedef T Half __attribute__((vector_size(Bytes / 2)));
  static __attribute__((always_inline)) T run(V v) {
    Half lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return HalvingSum<T, Bytes / 2>::run(lo + hi);
  }
};
template <typename T>
struct HalvingSum<T, 2 * sizeof(T)> {
  typedef T V __attribute__((vector_size(2 * sizeof(T))));
  static __attribute__((always_inline)) T run(V v) { return v[0] + v[1]; }
};

template <typename T>
__attribute__((always_inline)) inline T lane_sum(typename Vec<T>::type v) {
  return HalvingSum<T, 64>::run(v);
}
#endif

// Y [n, M] = bias + X [n, K] @ W [M, K]^T for a narrow M (the decoder's output layer, M = 1 + D): per
// row of X, M dot products over K. With vectors: lanes of K-blocks summed in vector registers, then
// across lanes (lane_sum), then the scalar K tail; the result is bias + that. Rows independent, so
// the order is fixed whatever the tile.
template <typename T>
inline void gemm_nt_narrow(int64_t n, int K, int M, const T* X, int64_t ldx, const T* W, const T* bias, T* Y,
                           int64_t ldy) {
  for (int64_t i = 0; i < n; ++i) {
    const T* x = X + i * ldx;
    T* y = Y + i * ldy;
    for (int m = 0; m < M; ++m) {
      const T* w = W + static_cast<int64_t>(m) * K;
      T acc = T(0);
      int k0 = 0;
#ifdef G3DR_TILE_VECTORS
      using V = typename Vec<T>::type;
      constexpr int L = Vec<T>::lanes;
      if (K >= L) {
        V s = load(x) * load(w);
        for (k0 = L; k0 + L <= K; k0 += L) s += load(x + k0) * load(w + k0);
        acc = lane_sum<T>(s);
      }
#endif
      for (int k = k0; k < K; ++k) acc += x[k] * w[k];
      y[m] = bias[m] + acc;
    }
  }
}

// Y [n, M] = (accumulate ? Y : 0) + X [n, K] @ W [K, M]; X (r, k) at X[r * ldx + k * kx]. Column
// blocks of 4, 2 or 1 vectors (4 only where wide_blocks()), scalar for the last columns and rows.
template <typename T>
inline void gemm(int64_t n, int K, int M, const T* X, int64_t ldx, int64_t kx, const T* W, int64_t ldw, T* Y,
                 int64_t ldy, bool accumulate) {
#ifdef G3DR_TILE_VECTORS
  constexpr int L = Vec<T>::lanes;
  const bool wide = wide_blocks();
#endif
  for (int64_t i = 0; i < n; i += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, n - i));
    const T* x = X + i * ldx;
    T* y = Y + i * ldy;
    int j0 = 0;
#ifdef G3DR_TILE_VECTORS
    if (nr == kRows) {
      if (wide) {
        for (; j0 + 4 * L <= M; j0 += 4 * L) block_vec<4, T>(K, x, ldx, kx, W + j0, ldw, y + j0, ldy, accumulate);
      }
      for (; j0 + 2 * L <= M; j0 += 2 * L) block_vec<2, T>(K, x, ldx, kx, W + j0, ldw, y + j0, ldy, accumulate);
      for (; j0 + L <= M; j0 += L) block_vec<1, T>(K, x, ldx, kx, W + j0, ldw, y + j0, ldy, accumulate);
    }
#endif
    if (j0 < M) block_scalar<T>(nr, M - j0, K, x, ldx, kx, W + j0, ldw, y + j0, ldy, accumulate);
  }
}

}  // namespace tile
}  // namespace render
}  // namespace g3dr
