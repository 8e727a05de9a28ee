// A CPU emulator for the CUDA C++ kernels of csrc/cuda/, for tests on machines without a
// GPU (tests/test_cuda.py with VOS_CUDA_TESTS_EMULATED=1; tests/test_cuda_emu.py tests the
// emulator itself). Not a general CUDA implementation: it provides what
// those kernels use, with the semantics the CUDA programming guide and the PTX ISA give,
// and reports what a GPU would leave undefined instead of guessing.
//
// Execution model:
//   - a launch runs its blocks one after another; the threads of a block are fibers
//     (ucontext) on one OS thread, switched only at __syncthreads, warp collectives
//     (__shfl*_sync, __syncwarp, __any_sync, __match_any_sync, mma.sync) and
//     cp.async.wait_group. Between those points a thread runs alone, so a data race does
//     not change a result (the ThreadSanitizer build below reports it), but a missing
//     barrier usually does: the order in which threads run between barriers is
//     forward, reverse or shuffled (VOS_EMU_ORDER=forward|reverse|shuffle[:seed]), and
//     the tests run each case in more than one order;
//   - __syncthreads waits for every thread of the block that has not exited; a warp
//     collective waits for the lanes its mask names; a mask naming an exited lane, lanes
//     disagreeing on the mask, or every thread waiting with no barrier complete (a
//     deadlock) fails the launch with a message instead of hanging;
//   - shared memory, dynamic and static (__shared__ variables), is allocated per block and
//     filled with 0xff bytes (NaN as float, -1 as int), so a read of shared memory nothing
//     wrote shows;
//   - cp.async copies are queued per thread and done at the cp.async.wait_group that
//     retires their group (a read of the destination before that sees the fill);
//   - mma.sync.m16n8k8 TF32: operands truncated to TF32 (the low 13 bits ignored), exact
//     products, fp32 sums in k order; cvt.rna.tf32.f32 rounds to nearest, ties away;
//   - launch checks of the hardware: block of 1..1024 threads, grid y/z <= 65535, a grid
//     of zero blocks, dynamic shared memory over 48 KiB without the opt-in attribute or
//     over the sm_90 limit (227 KiB) fail as cudaErrorInvalidConfiguration /
//     cudaErrorInvalidValue would.
// A failed launch returns cudaErrorLaunchFailure from cudaGetLastError, and
// cudaGetErrorString gives the emulator's message.
//
// Data races (built with -fsanitize=thread, VOS_EMU_SANITIZE=thread in emu_build.py): each
// thread of a block is a ThreadSanitizer fiber, and the emulator tells ThreadSanitizer the
// orderings CUDA guarantees and no others: __syncthreads (and __syncthreads_count) orders
// the block's threads, __syncwarp the lanes it names, every thread of a launch follows the
// host code before it, and the host code after a launch follows all of its threads. Nothing
// orders the blocks of one launch with each other, though the emulator runs them one after
// another: each block gets new barrier sync objects, and consecutive blocks different
// fibers (VOS_EMU_RACE_SETS sets of fibers, default 4, taken in turn; blocks k and k + 4
// of a launch share fibers, which orders them, so a race between just those two goes
// unreported; a report names a fiber by the last block it ran). One leniency: a thread
// that has exited counts as having arrived at every later barrier of its block (the barrier
// waits only for the others). Warp shuffles, ballots, match and mma exchange registers only
// and order no memory; atomics are relaxed. ThreadSanitizer then reports two accesses of a
// launch's threads to one address, shared or global, at least one a write and not both
// atomic, with no such ordering between them: what compute-sanitizer racecheck reports for
// shared memory on a GPU, plus global memory within a block and between the blocks of a
// launch (which racecheck does not check). It keeps the last 4 accesses per 8 bytes, so a
// race among many accesses to one word may go unreported. The emulator's
// own bookkeeping runs with ThreadSanitizer ignoring it (Quiet below); a cp.async copy
// counts as a write of the thread that issued it, made at its wait_group.
#pragma once

#include <ucontext.h>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <new>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA keywords ------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// ---- runtime types ------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// device code calls these unqualified, as CUDA's math headers allow
using std::isfinite;
using std::isinf;
using std::isnan;

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline constexpr int warpSize = 32;

