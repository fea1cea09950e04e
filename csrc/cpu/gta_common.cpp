// Non-template parts of the generalized-task-arithmetic CPU machinery (see gta_cpu.h).
#include "gta_cpu.h"

#include "fastmerge/gta.h"
#include "select.h"

namespace fastmerge {
namespace cpu {
namespace gtacpu {

Scratch& scratch() {
  static thread_local Scratch sc;
  return sc;
}

float* thread_rows(Scratch& sc, int num_inputs, int64_t n, int threads) {
  const int nt = threads_for_elems(threads, n);  // as for_blocks
  grow(sc.rows, rows_per_thread(num_inputs) * size_t(nt));
  return sc.rows.data();
}

void finish_scales(const double* partials, int64_t units, int num_inputs, const char* need, ModelScale* ms) {
  for (int i = 0; i < num_inputs; ++i) {
    if (!need[i]) continue;
    double all = 0.0, kept = 0.0;
    // in unit order: the same sum for any thread count
    for (int64_t u = 0; u < units; ++u) {
      all += partials[(u * num_inputs + i) * 2];
      kept += partials[(u * num_inputs + i) * 2 + 1];
    }
    const gta::Scale s = gta::l1_scale(all, kept);
    ms[i].rescaled = s.rescaled;
    ms[i].factor = s.factor;
  }
}

}  // namespace gtacpu

size_t gta_scratch_bytes() { return gtacpu::scratch().bytes() + select_scratch_bytes(); }

}  // namespace cpu
}  // namespace fastmerge
