// CPU SIMT simulator runtime: fibers, the block scheduler, barriers and warp exchanges.
// See sim.h for the execution model. Framework-free (no torch).
#include "sim.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

// x86-64: a hand-written context switch; elsewhere (or with -DBI_CUDA_SIM_UCONTEXT) ucontext.
#if defined(__x86_64__) && !defined(BI_CUDA_SIM_UCONTEXT)
#define BI_SIM_ASM_SWITCH 1
#else
#define BI_SIM_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace bi {
namespace cuda {
namespace sim {

thread_local ThreadCtx* tl_ctx = nullptr;

namespace {

// ------------------------------------------------------------------------------------------
// Context switching. x86-64: a minimal switch of the callee-saved registers (plus MXCSR and the
// x87 control word); elsewhere ucontext (slower: one syscall per switch).
#if BI_SIM_ASM_SWITCH
extern "C" void bi_sim_switch(void** save_sp, void* to_sp);
extern "C" void bi_sim_trampoline();
asm(R"(
.text
.p2align 4
.globl bi_sim_switch
.hidden bi_sim_switch
.type bi_sim_switch,@function
bi_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size bi_sim_switch,.-bi_sim_switch
.p2align 4
.globl bi_sim_trampoline
.hidden bi_sim_trampoline
.type bi_sim_trampoline,@function
bi_sim_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
.size bi_sim_trampoline,.-bi_sim_trampoline
)");
#endif

struct Fiber;
void fiber_main(Fiber* f);

constexpr size_t kStackBytes = 256 * 1024;

struct Stack {
  void* base = nullptr;  // mapping, lowest page is a guard page
  size_t size = 0;
  Stack() {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    size = kStackBytes + page;
    base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("cuda sim: cannot map a fiber stack");
    mprotect(base, page, PROT_NONE);
  }
  ~Stack() { munmap(base, size); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top() const { return static_cast<char*>(base) + size; }
};

enum class State { kReady, kWaitBlock, kWaitWarp, kDone };

struct Fiber {
  ThreadCtx ctx;
  State state = State::kReady;
  std::unique_ptr<Stack> stack;
#if BI_SIM_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct Warp {
  int arrived = 0;
  int size = 0;
  WarpOp op = kWarpSync;
  bool mixed = false;
  int buf = 0;
  uint64_t slots[2][32] = {};
};

// One launch in progress on this OS thread.
struct Launch {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber>* fibers = nullptr;
  int nthreads = 0;
  std::vector<Warp> warps;
  int block_arrived = 0;
  std::deque<int> runq;
  int current = -1;
  std::exception_ptr error;
  std::string failure;  // simulator-detected misuse
  unsigned char* smem = nullptr;
#if BI_SIM_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  LaunchStats stats;
};

thread_local Launch* tl_launch = nullptr;
thread_local LaunchStats tl_last_stats;
std::mutex g_launch_mutex;  // __shared__ statics are process-wide: one launch at a time
Schedule g_schedule = kForward;
std::vector<std::unique_ptr<Stack>> g_stack_pool;  // guarded by g_launch_mutex

void switch_to_scheduler(Fiber& f) {
  Launch& L = *tl_launch;
  L.stats.switches++;
#if BI_SIM_ASM_SWITCH
  bi_sim_switch(&f.sp, L.sched_sp);
#else
  swapcontext(&f.uc, &L.sched_uc);
#endif
}

void resume(Launch& L, int i) {
  Fiber& f = (*L.fibers)[i];
  L.current = i;
  tl_ctx = &f.ctx;
#if BI_SIM_ASM_SWITCH
  bi_sim_switch(&L.sched_sp, f.sp);
#else
  swapcontext(&L.sched_uc, &f.uc);
#endif
  tl_ctx = nullptr;
  L.current = -1;
}

void fiber_main(Fiber* f) {
  Launch& L = *tl_launch;
  try {
    (*L.body)();
  } catch (...) {
    if (!L.error) L.error = std::current_exception();
  }
  f->state = State::kDone;
  switch_to_scheduler(*f);
  std::abort();  // never resumed
}

#if !BI_SIM_ASM_SWITCH
void fiber_main_uc(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

void start_fiber(Fiber& f) {
#if BI_SIM_ASM_SWITCH
  // Initial frame, read by bi_sim_switch: [mxcsr|fpucw] r15 r14 r13 r12 rbx rbp <ret>, with the
  // stack 16-byte aligned after `ret` (the trampoline then calls fiber_main).
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack->top()) & ~uintptr_t(15);
  uintptr_t s = top - 64;  // aligned: value of rsp after the trampoline's address is popped
  uint64_t* sp = reinterpret_cast<uint64_t*>(s - 64);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memset(sp, 0, 64);
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);         // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);                  // r12
  sp[7] = reinterpret_cast<uint64_t>(&bi_sim_trampoline);  // return address
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack->base;
  f.uc.uc_stack.ss_size = f.stack->size;
  f.uc.uc_link = nullptr;
  uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_main_uc), 2, unsigned(p), unsigned(p >> 32));
#endif
}

void enqueue_in_order(Launch& L, std::vector<int>& ids) {
  if (g_schedule == kReverse)
    for (auto it = ids.rbegin(); it != ids.rend(); ++it) L.runq.push_back(*it);
  else
    for (int i : ids) L.runq.push_back(i);
}

[[noreturn]] void fail_in_fiber(const std::string& msg) {
  throw std::runtime_error("cuda sim: " + msg);
}

std::string describe_deadlock(const Launch& L) {
  int wb = 0, ww = 0, done = 0;
  for (const Fiber& f : *L.fibers) {
    wb += f.state == State::kWaitBlock;
    ww += f.state == State::kWaitWarp;
    done += f.state == State::kDone;
  }
  const ThreadCtx& c = (*L.fibers)[0].ctx;
  return "deadlock in block (" + std::to_string(c.block_idx.x) + "," + std::to_string(c.block_idx.y) + "," +
         std::to_string(c.block_idx.z) + "): " + std::to_string(wb) + " threads wait at __syncthreads, " +
         std::to_string(ww) + " at a warp operation, " + std::to_string(done) +
         " have returned (barriers and warp operations must be reached by every thread / lane)";
}

}  // namespace