namespace vos_emu {

// The device the emulator pretends to be: an H100 SXM (sm_90).
inline constexpr int kSMs = 132;
inline constexpr int kSmemDefault = 48 * 1024;
inline constexpr int kSmemOptin = 232448;
inline constexpr int kSmemPerSM = 233472;
inline constexpr size_t kStackBytes = 256 * 1024;

// ---- ThreadSanitizer hooks (no-ops in a plain build) ---------------------------------------
#if defined(__SANITIZE_THREAD__)
inline constexpr bool kRaceCheck = true;
// ThreadSanitizer ignores the reads and writes of the calling fiber while one is alive: the
// emulator's bookkeeping (barrier counters, warp exchange slots, queues) is not the kernel's.
struct Quiet {
  Quiet() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Quiet() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
  Quiet(const Quiet&) = delete;
  Quiet& operator=(const Quiet&) = delete;
};
inline void hb_release(void* a) { __tsan_release(a); }
inline void hb_acquire(void* a) { __tsan_acquire(a); }
inline void* tsan_current() { return __tsan_get_current_fiber(); }
inline void* tsan_new_fiber() { return __tsan_create_fiber(0); }
inline void tsan_name(void* f, const char* name) { __tsan_set_fiber_name(f, name); }
inline void tsan_destroy(void* f) { __tsan_destroy_fiber(f); }
// Not instrumented: an instrumented function would enter on one fiber's stack and leave on
// the other's.
__attribute__((no_sanitize("thread"))) inline void tsan_switch(void* f) {
  __tsan_switch_to_fiber(f, __tsan_switch_to_fiber_no_sync);
}
#else
inline constexpr bool kRaceCheck = false;
struct Quiet {
  Quiet() {}
  Quiet(const Quiet&) = delete;
  Quiet& operator=(const Quiet&) = delete;
};
inline void hb_release(void*) {}
inline void hb_acquire(void*) {}
inline void* tsan_current() { return nullptr; }
inline void* tsan_new_fiber() { return nullptr; }
inline void tsan_name(void*, const char*) {}
inline void tsan_destroy(void*) {}
inline void tsan_switch(void*) {}
#endif

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes, src_bytes;
};

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  unsigned tid = 0;  // linear thread index in the block
  uint3 idx{0, 0, 0};
  bool done = false;
  const char* waiting = nullptr;  // what it waits on (deadlock report)
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

struct Warp {
  unsigned gen = 0, count = 0, mask = 0;
  char sync[2];  // ThreadSanitizer sync objects of __syncwarp, by generation parity
  unsigned exist = 0, exited = 0;
  uint64_t slot[32];
  uint32_t a[32][4], b[32][2];
  float c[32][4];
};

struct State {
  // the block being run
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t sched;
  int current = -1;
  unsigned live = 0;
  unsigned bar_gen = 0, bar_count = 0;
  int bar_acc = 0, bar_result = 0;
  // ThreadSanitizer: its fiber of the host code; sets of fibers, one per thread index, kept
  // across launches, the k-th block of a launch run by set k % race_sets() (see "Data races"
  // above); the sync objects of __syncthreads (by generation parity; a new allocation for
  // each block, as are the warps' of __syncwarp), and those of a launch's start (host ->
  // every block's threads) and of its threads' exits (threads -> host)
  void* tsan_host = nullptr;
  std::vector<std::vector<void*>> tsan_sets;
  void** tsan_fibers = nullptr;  // the set running the current block
  char* bar_sync = nullptr;
  char launch_start, launch_end;
  uint64_t progress = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  // static __shared__ variables of the block being run (block_shared below)
  struct StaticShared {
    const void* key;
    void* p;
    size_t align;
  };
  std::vector<StaticShared> static_smem;
  size_t static_smem_bytes = 0;
  std::function<void()> body;
  // errors
  bool failed = false;
  std::string message;
  cudaError_t last_error = cudaSuccess;
  std::string error_text;
  std::map<const void*, int> smem_optin;
  std::vector<std::string> log;
};
inline State g;

