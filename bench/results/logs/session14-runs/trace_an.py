"""Summary of a decode-step trace (trace.py's output under the decode-trace.patch build): per step,
the append's and the attention's stamps relative to the append's start (us), min / median / max
over the groups (append) and CTAs (attention).

    python3 trace_an.py TRACE.txt
"""
import sys, statistics as st
lines = open(sys.argv[1]).read().splitlines()
start = max(i for i, l in enumerate(lines) if l.startswith("MARK replay 1"))
end = max(i for i, l in enumerate(lines) if l.startswith("MARK replay 2"))
seg = lines[start + 1:end]
# blocks: consecutive TRP lines start a step
steps, cur = [], None
for l in seg:
    if l.startswith("TRP"):
        if cur is None or cur["A"]:
            cur = {"P": [], "A": []}; steps.append(cur)
        cur["P"].append(list(map(int, l.split()[2:])))
    elif l.startswith("TRA") and cur is not None:
        cur["A"].append(list(map(int, l.split()[2:])))
pn = ["start", "loads", "reduced", "walk", "end", "scanned", "listed"]
an = ["start", "prologue", "wait", "rows", "chunk0", "loop", "partials", "counted", "combined"]
prev_end = None
for si, s in enumerate(steps):
    a0 = min(p[0] for p in s["P"])
    gap = f" (gap after previous step's last stamp {(a0 - prev_end)/1e3:.2f} us)" if prev_end else ""
    print(f"step {si}{gap}")
    info = [(p[7] >> 32, (p[7] >> 8) & 0xffffff, p[7] & 1) for p in s["P"] if p[7]]
    print("   walk list (m, iters, done):", info)
    for k in (1, 5, 2, 6, 3, 4):
        vals = [p[k] - a0 for p in s["P"] if p[k] > 0]
        if vals:
            print(f"   append {pn[k]:9s} min {min(vals)/1e3:6.2f} med {st.median(vals)/1e3:6.2f} max {max(vals)/1e3:6.2f} us (n={len(vals)})")
    for k in range(9):
        vals = [a[k] - a0 for a in s["A"] if a[k] > 0]
        if vals:
            print(f"   attn {an[k]:9s} min {min(vals)/1e3:6.2f} med {st.median(vals)/1e3:6.2f} max {max(vals)/1e3:6.2f} us (n={len(vals)})")
    last = [a for a in s["A"] if a[8] > 0 and len(a) > 13]
    for nm, k in (("fence", 11), ("ml+sync", 12), ("weights", 13), ("end", 8)):
        vals = [a[k] - a[7] for a in last]
        if vals:
            print(f"   last CTA after counted: {nm:8s} min {min(vals)/1e3:5.2f} med {st.median(vals)/1e3:5.2f} max {max(vals)/1e3:5.2f} us")
    mhz = [a[9] / a[10] * 1e3 for a in s["A"] if len(a) > 10 and a[10] > 0]
    if mhz:
        print(f"   SM clock over start..partials: min {min(mhz):.0f} med {st.median(mhz):.0f} max {max(mhz):.0f} MHz")
    prev_end = max(max(a[:9]) for a in s["A"])