// ------------------------------------------------------------------------------------------
void block_barrier() {
  Launch* Lp = tl_launch;
  if (!Lp || Lp->current < 0) fail_in_fiber("__syncthreads outside a kernel launch");
  Launch& L = *Lp;
  Fiber& f = (*L.fibers)[L.current];
  if (++L.block_arrived == L.nthreads) {
    L.block_arrived = 0;
    std::vector<int> ids;
    ids.reserve(L.nthreads);
    for (int i = 0; i < L.nthreads; ++i) {
      Fiber& g = (*L.fibers)[i];
      if (g.state == State::kWaitBlock || i == L.current) {
        g.state = State::kReady;
        ids.push_back(i);
      }
    }
    enqueue_in_order(L, ids);
  } else {
    f.state = State::kWaitBlock;
  }
  switch_to_scheduler(f);
}

const uint64_t* warp_exchange(uint64_t mine, WarpOp op) {
  Launch* Lp = tl_launch;
  if (!Lp || Lp->current < 0) fail_in_fiber("warp operation outside a kernel launch");
  Launch& L = *Lp;
  Fiber& f = (*L.fibers)[L.current];
  Warp& w = L.warps[f.ctx.warp];
  const int buf = w.buf;
  if (w.arrived == 0) {
    w.op = op;
    w.mixed = false;
  } else if (w.op != op) {
    w.mixed = true;
  }
  w.slots[buf][f.ctx.lane] = mine;
  if (++w.arrived == w.size) {
    w.arrived = 0;
    w.buf ^= 1;
    if (w.mixed)
      fail_in_fiber("warp divergence: the lanes of warp " + std::to_string(f.ctx.warp) +
                    " reached different warp operations (shuffle / vote / syncwarp)");
    std::vector<int> ids;
    const int first = f.ctx.warp * 32;
    for (int i = first; i < first + w.size; ++i) {
      Fiber& g = (*L.fibers)[i];
      if (g.state == State::kWaitWarp || i == L.current) {
        g.state = State::kReady;
        ids.push_back(i);
      }
    }
    enqueue_in_order(L, ids);
  } else {
    f.state = State::kWaitWarp;
  }
  switch_to_scheduler(f);
  return w.slots[buf];
}