// Back to the scheduler (the host code's fiber).
inline void yield() {
  tsan_switch(g.tsan_host);
  swapcontext(&g.fibers[g.current].ctx, &g.sched);
}

[[noreturn]] inline void fail(const std::string& what) {
  Quiet q;
  if (g.current < 0) {  // host code: not a kernel's error, an emulator misuse
    std::fprintf(stderr, "vos_emu: %s (outside a kernel)\n", what.c_str());
    std::abort();
  }
  if (!g.failed) {
    g.failed = true;
    char where[160];
    std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z,
                  threadIdx.x, threadIdx.y, threadIdx.z);
    g.message = what + where;
  }
  // a failed block is abandoned: back to the scheduler, never resumed
  yield();
  std::abort();
}

inline Fiber& me() { return g.fibers[g.current]; }
inline unsigned lane_id() { return me().tid & 31u; }
inline Warp& my_warp() { return g.warps[me().tid >> 5]; }

// Wait, yielding, until `ready()`; `what` names the wait in a deadlock report.
template <class F>
inline void wait_until(const char* what, F ready) {
  while (!ready()) {
    me().waiting = what;
    yield();
  }
  me().waiting = nullptr;
}

// ---- block barrier ------------------------------------------------------------------------
inline void release_block_barrier_if_complete() {
  if (g.bar_count > 0 && g.bar_count == g.live) {
    g.bar_count = 0;
    g.bar_result = g.bar_acc;
    g.bar_acc = 0;
    ++g.bar_gen;
    ++g.progress;
  }
}

inline int block_barrier(int pred) {
  Quiet q;
  const unsigned gen = g.bar_gen;
  hb_release(&g.bar_sync[gen & 1]);
  ++g.bar_count;
  g.bar_acc += pred;
  ++g.progress;
  release_block_barrier_if_complete();
  wait_until("__syncthreads", [&] { return g.bar_gen != gen; });
  hb_acquire(&g.bar_sync[gen & 1]);
  return g.bar_result;
}

