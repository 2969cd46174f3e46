"""The machine's measured float32 peak: a hand-written FMA loop, and 4096x4096 matmuls.

- ``fma loop``: a small C program (``gcc -O3 -fopenmp``, written and compiled at bench time)
  runs 12 independent float32 FMA chains per thread on ``--threads`` threads: the multiply-add
  ceiling of the cores. ``--isa auto`` (the default) builds it for AVX-512F (``-mavx512f``, 16
  lanes) where the CPU has it and for AVX2+FMA (8 lanes) elsewhere; ``--isa avx2`` or
  ``avx512`` forces one. Besides wall-clock GFLOP/s it reports FLOP per second of each
  thread's own CPU time, summed over the threads (``cpu_time_gflops``): what the cores
  deliver while they run the loop, which other jobs on a shared machine cannot lower.
- ``numpy matmul`` and ``tensorflow matmul``: a 4096x4096 float32 product (2 x 4096^3 FLOP)
  with 2 threads (OpenBLAS / Eigen+oneDNN), each in its own process.
- ``bf16 dot loop`` (JSON key ``bf16_dot_loop``, beside ``rows``): the same loop built with
  ``-mavx512f -mavx512bf16`` around ``_mm512_dpbf16_ps`` (``vdpbf16ps``: 16 float32 lanes, each
  adding two bfloat16 products, 64 FLOP per instruction), 12 independent chains per thread,
  per second of CPU time: the ceiling of mixed_bfloat16 convolutions. Only where the CPU has
  AVX512_BF16; elsewhere it records ``"available": false``.

Median of ``--repeats`` runs; writes ``benchmarks/results/peak.json``.

    .venv/bin/python benchmarks/bench_peak.py [--threads 2]
    .venv/bin/python benchmarks/bench_peak.py --no-matmul --iters 20000000 --out /tmp/peak.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, cpu_info, now, run_child, versions, write_json

N = 4096
C_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define CHAINS 12
#ifdef BF16  /* vdpbf16ps: a += a_lo * b_lo + a_hi * b_hi in each float32 lane */
static inline __m512bh bf16_set1(float v) {
    return _mm512_cvtne2ps_pbh(_mm512_set1_ps(v), _mm512_set1_ps(v));
}
#define OPND __m512bh
#define OSET1 bf16_set1
#define FMA _mm512_dpbf16_ps
#define FLOP_PER_LANE 4.0
#define BF16_OR(bf16, fp32) (bf16)
#else
#define OPND VEC
#define OSET1 SET1
#define FLOP_PER_LANE 2.0
#define BF16_OR(bf16, fp32) (fp32)
#endif
static double thread_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
int main(int argc, char **argv) {
    long iters = atol(argv[1]);
    double best = 0.0;
    for (int rep = 0; rep < 5; rep++) {
        float sink = 0.0f;
        double cpu_rate = 0.0;
        double t0 = omp_get_wtime();
        #pragma omp parallel reduction(+:sink) reduction(+:cpu_rate)
        {
            double c0 = thread_cpu();
            VEC a[CHAINS];
            OPND m = OSET1(BF16_OR(1e-3f, 0.999999f)), c = OSET1(BF16_OR(1e-3f, 1e-7f));
            for (int k = 0; k < CHAINS; k++) a[k] = SET1((float)(k + omp_get_thread_num()));
            for (long i = 0; i < iters; i++) {
                for (int k = 0; k < CHAINS; k++) a[k] = FMA(a[k], m, c);
            }
            float out[LANES];
            for (int k = 1; k < CHAINS; k++) a[0] = ADD(a[0], a[k]);
            STORE(out, a[0]);
            for (int l = 0; l < LANES; l++) sink += out[l];
            cpu_rate += FLOP_PER_LANE * LANES * CHAINS * (double)iters / (thread_cpu() - c0);
        }
        double dt = omp_get_wtime() - t0;
        double flops = FLOP_PER_LANE * LANES * CHAINS * (double)iters * omp_get_max_threads();
        if (flops / dt > best) best = flops / dt;
        printf("rep %d: %.3f s, %.1f GFLOP/s, %.1f GFLOP/s per CPU second x threads (sink %g)\n",
               rep, dt, flops / dt / 1e9, cpu_rate / 1e9, sink);
    }
    printf("BEST %.3f\n", best / 1e9);
    return 0;
}
"""
AVX2 = ("-mavx2 -mfma -DVEC=__m256 -DLANES=8 -DSET1=_mm256_set1_ps -DFMA=_mm256_fmadd_ps "
        "-DADD=_mm256_add_ps -DSTORE=_mm256_storeu_ps")
AVX512 = ("-mavx512f -DVEC=__m512 -DLANES=16 -DSET1=_mm512_set1_ps -DFMA=_mm512_fmadd_ps "
          "-DADD=_mm512_add_ps -DSTORE=_mm512_storeu_ps")
BF16 = ("-mavx512f -mavx512bf16 -DBF16 -DVEC=__m512 -DLANES=16 -DSET1=_mm512_set1_ps "
        "-DADD=_mm512_add_ps -DSTORE=_mm512_storeu_ps")


