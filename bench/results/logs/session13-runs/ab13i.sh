python3 build/runs/kt13.py 2>&1 | grep -v -i warn
python3 - <<'PY' 2>&1 | grep -v -i warn
import statistics, torch, blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs
for S in (131072, 32768):
    q, k, v, u = inputs(S, 0)
    fn = lambda: bsk.sparsek_attention(q, k, v, u, K, W, gate="key_value")
    fn(); torch.cuda.synchronize()
    reps = 40 if S >= 131072 else 150
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    print(f"sparsek call S={S} median ms {statistics.median(a.elapsed_time(b) for a, b in ev):.3f}", flush=True)
PY