// ---- warp collectives ---------------------------------------------------------------------
// Waits for the lanes of `mask`; `orders_memory` (__syncwarp) also orders their memory
// accesses before it with those after it, for ThreadSanitizer.
inline void warp_barrier(unsigned mask, const char* what, bool orders_memory = false) {
  Quiet q;
  Warp& w = my_warp();
  const unsigned lane = lane_id();
  if (!((mask >> lane) & 1u)) fail(std::string(what) + ": the calling lane is not in the mask");
  if (mask & ~w.exist) fail(std::string(what) + ": the mask names lanes that do not exist in this block");
  if (w.count == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    char m[96];
    std::snprintf(m, sizeof m, ": lanes disagree on the mask (0x%08x vs 0x%08x)", w.mask, mask);
    fail(std::string(what) + m);
  }
  const unsigned gen = w.gen;
  if (orders_memory) hb_release(&w.sync[gen & 1]);
  ++w.count;
  ++g.progress;
  if (w.count == static_cast<unsigned>(__builtin_popcount(mask))) {
    w.count = 0;
    ++w.gen;
  } else {
    while (w.gen == gen) {
      if (mask & w.exited) fail(std::string(what) + ": the mask names a lane that has exited");
      me().waiting = what;
      yield();
    }
    me().waiting = nullptr;
  }
  if (orders_memory) hb_acquire(&w.sync[gen & 1]);
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp exchange of more than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Every lane of `mask` publishes `v`; returns the value of lane `src` (all-ones bits,
// i.e. NaN or -1, where `src` is not in the mask: undefined on a GPU).
template <class T>
inline T exchange(unsigned mask, T v, unsigned src, const char* what) {
  Quiet q;
  Warp& w = my_warp();
  w.slot[lane_id()] = to_bits(v);
  warp_barrier(mask, what);
  const uint64_t r = ((mask >> src) & 1u) ? w.slot[src] : ~uint64_t(0);
  warp_barrier(mask, what);
  return from_bits<T>(r);
}

// ---- cp.async -----------------------------------------------------------------------------
inline void complete(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
  }
  group.clear();
}

inline unsigned char* shared_address(uint32_t s, int bytes, const char* what) {
  Quiet q;
  if (g.smem == nullptr || s + static_cast<size_t>(bytes) > g.smem_bytes)
    fail(std::string(what) + ": shared address out of the block's dynamic shared memory");
  if (s % bytes != 0) fail(std::string(what) + ": misaligned shared address");
  return g.smem + s;
}

// ---- static shared memory -----------------------------------------------------------------
// `__shared__ T name[N];` (rewritten by emu_translate.py into a call of this) is storage of
// the block, as on a GPU: the block's first thread to reach the declaration allocates it,
// filled with 0xff bytes like the dynamic shared memory (so a read nothing wrote shows), and
// it is freed with the block; `key` tells the declarations apart. Static and dynamic shared
// memory together over the sm_90 limit fail the launch. (cp.async and
// __cvta_generic_to_shared take dynamic shared memory only, all the kernels use.)
template <class T, size_t Align>
inline T& block_shared(const void* key) {
  Quiet q;
  for (const State::StaticShared& s : g.static_smem)
    if (s.key == key) return *static_cast<T*>(s.p);
  g.static_smem_bytes += sizeof(T);
  if (g.static_smem_bytes + g.smem_bytes > static_cast<size_t>(kSmemOptin)) {
    char m[160];
    std::snprintf(m, sizeof m, "shared memory: %zu bytes static + %zu dynamic, over the %d of a block",
                  g.static_smem_bytes, g.smem_bytes, kSmemOptin);
    fail(m);
  }
  constexpr size_t align = std::max({Align, alignof(T), size_t(16)});
  void* p = ::operator new(sizeof(T), std::align_val_t(align));
  std::memset(p, 0xff, sizeof(T));
  g.static_smem.push_back({key, p, align});
  return *static_cast<T*>(p);
}

// ---- launch -------------------------------------------------------------------------------
// The bottom frame of every thread. Not instrumented: it switches ThreadSanitizer to the host
// fiber before it returns, so an instrumented exit here would pop the host's stack.
__attribute__((no_sanitize("thread"))) inline void fiber_entry() {
  hb_acquire(&g.launch_start);
  g.body();
  // an exited thread's accesses are ordered before every later barrier of its block and
  // before the host code after the launch
  hb_release(&g.bar_sync[0]);
  hb_release(&g.bar_sync[1]);
  hb_release(&g.launch_end);
  {
    Quiet q;
    Fiber& f = me();
    f.done = true;
    --g.live;
    g.warps[f.tid >> 5].exited |= 1u << (f.tid & 31u);
    ++g.progress;
    release_block_barrier_if_complete();
  }
  tsan_switch(g.tsan_host);
  // returns to g.sched through uc_link
}

inline std::vector<unsigned> order(unsigned n, const std::string& mode, uint64_t salt) {
  std::vector<unsigned> o(n);
  for (unsigned i = 0; i < n; ++i) o[i] = i;
  if (mode == "reverse") {
    std::reverse(o.begin(), o.end());
  } else if (mode.rfind("shuffle", 0) == 0) {
    uint64_t seed = 0;
    if (mode.size() > 8) seed = std::strtoull(mode.c_str() + 8, nullptr, 10);
    std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull + salt);
    std::shuffle(o.begin(), o.end(), rng);
  }
  return o;
}

inline std::string order_mode() {
  const char* e = std::getenv("VOS_EMU_ORDER");
  return e ? std::string(e) : std::string("forward");
}

inline void set_error(cudaError_t e, const std::string& text) {
  if (g.last_error == cudaSuccess) {
    g.last_error = e;
    g.error_text = text;
  }
}

// The number of fiber sets of the race detector: VOS_EMU_RACE_SETS (2..64, default 4).
inline unsigned race_sets() {
  const char* e = std::getenv("VOS_EMU_RACE_SETS");
  const unsigned long n = e && *e ? std::strtoul(e, nullptr, 10) : 4;
  return static_cast<unsigned>(std::clamp<unsigned long>(n, 2, 64));
}