unsigned char* dynamic_smem_ptr() { return tl_launch ? tl_launch->smem : nullptr; }

void set_schedule(Schedule s) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_schedule = s;
}
Schedule schedule() { return g_schedule; }

LaunchStats last_launch_stats() { return tl_last_stats; }

void run_grid(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body) {
  const uint64_t nthreads64 = uint64_t(block.x) * block.y * block.z;
  if (nthreads64 == 0 || nthreads64 > 1024)
    throw std::runtime_error("cuda sim: invalid block size " + std::to_string(nthreads64) + " (1..1024 threads)");
  if (grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("cuda sim: grid.y / grid.z above 65535");
  if (tl_launch) throw std::runtime_error("cuda sim: a kernel launched from inside a kernel");
  const int nthreads = int(nthreads64);
  std::lock_guard<std::mutex> lock(g_launch_mutex);

  while (g_stack_pool.size() < size_t(nthreads)) g_stack_pool.push_back(std::make_unique<Stack>());
  std::vector<Fiber> fibers(nthreads);
  for (int i = 0; i < nthreads; ++i) fibers[i].stack = std::move(g_stack_pool[i]);
  std::vector<unsigned char> smem(dynamic_smem_bytes + 16);
  unsigned char* smem_aligned =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 15) & ~uintptr_t(15));

  Launch L;
  L.body = &body;
  L.fibers = &fibers;
  L.nthreads = nthreads;
  L.smem = dynamic_smem_bytes ? smem_aligned : nullptr;
  const int nwarps = (nthreads + 31) / 32;
  L.warps.resize(nwarps);
  for (int w = 0; w < nwarps; ++w) L.warps[w].size = std::min(32, nthreads - 32 * w);
  tl_launch = &L;

  auto give_back = [&]() {
    for (int i = 0; i < nthreads; ++i) g_stack_pool[i] = std::move(fibers[i].stack);
    tl_launch = nullptr;
    tl_ctx = nullptr;
    tl_last_stats = L.stats;
  };

  try {
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          if (dynamic_smem_bytes) std::memset(smem_aligned, 0xCD, dynamic_smem_bytes);
          for (Warp& w : L.warps) { w.arrived = 0; w.buf = 0; }
          L.block_arrived = 0;
          L.runq.clear();
          std::vector<int> ids(nthreads);
          for (int i = 0; i < nthreads; ++i) {
            Fiber& f = fibers[i];
            ThreadCtx& c = f.ctx;
            c.thread_idx = uint3{unsigned(i) % block.x, (unsigned(i) / block.x) % block.y,
                                 unsigned(i) / (block.x * block.y)};
            c.block_idx = uint3{bx, by, bz};
            c.block_dim = block;
            c.grid_dim = grid;
            c.linear = i;
            c.lane = i % 32;
            c.warp = i / 32;
            c.warp_size = L.warps[c.warp].size;
            f.state = State::kReady;
            start_fiber(f);
            ids[i] = i;
          }
          enqueue_in_order(L, ids);
          while (!L.runq.empty()) {
            const int i = L.runq.front();
            L.runq.pop_front();
            resume(L, i);
            if (L.error) std::rethrow_exception(L.error);
          }
          for (const Fiber& f : fibers)
            if (f.state != State::kDone) throw std::runtime_error("cuda sim: " + describe_deadlock(L));
          L.stats.blocks++;
          L.stats.threads += uint64_t(nthreads);
        }
  } catch (...) {
    // Fibers still suspended are abandoned (their stacks are reused; kernels keep no resources).
    give_back();
    throw;
  }
  give_back();
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
