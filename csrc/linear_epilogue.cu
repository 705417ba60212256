// Linear + gated residual on Hopper: a CUTLASS 3 warp-specialized TMA GEMM (wgmma) whose epilogue is a
// visitor tree, D = C + gate * (acc + bias). See linear_epilogue.cuh for the contract.
//
// The GEMM is batched over l (the sample) so that the gate, which differs per sample, is a per-column
// broadcast of one row per batch (Sm90RowBroadcast with a batch stride); the weight is shared (batch stride 0).
// CUTLASS's device-side asserts are calls that wgmma pipelines cannot cross: with them, ptxas serializes every
// wgmma of the mainloop (warning C7510). This translation unit is built without them.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "linear_epilogue.cuh"

#include <mutex>

#if __has_include(<cutlass/gemm/collective/collective_builder.hpp>)
#define OPENVID_LINEAR_HAVE_CUTLASS 1
#endif

#ifdef OPENVID_LINEAR_HAVE_CUTLASS

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

namespace openvid {
namespace linear_detail {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

template <typename Element, class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule>
struct GatedResidualGemm {
  using Accumulator = float;
  using Compute = float;
  static constexpr int kAlignment = 8;  // elements per 16 bytes
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // Row vectors over the N output features: the gate has one per batch l, the bias one for all.
  using RowVector = fusion::Sm90RowBroadcast<0, TileShape, Element, Compute, Stride<_0, _1, int64_t>, kAlignment>;
  using Biased = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Compute, Compute, kRound>,
                                 fusion::Sm90AccFetch, RowVector>;
  // gate * (acc + bias) + C
  using Epilogue = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Element, Compute, kRound>,
                                   RowVector, Biased, fusion::Sm90SrcFetch<Element>>;

  using Layout = cutlass::layout::RowMajor;           // input, residual, out: [M, K] / [M, N] per batch
  using WeightLayout = cutlass::layout::ColumnMajor;  // B = weight^T, i.e. nn.Linear's [N, K] row-major

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Compute, Element, Layout, kAlignment, Element,
      Layout, kAlignment, EpilogueSchedule, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, Layout, kAlignment, Element, WeightLayout,
      kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const LinearGatedResidualParams& p, int sm_count, int device) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    const auto* input = static_cast<const Element*>(p.input);
    const auto* weight = static_cast<const Element*>(p.weight);
    typename Kernel::EpilogueArguments epilogue{
        {
            {static_cast<const Element*>(p.gate), Element(1), {_0{}, _1{}, p.gate_stride_l}},  // gate or 1
            {{}, {static_cast<const Element*>(p.bias), Element(0), {_0{}, _1{}, int64_t(0)}}, {}},  // acc + bias
            {},                                                                                 // C
            {},                                                                                 // fma
        },
        static_cast<const Element*>(p.residual),
        StrideC{p.residual_stride_m, _1{}, p.residual_stride_l},
        static_cast<Element*>(p.out),
        StrideD{p.out_stride_m, _1{}, p.out_stride_l},
    };
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = device;
    hw_info.sm_count = sm_count;
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {int(p.M), int(p.N), int(p.K), int(p.L)},
        {input, StrideA{p.input_stride_m, _1{}, p.input_stride_l}, weight, StrideB{p.K, _1{}, int64_t(0)}},
        epilogue,
        hw_info,
    };
  }
};

// 128 x 128 output tiles (1152 = 9 x 128 features) in the ping-pong schedule: two consumer warpgroups take
// alternate tiles, so one's epilogue (reading the residual, writing the output) overlaps the other's
// mainloop. No clusters. Chosen on an H200 (BENCHMARKS.md): at 32768 x 1152 x 1152 it ran 129.5 us against
// 135.3 us with clusters of two, 141-160 us with 128 x 192, 128 x 256 or 256 x 128 tiles or the cooperative
// schedule, and cuBLAS's plain linear 125.2 us.
template <typename Element>
using Config = GatedResidualGemm<Element, Shape<_128, _128, _64>, Shape<_1, _1, _1>,
                                 cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                 cutlass::epilogue::TmaWarpSpecialized>;

int sm_count(int device) {
  static std::mutex mutex;
  static int counts[64] = {};
  std::lock_guard<std::mutex> lock(mutex);
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (counts[device] == 0) counts[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return counts[device];
}

template <typename Element>
size_t workspace_bytes(const LinearGatedResidualParams& p, int device) {
  using G = Config<Element>;
  return G::Gemm::get_workspace_size(G::arguments(p, sm_count(device), device));
}

template <typename Element>
cudaError_t launch(const LinearGatedResidualParams& p, void* workspace, int device, cudaStream_t stream) {
  using G = Config<Element>;
  auto args = G::arguments(p, sm_count(device), device);
  typename G::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    cudaError_t error = cudaGetLastError();
    return error == cudaSuccess ? cudaErrorLaunchFailure : error;
  }
  return cudaGetLastError();
}

}  // namespace linear_detail
}  // namespace openvid

#endif  // OPENVID_LINEAR_HAVE_CUTLASS

namespace openvid {

namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

bool device_is_sm90(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

}  // namespace

bool linear_gated_residual_supported(const LinearGatedResidualParams& p, int device) {
#ifndef OPENVID_LINEAR_HAVE_CUTLASS
  (void)p;
  (void)device;
  return false;
#else
  constexpr int64_t kMax = int64_t(1) << 31;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  for (int64_t extent : {p.L, p.M, p.N, p.K})
    if (extent < 1 || extent >= kMax) return false;
  if (p.N % 8 || p.K % 8) return false;
  for (int64_t stride : {p.input_stride_l, p.input_stride_m, p.gate_stride_l, p.residual_stride_l,
                         p.residual_stride_m, p.out_stride_l, p.out_stride_m})
    if (stride < 0 || stride % 8) return false;
  for (const void* ptr : {p.input, p.weight, p.residual, static_cast<const void*>(p.out)})
    if (ptr == nullptr || !aligned16(ptr)) return false;
  for (const void* optional : {p.bias, p.gate})
    if (optional != nullptr && !aligned16(optional)) return false;
  return device_is_sm90(device);
#endif
}

size_t linear_gated_residual_workspace_bytes(const LinearGatedResidualParams& p, int device) {
#ifdef OPENVID_LINEAR_HAVE_CUTLASS
  if (linear_gated_residual_supported(p, device)) {
    return p.dtype == DType::kBFloat16 ? linear_detail::workspace_bytes<cutlass::bfloat16_t>(p, device)
                                       : linear_detail::workspace_bytes<cutlass::half_t>(p, device);
  }
#else
  (void)p;
  (void)device;
#endif
  return 0;
}

cudaError_t linear_gated_residual(const LinearGatedResidualParams& p, void* workspace, int device,
                                  cudaStream_t stream) {
#ifndef OPENVID_LINEAR_HAVE_CUTLASS
  (void)p;
  (void)workspace;
  (void)device;
  (void)stream;
  return cudaErrorInvalidValue;
#else
  if (!linear_gated_residual_supported(p, device)) return cudaErrorInvalidValue;
  return p.dtype == DType::kBFloat16 ? linear_detail::launch<cutlass::bfloat16_t>(p, workspace, device, stream)
                                     : linear_detail::launch<cutlass::half_t>(p, workspace, device, stream);
#endif
}

}  // namespace openvid