// Runs one block, the k-th of its launch; false if it failed (g.message says why).
inline bool run_block(unsigned nthreads, size_t smem, const std::string& mode, uint64_t k) {
  const uint64_t salt = k + 1;
  g.fibers.assign(nthreads, Fiber());
  // new allocations for the block's sync objects: freeing the last block's discarded the
  // orderings its threads had released into them, which would otherwise order its accesses
  // before this block's (blocks of a launch are unordered)
  std::vector<Warp>((nthreads + 31) / 32).swap(g.warps);
  g.bar_sync = new char[2];
  for (unsigned t = 0; t < nthreads; ++t) g.warps[t >> 5].exist |= 1u << (t & 31u);
  g.live = nthreads;
  g.bar_gen = g.bar_count = 0;
  g.bar_acc = g.bar_result = 0;
  g.smem_bytes = smem;
  g.smem = smem ? static_cast<unsigned char*>(std::malloc(smem)) : nullptr;
  if (g.smem) std::memset(g.smem, 0xff, smem);
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = g.fibers[t];
    f.tid = t;
    f.idx = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    f.stack = std::malloc(kStackBytes);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  if (kRaceCheck) {
    // a fiber's accesses are ordered by its program order: blocks k and k + race_sets() of a
    // launch share fibers, so a race between them goes unreported. (New fibers for every block
    // would not help: ThreadSanitizer reuses a destroyed fiber's thread id, and every access
    // of its earlier owner then counts as ordered before the new one's.)
    const unsigned sets = race_sets();
    if (g.tsan_sets.size() < sets) g.tsan_sets.resize(sets);
    std::vector<void*>& set = g.tsan_sets[k % sets];
    if (set.size() < nthreads) set.resize(nthreads, nullptr);
    g.tsan_fibers = set.data();
    for (unsigned t = 0; t < nthreads; ++t) {
      if (!g.tsan_fibers[t]) g.tsan_fibers[t] = tsan_new_fiber();
      // reports name the thread: "thread (x,y,z) of block (x,y,z)"
      const uint3 i = g.fibers[t].idx;
      char name[96];
      std::snprintf(name, sizeof name, "thread (%u,%u,%u) of block (%u,%u,%u)", i.x, i.y, i.z, blockIdx.x,
                    blockIdx.y, blockIdx.z);
      tsan_name(g.tsan_fibers[t], name);
    }
  }
  const std::vector<unsigned> o = order(nthreads, mode, salt);
  while (g.live > 0 && !g.failed) {
    const uint64_t before = g.progress;
    for (unsigned i : o) {
      if (g.fibers[i].done) continue;
      g.current = static_cast<int>(i);
      threadIdx = g.fibers[i].idx;
      tsan_switch(kRaceCheck ? g.tsan_fibers[i] : nullptr);
      swapcontext(&g.sched, &g.fibers[i].ctx);
      if (g.failed) break;
    }
    if (!g.failed && g.live > 0 && g.progress == before) {
      std::string m = "deadlock: every thread waits:";
      int shown = 0;
      for (const Fiber& f : g.fibers)
        if (!f.done && shown++ < 8) m += " t" + std::to_string(f.tid) + "@" + (f.waiting ? f.waiting : "?");
      g.failed = true;
      char where[96];
      std::snprintf(where, sizeof where, " (block %u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z);
      g.message = m + where;
    }
  }
  if (kRaceCheck && g.failed) {
    // the threads of a failed block stay suspended mid-kernel: new fibers for their indices
    for (unsigned t = 0; t < nthreads; ++t)
      if (!g.fibers[t].done) {
        tsan_destroy(g.tsan_fibers[t]);
        g.tsan_fibers[t] = nullptr;
      }
  }
  g.tsan_fibers = nullptr;
  delete[] g.bar_sync;
  g.bar_sync = nullptr;
  for (Fiber& f : g.fibers) std::free(f.stack);
  g.fibers.clear();
  g.current = -1;
  std::free(g.smem);
  g.smem = nullptr;
  for (const State::StaticShared& s : g.static_smem) ::operator delete(s.p, std::align_val_t(s.align));
  g.static_smem.clear();
  g.static_smem_bytes = 0;
  return !g.failed;
}

// VOS_EMU_TRACE=FILE appends one line per launch: the launch expression, grid, block,
// dynamic smem, and the kernel's parameter types (which tell apart the instantiations
// launched through a local function pointer).
inline void trace(const char* name, const char* signature, dim3 grid, dim3 block, size_t smem) {
  const char* path = std::getenv("VOS_EMU_TRACE");
  if (!path || !*path) return;
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, "%s\tgrid=%u,%u,%u block=%u,%u,%u smem=%zu\t%s\n", name, grid.x, grid.y, grid.z, block.x,
                 block.y, block.z, smem, signature);
    std::fclose(f);
  }
}

