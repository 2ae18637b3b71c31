// Fully fused renderer: CUDA kernels, one thread per ray (a first version). The per-ray loops are the
// ones the CPU kernel runs (g3dr::render::ray_forward_fused / ray_backward_scan in
// csrc/include/g3dr/render_math.h, so the CPU tests cover their math); schemas, argument checks and
// outputs are the op boundary's (csrc/ops/render.cpp). Contract: g3dr_kernels/ops/render.py.
//
//   forward:  each thread streams its ray's samples with the decoder state in local memory and writes
//             the ray's outputs (no per-sample tensor).
//   backward: each thread recomputes its ray once (plus a density-only pass for rays with a weights
//             gradient) and scatters feature gradients into channels-last plane-gradient buffers with
//             atomicAdd. The decoder's weight gradients are sums over every sample of outer products,
//             which per-thread accumulators cannot hold and atomics would serialise, so the rays are
//             processed in tiles: per tile the kernel writes each sample's (f, h, dL/da, dL/do) rows
//             into a bounded scratch buffer (at most kRowsBudget bytes, not B x R x S) and two GEMMs
//             add gw1 += ga^T f, gw2 += go^T h.
// float32/float64, and float16/bfloat16 planes/rays/decoder with float32 accumulation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "g3dr/render_math.h"
#include "g3dr/render_op.h"

namespace g3dr {
namespace render {

namespace {

constexpr int kThreads = 128;                        // rays per block
constexpr int64_t kRowsBudget = int64_t(256) << 20;  // bytes of per-sample rows per backward tile
// The per-thread state lives in fixed-size local arrays: the largest sizes this kernel takes.
constexpr int kMaxC = 64, kMaxHidden = 128, kMaxD = 32;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

struct AtomicAdd {
  template <typename T>
  G3DR_HD void operator()(T* p, T v) const {
#ifdef __CUDA_ARCH__
    atomicAdd(p, v);  // float, or double (sm_60+)
#else
    *p += v;
#endif
  }
};

template <typename scalar_t, typename acc_t, int kC, int kHd, int kO>
__global__ void __launch_bounds__(kThreads) render_fwd_kernel(const RenderArgs<scalar_t, acc_t> c, int64_t n) {
  const int64_t ray = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ray >= n) return;
  acc_t f[kC], a[kHd], h[kHd], o[kO], acc_rgb[kO], prev_rgb[kO];
  ray_forward_fused(c, ray, f, a, h, o, acc_rgb, prev_rgb);
}

// The GPU's per-sample backprop: feature gradients scattered with atomics; the sample's row
// (f [C], h [Hd], ga [Hd], go [O]) written for the tile's weight-gradient GEMMs.
template <typename scalar_t, typename acc_t>
struct GpuBackprop {
  const RenderArgs<scalar_t, acc_t>& c;
  const PyramidView<acc_t>& gv;
  int64_t b;
  acc_t* rows;  // this ray's rows [S, rowlen]
  int64_t rowlen;
  acc_t* ga;  // scratch [Hd]
  acc_t* gf;  // scratch [C]
  G3DR_HD void operator()(const SampleState<acc_t>& x, int64_t s, const acc_t* go, bool nonzero) {
    const int64_t C = c.C, Hd = c.Hd, O = c.O;
    acc_t* row = rows + s * rowlen;
    for (int64_t i = 0; i < C; ++i) row[i] = x.f[i];
    for (int64_t j = 0; j < Hd; ++j) row[C + j] = x.h[j];
    acc_t* rga = row + C + Hd;
    acc_t* rgo = rga + Hd;
    if (!nonzero) {
      for (int64_t j = 0; j < Hd; ++j) rga[j] = acc_t(0);
      for (int64_t k = 0; k < O; ++k) rgo[k] = acc_t(0);
      return;
    }
    mlp_backward_input<acc_t>(static_cast<int>(C), c.w1, static_cast<int>(Hd), c.w2, static_cast<int>(O), x.dh, go,
                              ga, gf);
    for (int64_t j = 0; j < Hd; ++j) rga[j] = ga[j];
    for (int64_t k = 0; k < O; ++k) rgo[k] = go[k];
    scatter_point_grad(gv, b, x.u, c.plane_axes, gf, AtomicAdd{});
  }
};

template <typename scalar_t, typename acc_t, int kC, int kHd, int kO>
__global__ void __launch_bounds__(kThreads)
    render_bwd_kernel(const RenderArgs<scalar_t, acc_t> c, const PyramidView<acc_t> gv, int64_t ray0, int64_t n,
                      acc_t* __restrict__ rows, int64_t rowlen) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const int64_t ray = ray0 + t, b = ray / c.R;
  constexpr int kState = kC + 3 * kHd + kO;
  acc_t mem[2 * kState], ga[kHd], gf[kC], go[kO];
  SampleState<acc_t> st[2];
  for (int i = 0; i < 2; ++i) {
    st[i].f = mem + i * kState;
    st[i].a = st[i].f + kC;
    st[i].h = st[i].a + kHd;
    st[i].dh = st[i].h + kHd;
    st[i].o = st[i].dh + kHd;
  }
  RayGrad<acc_t> rg = ray_grad_setup<scalar_t, acc_t>(
      c.g_rgb + ray * c.D, static_cast<acc_t>(c.g_depth[ray]), static_cast<acc_t>(c.g_op[ray]), c.s_rgb + ray * c.D,
      static_cast<acc_t>(c.s_depth[ray]), static_cast<acc_t>(c.s_op[ray]), c.D, c.prm);
  const scalar_t* gwr = ray_weights_grad(c, ray);
  if (gwr != nullptr) rg.total += ray_weights_total(c, ray, b, st, false, gwr);
  GpuBackprop<scalar_t, acc_t> bp{c, gv, b, rows + t * c.S * rowlen, rowlen, ga, gf};
  ray_backward_scan(c, ray, b, st, false, gwr, rg, go, bp);
}

// Launch with the smallest local-array sizes that fit (C <= 32, hidden <= 64, D <= 3 is the common case).
template <typename scalar_t, typename acc_t, typename Launch>
void with_sizes(const Dims& d, Launch launch) {
  if (d.C <= 32 && d.Hd <= 64 && d.O <= 4) {
    launch(std::integral_constant<int, 32>{}, std::integral_constant<int, 64>{}, std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, kMaxC>{}, std::integral_constant<int, kMaxHidden>{},
           std::integral_constant<int, kMaxD + 1>{});
  }
}

void check_cuda_sizes(const Dims& d, const at::Tensor& depths) {
  TORCH_CHECK(depths.is_cuda(), "render (cuda): tensors must be CUDA tensors, got ", depths.device());
  TORCH_CHECK(d.C <= kMaxC && d.Hd <= kMaxHidden && d.O - 1 <= kMaxD, "render (cuda): this kernel takes C <= ", kMaxC,
              ", hidden <= ", kMaxHidden, ", D <= ", kMaxD, "; got C=", d.C, ", hidden=", d.Hd, ", D=", d.O - 1,
              " (use backend='triton' or 'torch')");
}

std::vector<at::Tensor> channels_last(at::TensorList levels) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& lv : levels) out.push_back(lv.permute({0, 1, 3, 4, 2}).contiguous());
  return out;
}