def fma_peak(threads: int, avx512: bool, iters: int, flags_text: str | None = None) -> dict:
    """Compile and run the FMA loop (or, with ``flags_text=BF16``, the bfloat16 dot-product
    loop); the median, best and per-CPU-second GFLOP/s of its 5 repetitions."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return {"error": "no C compiler"}
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "fma.c", Path(tmp) / "fma"
        src.write_text(C_SOURCE)
        flags = (flags_text or (AVX512 if avx512 else AVX2)).split()
        cmd = [gcc, "-O3", "-fopenmp", *flags, str(src), "-o", str(exe)]
        subprocess.run(cmd, check=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
        out = subprocess.run([str(exe), str(iters)], env=env, check=True, text=True,
                             capture_output=True).stdout
    reps = [line.split(", ") for line in out.splitlines() if line.startswith("rep ")]
    runs = [float(r[1].split()[0]) for r in reps]
    cpu = [float(r[2].split()[0]) for r in reps]
    return {"gflops": statistics.median(runs), "best_gflops": max(runs), "runs_gflops": runs,
            "cpu_time_gflops": statistics.median(cpu), "runs_cpu_time_gflops": cpu,
            "compile": " ".join(cmd[:3] + flags[:2]), "threads": threads,
            "isa": "AVX-512F" if avx512 else "AVX2+FMA"}


def bf16_peak(threads: int, iters: int, has_bf16: bool) -> dict:
    """The ``vdpbf16ps`` loop (64 FLOP per instruction) where the CPU has AVX512_BF16; else
    ``{"available": False}`` with the reason."""
    if not has_bf16:
        return {"available": False, "reason": "no AVX512_BF16 on this CPU"}
    try:
        r = fma_peak(threads, True, iters, BF16)
    except (subprocess.CalledProcessError, OSError) as err:
        return {"available": False, "reason": f"{type(err).__name__}: {err}"}
    if "error" in r:
        return {"available": False, "reason": r["error"]}
    return {**r, "available": True, "isa": "AVX512_BF16", "instruction": "vdpbf16ps (zmm)",
            "flop_per_instruction": 64}


def matmul_child(lib: str, repeats: int) -> dict:
    """GFLOP/s of a 4096x4096 float32 matmul in this process (threads set by the parent)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((N, N), dtype=np.float32)
    b = rng.standard_normal((N, N), dtype=np.float32)
    if lib == "tensorflow":
        import tensorflow as tf

        threads = int(os.environ["BENCH_THREADS"])
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        ta, tb = tf.constant(a), tf.constant(b)

        def mm() -> None:
            tf.linalg.matmul(ta, tb).numpy()
    else:
        def mm() -> None:
            a @ b

    mm()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm()
        runs.append(2 * N**3 / (time.perf_counter() - t0) / 1e9)
    return {"gflops": statistics.median(runs), "best_gflops": max(runs), "runs_gflops": runs}


def main(argv: list[str] | None = None) -> int:
    """Measure the three peaks, print them and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=200_000_000,
                        help="FMA loop iterations per thread and repetition")
    parser.add_argument("--isa", choices=("auto", "avx2", "avx512"), default="auto",
                        help="instruction set of the FMA loop (auto: AVX-512F where present)")
    parser.add_argument("--no-matmul", action="store_true",
                        help="only the C loops (a quick check; the report wants the matmuls)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "peak.json"))
    parser.add_argument("--child", choices=("numpy", "tensorflow"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(matmul_child(args.child, args.repeats)), flush=True)
        return 0
    load_before = os.getloadavg()
    t = str(args.threads)
    env = {"OPENBLAS_NUM_THREADS": t, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t,
           "BENCH_THREADS": t}
    machine = cpu_info()
    avx512 = machine["flags"]["avx512f"] if args.isa == "auto" else args.isa == "avx512"
    rows = {"fma loop": fma_peak(args.threads, avx512, args.iters)}
    bf16 = bf16_peak(args.threads, args.iters, machine["flags"]["avx512_bf16"])
    for lib in () if args.no_matmul else ("numpy", "tensorflow"):
        rows[f"{lib} matmul {N}"] = run_child([__file__, "--child", lib, "--repeats",
                                               str(args.repeats)], env=env)
    print(f"{machine['model']}, {machine['cpus']} CPUs, AVX-512F "
          f"{'yes' if machine['flags']['avx512f'] else 'no'}; {args.threads} threads")
    print(f"{'float32 peak':24s} {'median GFLOP/s':>15s} {'best':>8s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['gflops']:15.1f} {r['best_gflops']:8.1f}")
    print(f"{'fma loop per CPU second':24s} {rows['fma loop']['cpu_time_gflops']:15.1f} "
          "(the cores' own rate, summed over threads)")
    if bf16["available"]:
        print(f"{'bf16 dot loop per CPU s':24s} {bf16['cpu_time_gflops']:15.1f} "
              f"(vdpbf16ps; wall median {bf16['gflops']:.1f}, best {bf16['best_gflops']:.1f})")
    else:
        print(f"{'bf16 dot loop':24s} not available ({bf16['reason']})")
    write_json(Path(args.out), {
        "benchmark": "float32 peak", "date": now(), "machine": machine, "versions": versions(),
        "threads": args.threads, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "rows": rows, "bf16_dot_loop": bf16})
    return 0


if __name__ == "__main__":
    sys.exit(main())