inline void run_grid(const char* name, const char* signature, const void* kernel, dim3 grid, dim3 block,
                     size_t smem, std::function<void()> body) {
  Quiet q;  // the host side of a launch is bookkeeping
  g.tsan_host = tsan_current();
  trace(name, signature, grid, block, smem);
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  char m[200];
  if (nthreads == 0 || nthreads > 1024 || block.z > 64) {
    std::snprintf(m, sizeof m, "invalid configuration: block (%u,%u,%u)", block.x, block.y, block.z);
    return set_error(cudaErrorInvalidConfiguration, m);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    std::snprintf(m, sizeof m, "invalid configuration: grid (%u,%u,%u)", grid.x, grid.y, grid.z);
    return set_error(cudaErrorInvalidConfiguration, m);
  }
  auto it = g.smem_optin.find(kernel);
  const size_t limit = it == g.smem_optin.end() ? kSmemDefault : std::max<size_t>(kSmemDefault, it->second);
  if (smem > limit) {
    std::snprintf(m, sizeof m, "invalid value: %zu bytes of dynamic shared memory, the kernel may use %zu", smem,
                  limit);
    return set_error(cudaErrorInvalidValue, m);
  }
  const std::string mode = order_mode();
  gridDim = grid;
  blockDim = block;
  g.body = std::move(body);
  g.failed = false;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  // a grid of more than 2^20 blocks runs forward (its order table would be large)
  const bool reorder = mode != "forward" && nblocks <= (1u << 20);
  const std::vector<unsigned> o = reorder ? order(static_cast<unsigned>(nblocks), mode, 0x5eed)
                                          : std::vector<unsigned>();
  // every block's threads follow the host code before the launch, and the host code after it
  // follows all of them; nothing orders one block's threads with another's
  hb_release(&g.launch_start);
  for (uint64_t i = 0; i < nblocks; ++i) {
    const uint64_t b = reorder ? o[i] : i;
    blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                     static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    if (!run_block(static_cast<unsigned>(nthreads), smem, mode, i)) {
      set_error(cudaErrorLaunchFailure, std::string("emulator: ") + name + ": " + g.message);
      std::fprintf(stderr, "vos_emu: %s: %s\n", name, g.message.c_str());
      break;
    }
  }
  hb_acquire(&g.launch_end);
  g.body = nullptr;
  threadIdx = uint3{0, 0, 0};
}

template <class... P>
struct Launch {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... a) const {
    std::tuple<P...> args(std::forward<A>(a)...);
    void (*k)(P...) = kernel;
    run_grid(name, __PRETTY_FUNCTION__, reinterpret_cast<const void*>(k), grid, block, smem,
             [k, args]() { std::apply(k, args); });
  }
};

template <class... P>
inline Launch<P...> launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                           cudaStream_t = nullptr) {
  return Launch<P...>{name, kernel, grid, block, smem};
}

inline void* dynamic_smem() { return g.smem; }

// ---- PTX instructions (the asm statements of the kernels, translated) --------------------
namespace ptx {

inline void cvt_rna_tf32_f32(const char*, uint32_t& d, float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7f800000u) == 0x7f800000u)
    d = (b & 0x007fffffu) ? 0x7fffffffu : b;  // inf stays, NaN becomes the canonical NaN
  else
    d = (b + 0x1000u) & 0xffffe000u;  // ties away from zero; may carry into inf
}