template <typename scalar_t, typename acc_t>
RenderArgs<scalar_t, acc_t> make_args(const Dims& d, const std::vector<at::Tensor>& cl, const Inputs& in,
                                      bool with_target, const std::vector<at::Tensor>& dec, const RenderParams& p) {
  RenderArgs<scalar_t, acc_t> c = args_for<scalar_t, acc_t>(d, p);
  c.pv.levels = static_cast<int>(cl.size());
  c.pv.C = static_cast<int>(d.C);
  for (size_t l = 0; l < cl.size(); ++l) {
    c.pv.data[l] = cl[l].const_data_ptr<scalar_t>();
    c.pv.H[l] = static_cast<int>(cl[l].size(2));
    c.pv.W[l] = static_cast<int>(cl[l].size(3));
    c.pv.batch_stride[l] = cl[l].stride(0);
  }
  c.ro = in.rays_o.const_data_ptr<scalar_t>();
  c.rd = in.rays_d.const_data_ptr<scalar_t>();
  c.dz = in.depths.const_data_ptr<scalar_t>();
  c.target = with_target && in.target.has_value() ? in.target->const_data_ptr<scalar_t>() : nullptr;
  c.w1 = dec[0].const_data_ptr<acc_t>();
  c.w1t = dec[1].const_data_ptr<acc_t>();
  c.b1 = dec[2].const_data_ptr<acc_t>();
  c.w2 = dec[3].const_data_ptr<acc_t>();
  c.b2 = dec[4].const_data_ptr<acc_t>();
  return c;
}

// w1, w1^T, b1, w2, b2 in the accumulation type, contiguous.
std::vector<at::Tensor> decoder_in(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                   const at::Tensor& b2, at::ScalarType acc) {
  const at::Tensor w1a = w1.to(acc).contiguous();
  return {w1a, w1a.t().contiguous(), b1.to(acc).contiguous(), w2.to(acc).contiguous(), b2.to(acc).contiguous()};
}

}  // namespace

