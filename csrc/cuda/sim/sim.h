// CPU SIMT simulator: the header shim that lets CUDA kernel bodies (csrc/cuda/kernels/*.cuh)
// compile with g++ -DBI_CUDA_SIM and run on the CPU. Included through csrc/cuda/intrinsics.cuh.
//
// Execution model
//   * sim::launch(grid, block, kernel, args...) runs the blocks of the grid one after another
//     (x fastest, then y, z). The threads of a block are fibers (own stack each, cooperative
//     switching on one OS thread): a fiber runs until it reaches a barrier (__syncthreads, a warp
//     shuffle / vote / __syncwarp) or returns, then the next runnable fiber runs. The schedule is
//     deterministic; set_schedule(kReverse) runs the fibers in the opposite order, so a missing
//     barrier shows up as a difference between the two schedules.
//   * threadIdx / blockIdx / blockDim / gridDim are the current fiber's values (macros).
//   * __shared__ is `static`: one instance per kernel instantiation, shared by the fibers of the
//     block that runs (launches are serialised by a process-wide lock). Dynamic shared memory
//     (launch_with_smem, bi::cuda::dynamic_smem<T>()) is a per-launch buffer, filled with 0xCD
//     before each block (uninitialised reads show up as garbage, not zeros).
//   * Warps: linear thread id / 32. A warp operation completes when every live lane of the warp
//     has reached a warp operation; the lanes must all be at the same kind of operation
//     (shuffle / vote / warp sync), else the launch fails ("warp divergence"). If no fiber can
//     run while some wait (e.g. a __syncthreads that some threads skipped or left by returning,
//     a shuffle inside a lane-dependent branch) the launch fails with a deadlock error naming
//     the counts. A launch error is a C++ exception (std::runtime_error) from sim::launch.
//   * fp32: one IEEE operation per _rn wrapper (compile with -ffp-contract=off); half / bf16
//     conversions are cuda_fp16.h / cuda_bf16.h's host implementations.
//   * Not modelled: memory-ordering effects beyond barriers (fibers see each other's writes at
//     once), atomics, clusters, warp-specialised or partially-masked warp ops, timing.
#pragma once

#ifndef BI_CUDA_SIM
#error "csrc/cuda/sim/sim.h is the simulator shim: compile with -DBI_CUDA_SIM"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

// CUDA keywords under g++ (crt/host_defines.h defines __host__/__device__/__global__ as nothing
// and __forceinline__ / __align__ as GNU attributes).
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif

namespace bi {
namespace cuda {
namespace sim {

struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int linear;     // thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z)
  int lane;       // linear % 32
  int warp;       // linear / 32
  int warp_size;  // 32, or fewer for the last warp of a block whose size is not a multiple of 32
};

// The running fiber's context (valid only inside a launch).
extern thread_local ThreadCtx* tl_ctx;
inline ThreadCtx& ctx() { return *tl_ctx; }
inline int lane() { return tl_ctx->lane; }
inline unsigned warp_lane_mask() {
  return tl_ctx->warp_size == 32 ? 0xffffffffu : ((1u << tl_ctx->warp_size) - 1u);
}

enum WarpOp : int { kWarpShfl = 1, kWarpVote = 2, kWarpSync = 3 };

// __syncthreads(): returns when every thread of the block has arrived.
void block_barrier();
// Deposits this lane's 64-bit payload, waits for every lane of the warp, returns the warp's 32
// payloads (lanes beyond warp_size read 0). Valid until this lane's next-but-one warp op.
const uint64_t* warp_exchange(uint64_t mine, WarpOp op);
// The block's dynamic shared memory (launch_with_smem), nullptr when none was requested.
unsigned char* dynamic_smem_ptr();

enum Schedule : int { kForward = 0, kReverse = 1 };
void set_schedule(Schedule s);
Schedule schedule();

// Runs body() once per thread of every block of the grid (the runtime behind launch()).
void run_grid(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body);

// Statistics of the last launch on this OS thread (for tests / benchmarks of the simulator).
struct LaunchStats {
  uint64_t blocks = 0, threads = 0, switches = 0;
};
LaunchStats last_launch_stats();

// kernel<<<grid, block, smem>>>(args...): the arguments are converted to the kernel's parameter
// types once (as a launch copies them); each thread gets its own copy.
template <typename... KArgs, typename... Args>
void launch_with_smem(dim3 grid, dim3 block, size_t smem_bytes, void (*kernel)(KArgs...), Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "wrong number of kernel arguments");
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  run_grid(grid, block, smem_bytes, [&]() { std::apply(kernel, params); });
}

template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(KArgs...), Args&&... args) {
  launch_with_smem(grid, block, 0, kernel, std::forward<Args>(args)...);
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi

#define threadIdx (::bi::cuda::sim::ctx().thread_idx)
#define blockIdx (::bi::cuda::sim::ctx().block_idx)
#define blockDim (::bi::cuda::sim::ctx().block_dim)
#define gridDim (::bi::cuda::sim::ctx().grid_dim)