inline float tf32_value(uint32_t b) {
  b &= 0xffffe000u;
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

inline void mma_sync_aligned_m16n8k8_row_col_f32_tf32_tf32_f32(const char*, float& d0, float& d1, float& d2,
                                                                float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                                                                uint32_t a3, uint32_t b0, uint32_t b1, float c0,
                                                                float c1, float c2, float c3) {
  Quiet q;
  Warp& w = my_warp();
  const unsigned lane = lane_id();
  w.a[lane][0] = a0, w.a[lane][1] = a1, w.a[lane][2] = a2, w.a[lane][3] = a3;
  w.b[lane][0] = b0, w.b[lane][1] = b1;
  w.c[lane][0] = c0, w.c[lane][1] = c1, w.c[lane][2] = c2, w.c[lane][3] = c3;
  warp_barrier(0xffffffffu, "mma.sync");
  // fragment layouts of mma.m16n8k8 .tf32 (PTX ISA, "Matrix Fragments for mma.m16n8k8"):
  // group = lane / 4, t = lane % 4; A (16x8, row): a0 (g, t), a1 (g+8, t), a2 (g, t+4),
  // a3 (g+8, t+4); B (8x8, col): b0 (t, g), b1 (t+4, g); C/D (16x8): c0 (g, 2t),
  // c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const int gr = l >> 2, t = l & 3;
    A[gr][t] = tf32_value(w.a[l][0]);
    A[gr + 8][t] = tf32_value(w.a[l][1]);
    A[gr][t + 4] = tf32_value(w.a[l][2]);
    A[gr + 8][t + 4] = tf32_value(w.a[l][3]);
    B[t][gr] = tf32_value(w.b[l][0]);
    B[t + 4][gr] = tf32_value(w.b[l][1]);
  }
  const int gr = lane >> 2, t = lane & 3;
  const int rows[4] = {gr, gr, gr + 8, gr + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  const float cin[4] = {c0, c1, c2, c3};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = cin[i];
    for (int k = 0; k < 8; ++k) acc += A[rows[i]][k] * B[k][cols[i]];  // tf32 x tf32 is exact in fp32
    out[i] = acc;
  }
  warp_barrier(0xffffffffu, "mma.sync");
  d0 = out[0], d1 = out[1], d2 = out[2], d3 = out[3];
}

// A relaxed atomic load, for ThreadSanitizer an atomic beside the atomics of other threads.
inline void ld_relaxed_cta_shared_u64(const char*, unsigned long long& v, uint32_t s) {
  v = __atomic_load_n(reinterpret_cast<unsigned long long*>(shared_address(s, 8, "ld.relaxed.cta.shared.u64")),
                      __ATOMIC_RELAXED);
}

inline void cp_async(uint32_t s, const void* gmem, int bytes, int src_bytes, const char* what) {
  if (src_bytes < 0 || src_bytes > bytes) fail(std::string(what) + ": src-size outside [0, cp-size]");
  unsigned char* dst = shared_address(s, bytes, what);
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem) % bytes != 0)
    fail(std::string(what) + ": misaligned global address");
  Quiet q;
  me().open_group.push_back(Copy{dst, static_cast<const unsigned char*>(gmem), bytes, src_bytes});
}
inline void cp_async_cg_shared_global(const char*, uint32_t s, const void* gmem, int bytes, int src_bytes) {
  if (bytes != 16) fail("cp.async.cg: cp-size must be 16");
  cp_async(s, gmem, bytes, src_bytes, "cp.async.cg");
}
inline void cp_async_ca_shared_global(const char*, uint32_t s, const void* gmem, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async.ca: cp-size must be 4, 8 or 16");
  cp_async(s, gmem, bytes, src_bytes, "cp.async.ca");
}
inline void cp_async_commit_group(const char*) {
  Quiet q;
  Fiber& f = me();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}
inline void cp_async_wait_group(const char*, int n) {
  std::vector<std::vector<Copy>> due;
  {
    Quiet q;
    Fiber& f = me();
    while (static_cast<int>(f.groups.size()) > n) {
      due.push_back(std::move(f.groups.front()));
      f.groups.erase(f.groups.begin());
    }
  }
  for (std::vector<Copy>& group : due) complete(group);  // this thread's writes, for ThreadSanitizer
  // a switch point: other threads run before this one reads what it waited for
  Quiet q;
  ++g.progress;
  yield();
}
inline void cp_async_wait_all(const char*) {
  cp_async_commit_group(nullptr);
  cp_async_wait_group(nullptr, 0);
}

}  // namespace ptx
}  // namespace vos_emu

