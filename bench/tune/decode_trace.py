"""Timeline of the fused SparseK decode step (sparsek-decode settings, L=131072), from the stamps
of a trace build (src/kernels/decode_trace.cuh).

    rm -rf build/cp3*   # CUDAFLAGS counts only when CMake configures a fresh build directory
    CUDAFLAGS=-DBSK_DECODE_TRACE pip install --no-build-isolation --no-deps .   (a GPU machine)
    python3 bench/tune/decode_trace.py [B] [--raw FILE]

Replays one CUDA graph of 4 steps on 4 caches three times (the "layers" timing of bench_decode)
in a child process whose stdout carries the device's printf lines, and summarises the second
replay: per step, each stage's time from the append's start (us), min / median / max over the
append blocks (one per KV head and sequence) and over the attention CTAs. The stamps are thread
0's: a stage that ends in a barrier is stamped after it, others when thread 0 gets there.
"""
import statistics as st
import subprocess
import sys

L = 131072
APPEND = ["start", "first loads", "scanned", "reduced", "listed", "walked", "end"]
ATTN = ["start", "early loads", "waited", "rows known", "chunk 0", "chunks done", "partials",
        "counted", "combined", "combine fence", "combine pairs", "combine weights"]
CLOCK_START, CLOCK_PARTIALS, WALK_LIST = 12, 13, 7


def replay(B):
    import torch
    from blackwell_sparsek.bench_decode import rotated_caches
    pairs = rotated_caches(B, L, torch.cuda.get_device_properties(0).L2_cache_size)[:4]
    for c, x in pairs:
        c.step(*x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # warm-up on a side stream before the capture
        for c, x in pairs:
            c.step(*x)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for c, x in pairs:
            c.step(*x)
    torch.cuda.synchronize()
    for i in range(3):
        g.replay()
        torch.cuda.synchronize()
        print(f"MARK replay {i}", flush=True)


def stats(vals):
    return f"min {min(vals) / 1e3:6.2f} med {st.median(vals) / 1e3:6.2f} max {max(vals) / 1e3:6.2f} us"


def summarise(lines):
    start = lines.index("MARK replay 0")
    end = lines.index("MARK replay 1")
    steps, cur = [], None
    for line in lines[start + 1:end]:
        f = line.split()
        if not f or f[0] not in ("TRP", "TRA"):
            continue
        vals = [int(x) for x in f[2:]]
        if f[0] == "TRP":
            if cur is None or cur["A"]:
                cur = {"P": [], "A": []}
                steps.append(cur)
            cur["P"].append(vals)
        elif cur is not None:
            cur["A"].append(vals)
    if not steps:
        sys.exit("no stamps: is the package a trace build (CUDAFLAGS=-DBSK_DECODE_TRACE)?")
    for si, s in enumerate(steps):
        a0 = min(p[0] for p in s["P"])
        print(f"step {si}: {len(s['P'])} append blocks, {len(s['A'])} attention CTAs")
        lists = [(p[WALK_LIST] >> 1, p[WALK_LIST] & 1) for p in s["P"] if p[WALK_LIST]]
        print(f"  breakpoint lists (length, decided): {lists}")
        for k in range(1, len(APPEND)):
            vals = [p[k] - a0 for p in s["P"] if p[k] > 0]
            if vals:
                print(f"  append {APPEND[k]:15s} {stats(vals)} (n={len(vals)})")
        for k in range(len(ATTN)):
            vals = [a[k] - a0 for a in s["A"] if a[k] > 0]
            if vals:
                print(f"  attn   {ATTN[k]:15s} {stats(vals)} (n={len(vals)})")
        mhz = [(a[CLOCK_PARTIALS] - a[CLOCK_START]) / (a[6] - a[0]) * 1e3 for a in s["A"]
               if a[CLOCK_PARTIALS] and a[6] > a[0]]
        if mhz:
            print(f"  SM clock, start to partials: min {min(mhz):.0f} med {st.median(mhz):.0f} "
                  f"max {max(mhz):.0f} MHz")


def main():
    args = sys.argv[1:]
    if args[:1] == ["--replay"]:
        replay(int(args[1]))
        return
    raw = None
    if "--raw" in args:
        raw = args[args.index("--raw") + 1]
        del args[args.index("--raw"):args.index("--raw") + 2]
    B = int(args[0]) if args else 1
    out = subprocess.run([sys.executable, __file__, "--replay", str(B)], capture_output=True,
                         text=True, check=True).stdout
    if raw:
        with open(raw, "w") as f:
            f.write(out)
    summarise(out.splitlines())


if __name__ == "__main__":
    main()
