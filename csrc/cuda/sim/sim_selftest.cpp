// Small kernels that check the simulator itself (see sim_ops.h, run_selftest): that a missing
// barrier is exposed by the two schedules, that misuse of barriers / warp operations raises, and
// that votes and shuffles return what the device returns.
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../intrinsics.cuh"
#include "sim_ops.h"

namespace bi {
namespace cuda {
namespace sim {
namespace {

float g_buf[1024];  // "shared memory" of the race kernels, cleared by the host before each launch

__global__ void neighbour_kernel(float* out, bool sync) {
  const int tid = int(threadIdx.x), n = int(blockDim.x);
  g_buf[tid] = float(tid + 1);
  if (sync) block_sync();
  out[tid] = g_buf[(tid + 1) % n];
}

__global__ void divergent_shfl_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = warp_shfl_xor(v, 1);  // lanes 16..31 never join
  out[threadIdx.x] = v;
}

__global__ void mixed_warp_ops_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = warp_shfl_xor(v, 1);
  else warp_sync();
  out[threadIdx.x] = v;
}

__global__ void partial_sync_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) block_sync();
  out[threadIdx.x] = 1.0f;
}

__global__ void votes_kernel(float* out) {
  const int lane = int(threadIdx.x) % 32;
  const unsigned b = warp_ballot(lane % 3 == 0);
  const bool any = warp_any(lane == 7), all = warp_all(lane < 32), none = warp_any(false);
  const float up = warp_shfl(float(lane * 10), (lane + 1) % 32);
  const float x = warp_shfl_xor(float(lane), 5);
  if (lane == 5) {
    out[0] = float(b & 0xffffu);
    out[1] = float(b >> 16);
    out[2] = float(any) + 2.0f * float(all) + 4.0f * float(none);
    out[3] = up;
    out[4] = x;
  }
}

}  // namespace

double run_selftest(const char* name_c, int threads) {
  const std::string name(name_c);
  std::vector<float> out(size_t(threads > 0 ? threads : 1) + 8, 0.0f);
  if (name == "missing_sync" || name == "with_sync") {
    std::memset(g_buf, 0, sizeof g_buf);
    launch(dim3(1), dim3(unsigned(threads)), &neighbour_kernel, out.data(), name == "with_sync");
    double s = 0;
    for (int i = 0; i < threads; ++i) s += out[size_t(i)];
    return s;
  }
  if (name == "divergent_shfl") launch(dim3(1), dim3(unsigned(threads)), &divergent_shfl_kernel, out.data());
  else if (name == "mixed_warp_ops") launch(dim3(1), dim3(unsigned(threads)), &mixed_warp_ops_kernel, out.data());
  else if (name == "partial_sync") launch(dim3(1), dim3(unsigned(threads)), &partial_sync_kernel, out.data());
  else if (name == "votes") {
    launch(dim3(1), dim3(unsigned(threads)), &votes_kernel, out.data());
    // ballot low/high halves, flags, shfl from lane 6, shfl_xor partner of lane 5 (= 0)
    return double(out[0]) + 65536.0 * double(out[1]) + 1e10 * double(out[2]) + 1e12 * double(out[3]) +
           1e15 * double(out[4]);
  } else throw std::invalid_argument("cuda sim: unknown self-test " + name);
  return 0.0;
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