// ---- device functions and intrinsics ------------------------------------------------------
inline void __syncthreads() { vos_emu::block_barrier(0); }
inline int __syncthreads_count(int pred) { return vos_emu::block_barrier(pred != 0); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { vos_emu::warp_barrier(mask, "__syncwarp", true); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const unsigned lane = vos_emu::lane_id();
  const unsigned s = (lane & ~unsigned(width - 1)) | (unsigned(src) & unsigned(width - 1));
  return vos_emu::exchange(mask, v, s, "__shfl_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = vos_emu::lane_id();
  unsigned s = lane ^ unsigned(lane_mask);
  if (s >= ((lane / unsigned(width)) + 1) * unsigned(width)) s = lane;  // a later group: own value
  return vos_emu::exchange(mask, v, s, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  vos_emu::Quiet q;
  vos_emu::Warp& w = vos_emu::my_warp();
  w.slot[vos_emu::lane_id()] = pred != 0;
  vos_emu::warp_barrier(mask, "__ballot_sync");
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && w.slot[l]) r |= 1u << l;
  vos_emu::warp_barrier(mask, "__ballot_sync");
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  vos_emu::Quiet q;
  vos_emu::Warp& w = vos_emu::my_warp();
  const uint64_t mine = vos_emu::to_bits(v);
  w.slot[vos_emu::lane_id()] = mine;
  vos_emu::warp_barrier(mask, "__match_any_sync");
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && w.slot[l] == mine) r |= 1u << l;
  vos_emu::warp_barrier(mask, "__match_any_sync");
  return r;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline float __int_as_float(int x) { return vos_emu::from_bits<float>(static_cast<uint32_t>(x)); }
inline float __uint_as_float(unsigned x) { return vos_emu::from_bits<float>(x); }
inline int __float_as_int(float x) { return static_cast<int>(vos_emu::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(vos_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return vos_emu::from_bits<double>(static_cast<uint64_t>(x)); }
inline float __fmul_rn(float a, float b) { return a * b; }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline size_t __cvta_generic_to_shared(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (vos_emu::g.smem == nullptr || c < vos_emu::g.smem || c >= vos_emu::g.smem + vos_emu::g.smem_bytes)
    vos_emu::fail("__cvta_generic_to_shared: not an address in the block's dynamic shared memory");
  return static_cast<size_t>(c - vos_emu::g.smem);
}

// CUDA's integer and floating min/max overloads (device code calls them unqualified).
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// Atomics, relaxed as CUDA's are. Fibers never switch inside one, so any read-modify-write
// would be atomic here; the compiler's atomic builtins make ThreadSanitizer see them as atomic.
template <class T, class F>
inline T atomic_update(T* p, F f) {
  T old, desired;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    desired = f(old);
  } while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
template <class T, class U>
inline T atomicAdd(T* p, U v) {
  return atomic_update(p, [v](T old) { return static_cast<T>(old + v); });
}
template <class T, class U>
inline T atomicMin(T* p, U v) {
  return atomic_update(p, [v](T old) { return static_cast<T>(v) < old ? static_cast<T>(v) : old; });
}
// ---- runtime API --------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = vos_emu::g.last_error;
  vos_emu::g.last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorLaunchFailure: return vos_emu::g.error_text.c_str();
    default: return "emulator: unknown error";
  }
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = vos_emu::kSmemDefault; break;
    case cudaDevAttrMultiProcessorCount: *v = vos_emu::kSMs; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = vos_emu::kSmemOptin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > vos_emu::kSmemOptin) {
    vos_emu::set_error(cudaErrorInvalidValue, "invalid value: cudaFuncSetAttribute");
    return cudaErrorInvalidValue;
  }
  vos_emu::g.smem_optin[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F*, int threads, size_t smem) {
  int by_threads = threads > 0 ? 2048 / threads : 0;
  int by_smem = smem > 0 ? static_cast<int>(vos_emu::kSmemPerSM / (smem + 1024)) : 32;
  *n = std::max(0, std::min({by_threads, by_smem, 32}));
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t = nullptr) {
  if (bytes) std::memset(p, v, bytes);
  return cudaSuccess;
}
