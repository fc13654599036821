// Picks the kernel table once at import: the best ISA this CPU runs, unless SPARSIFY_ISA names
// another one (tests use it to exercise every build on one machine).
#include "dispatch.h"

#include <sched.h>

#include <cstdlib>
#include <cstring>

namespace sparsify {
namespace {

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

const KernelTable* best_table() {
  if (cpu_has_avx512()) return &table_avx512();
  if (cpu_has_avx2()) return &table_avx2();
  return &table_portable();
}

const KernelTable* initial_table() {
  const char* env = std::getenv("SPARSIFY_ISA");
  if (env && *env && isa_supported(env)) {
    if (!std::strcmp(env, "avx512")) return &table_avx512();
    if (!std::strcmp(env, "avx2")) return &table_avx2();
    if (!std::strcmp(env, "portable")) return &table_portable();
  }
  return best_table();
}

const KernelTable* g_table = nullptr;
int g_threads = 0;

}  // namespace

bool isa_supported(const char* name) {
  if (!std::strcmp(name, "avx512")) return cpu_has_avx512();
  if (!std::strcmp(name, "avx2")) return cpu_has_avx2();
  return !std::strcmp(name, "portable");
}

const KernelTable& kernels() {
  if (!g_table) g_table = initial_table();
  return *g_table;
}

const char* active_isa() { return kernels().name; }

bool set_isa(const char* name) {
  if (!isa_supported(name)) return false;
  if (!std::strcmp(name, "avx512")) g_table = &table_avx512();
  else if (!std::strcmp(name, "avx2")) g_table = &table_avx2();
  else g_table = &table_portable();
  return true;
}

// Default: OMP_NUM_THREADS when set (the variable users already know), else the CPUs this
// process may run on.
static int default_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return 1;
}

int num_threads() {
  if (in_parallel_task()) return 1;
  if (g_threads <= 0) g_threads = default_threads();
  return g_threads;
}

void set_num_threads(int n) { g_threads = n > 0 ? n : 1; }

}  // namespace sparsify
