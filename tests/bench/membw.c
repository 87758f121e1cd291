// Memory read bandwidth for tests/bench/generate.sh: the sum of a float32 array far larger than
// the caches, read by THREADS OpenMP threads (each its own contiguous half, first touched by that
// thread), best of RUNS. Prints `membw threads=.. gib=.. runs=.. gbs=..` (GB = 1e9 bytes).
//
//   cc -O3 -march=native -fopenmp tests/bench/membw.c -o membw && ./membw [GIB] [RUNS] [THREADS]
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

static double sum_once(const float *a, size_t n, int threads, double *secs) {
  double total = 0;
  double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    // 16 independent accumulators so that the adds never wait on each other
    float acc[16] = {0};
#pragma omp for schedule(static)
    for (size_t i = 0; i < n; i += 16) {
#pragma omp simd
      for (int k = 0; k < 16; k++) acc[k] += a[i + k];
    }
    for (int k = 0; k < 16; k++) total += acc[k];
  }
  *secs = omp_get_wtime() - t0;
  return total;
}

int main(int argc, char **argv) {
  double gib = argc > 1 ? atof(argv[1]) : 1.0;
  int runs = argc > 2 ? atoi(argv[2]) : 7;
  int threads = argc > 3 ? atoi(argv[3]) : 2;
  size_t n = (size_t)(gib * (1 << 30)) / sizeof(float) / 16 * 16;
  float *a = aligned_alloc(64, n * sizeof(float));
  if (!a) {
    fprintf(stderr, "membw: cannot allocate %.2f GiB\n", gib);
    return 1;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
  double best = 1e30, check = 0;
  for (int r = 0; r < runs; r++) {
    double s;
    check = sum_once(a, n, threads, &s);
    if (s < best) best = s;
  }
  printf("membw threads=%d gib=%g runs=%d gbs=%.2f check=%.0f\n", threads, gib, runs,
         n * sizeof(float) / best / 1e9, check);
  free(a);
  return 0;
}