void fwd_cuda(const Dims& d, const Inputs& in, const RenderParams& p, Outputs& out) {
  check_cuda_sizes(d, in.depths);
  const c10::cuda::CUDAGuard guard(in.depths.device());
  const int64_t n = d.B * d.R;
  if (n == 0) return;
  const std::vector<at::Tensor> cl = channels_last(in.levels);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.depths.scalar_type(), "render_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<at::Tensor> dec = decoder_in(in.w1, in.b1, in.w2, in.b2, c10::CppTypeToScalarType<acc_t>::value);
    // The forward ignores the target: it only scales gradients.
    RenderArgs<scalar_t, acc_t> c = make_args<scalar_t, acc_t>(d, cl, in, false, dec, p);
    set_outputs(c, out);
    with_sizes<scalar_t, acc_t>(d, [&](auto kc, auto khd, auto ko) {
      render_fwd_kernel<scalar_t, acc_t, decltype(kc)::value, decltype(khd)::value, decltype(ko)::value>
          <<<blocks_for(n), kThreads, 0, stream>>>(c, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void bwd_cuda(const Dims& d, const Inputs& in, const OutputGrads& g, const Outputs& saved, const RenderParams& p,
              Grads& grads) {
  check_cuda_sizes(d, in.depths);
  const c10::cuda::CUDAGuard guard(in.depths.device());
  const at::ScalarType acc = at::toOpMathType(in.depths.scalar_type());
  const auto acc_opts = in.depths.options().dtype(acc);
  const int64_t n = d.B * d.R;
  // Channels-last plane-gradient buffers (one per level) and the decoder gradients, in acc type.
  std::vector<at::Tensor> gcl;
  for (const at::Tensor& lv : in.levels) gcl.push_back(at::zeros({d.B, 3, lv.size(3), lv.size(4), d.C}, acc_opts));
  at::Tensor gw1 = at::zeros({d.Hd, d.C}, acc_opts), gb1 = at::zeros({d.Hd}, acc_opts);
  at::Tensor gw2 = at::zeros({d.O, d.Hd}, acc_opts), gb2 = at::zeros({d.O}, acc_opts);
  if (n > 0) {
    const std::vector<at::Tensor> cl = channels_last(in.levels);
    const int64_t rowlen = d.C + 2 * d.Hd + d.O;
    const int64_t tile = std::max<int64_t>(
        1, std::min<int64_t>(n, kRowsBudget / (d.S * rowlen * static_cast<int64_t>(c10::elementSize(acc)))));
    at::Tensor rows = at::empty({tile * d.S, rowlen}, acc_opts);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.depths.scalar_type(), "render_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const std::vector<at::Tensor> dec = decoder_in(in.w1, in.b1, in.w2, in.b2, acc);
      RenderArgs<scalar_t, acc_t> c = make_args<scalar_t, acc_t>(d, cl, in, true, dec, p);
      set_output_grads(c, g, saved);
      PyramidView<acc_t> gv{};
      gv.levels = static_cast<int>(gcl.size());
      gv.C = static_cast<int>(d.C);
      for (size_t l = 0; l < gcl.size(); ++l) {
        gv.data[l] = gcl[l].mutable_data_ptr<acc_t>();
        gv.H[l] = static_cast<int>(gcl[l].size(2));
        gv.W[l] = static_cast<int>(gcl[l].size(3));
        gv.batch_stride[l] = gcl[l].stride(0);
      }
      for (int64_t ray0 = 0; ray0 < n; ray0 += tile) {
        const int64_t nt = std::min(tile, n - ray0);
        with_sizes<scalar_t, acc_t>(d, [&](auto kc, auto khd, auto ko) {
          render_bwd_kernel<scalar_t, acc_t, decltype(kc)::value, decltype(khd)::value, decltype(ko)::value>
              <<<blocks_for(nt), kThreads, 0, stream>>>(c, gv, ray0, nt, rows.mutable_data_ptr<acc_t>(), rowlen);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        // Weight gradients of the tile: sums over its samples of outer products, as GEMMs on the rows.
        const at::Tensor x = rows.narrow(0, 0, nt * d.S);
        const at::Tensor f = x.narrow(1, 0, d.C), h = x.narrow(1, d.C, d.Hd);
        const at::Tensor ga = x.narrow(1, d.C + d.Hd, d.Hd), go = x.narrow(1, d.C + 2 * d.Hd, d.O);
        gw1.addmm_(ga.t(), f);
        gb1.add_(ga.sum(0));
        gw2.addmm_(go.t(), h);
        gb2.add_(go.sum(0));
      }
    });
  }
  for (size_t l = 0; l < gcl.size(); ++l) grads.levels[l].copy_(gcl[l].permute({0, 1, 4, 2, 3}));
  grads.w1.copy_(gw1);
  grads.b1.copy_(gb1);
  grads.w2.copy_(gw2);
  grads.b2.copy_(gb2);
}

}  // namespace render
}  // namespace g3dr
