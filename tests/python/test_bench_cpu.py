"""CPU-only tests of the benchmark helpers (python/blackwell_sparsek/bench.py): no GPU needed."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH_PY = ROOT / "python" / "blackwell_sparsek" / "bench.py"


def _load_bench():
    try:
        import blackwell_sparsek.bench as mod  # the package may fail to import (_C not built)
        return mod
    except Exception:
        spec = importlib.util.spec_from_file_location("bsk_bench_by_path", BENCH_PY)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


bench = _load_bench()


# ------------------------------------------------------------------ FLOPs
def test_flops_non_causal():
    assert bench.attention_flops(16, 8, 512, 512, 64, False) == 4 * 16 * 8 * 512 * 512 * 64


def test_flops_causal_uses_half_plus_one():
    S = 4096
    assert bench.attention_flops(8, 32, S, S, 128, True) == 4 * 8 * 32 * S * (S + 1) / 2 * 128
    assert bench.attention_flops(1, 1, 1, 1, 1, True) == 4  # one query sees its own key


def test_flops_causal_needs_square():
    with pytest.raises(ValueError):
        bench.attention_flops(1, 1, 4, 8, 64, True)


def test_case_flops_matches_formula():
    c = bench.make_case("long", 2, 16384, 32, 8, 128, True, "bfloat16")
    assert bench.case_flops(c) == 4 * 2 * 32 * 16384 * (16384 + 1) / 2 * 128


# ------------------------------------------------------------------ suites
def test_seed_cases_match_rulebook():
    cases = bench.suite_cases("seed")
    assert [c["Hq"] for c in cases] == [8, 16, 32, 64, 96, 128]
    for c in cases:
        assert (c["B"], c["Sq"], c["Skv"], c["D"], c["dtype"]) == (16, 512, 512, 64, "float16")
        assert c["Hkv"] == c["Hq"] and c["causal"] is False and c["suite"] == "seed"


def test_long_cases_match_rulebook():
    cases = bench.suite_cases("long")
    assert len(cases) == 16
    combos = {(c["Hkv"], c["causal"], c["Sq"]) for c in cases}
    assert combos == {(h, cz, s) for h in (32, 8) for cz in (False, True)
                      for s in (1024, 4096, 16384, 32768)}
    for c in cases:
        assert c["B"] * c["Sq"] == 32768 and c["Sq"] == c["Skv"]
        assert (c["Hq"], c["D"], c["dtype"]) == (32, 128, "bfloat16")
    assert len({c["name"] for c in cases}) == len(cases)


def test_quick_is_smaller_and_unknown_suite_raises():
    assert len(bench.suite_cases("seed", quick=True)) < len(bench.suite_cases("seed"))
    assert len(bench.suite_cases("long", quick=True)) < len(bench.suite_cases("long"))
    with pytest.raises(ValueError):
        bench.suite_cases("fp8")


def test_check_slice_within_budget_and_keeps_groups():
    for c in bench.suite_cases("seed"):
        assert bench.check_slice(c) == (c["B"], c["Hkv"])  # seed is checked at full size
    for c in bench.suite_cases("long"):
        b, hkv = bench.check_slice(c)
        hq = hkv * (c["Hq"] // c["Hkv"])
        assert 1 <= b <= c["B"] and 1 <= hkv <= c["Hkv"]
        assert b * hq * c["Sq"] * c["Skv"] <= bench.CHECK_BUDGET or (b, hkv) == (1, 1)


# ------------------------------------------------------------------ correctness helpers
def _naive(q, k, v, causal):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_math_sdpa_chunked_matches_naive(monkeypatch, causal):
    monkeypatch.setattr(bench, "REF_CHUNK_ELEMS", 2 * 4 * 40)  # forces several query chunks
    q, k, v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    out = bench.math_sdpa(q, k, v, causal, torch.float64)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _naive(q, k, v, causal), rtol=1e-10, atol=1e-12)


def test_check_output_passes_good_and_fails_bad():
    case = bench.make_case("seed", 2, 64, 4, 4, 32, False, "float16")
    q, k, v = (torch.randn(2, 64, 4, 32).half() for _ in range(3))
    refs = bench.reference(case, q, k, v)
    good = bench.check_output(refs["ref"].half(), refs)
    assert good["pass"] and good["allclose_fp32_ok"] and good["checked"]["full"]
    bad = bench.check_output(refs["ref"].half() * 1.01, refs)
    assert not bad["pass"] and not bad["rel_err_ok"]


def test_sdpa_peer_plumbing_on_cpu():
    # the sdpa peers pass BHSD views of BSHD tensors and return BSHD; CPU math keeps this portable
    case = bench.make_case("long", 2, 32, 8, 2, 16, True, "float32")
    fn, _ = bench.peer_call("sdpa-cudnn", case)
    q, k, v = torch.randn(2, 32, 8, 16), torch.randn(2, 32, 2, 16), torch.randn(2, 32, 2, 16)
    out = fn(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), _naive(q, k, v, True), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ metrics and writers
def _fake_report(suite="seed"):
    cases = bench.suite_cases(suite, quick=True)
    results = []
    for i, c in enumerate(cases):
        def timed(ms):
            return dict(available=True, median_ms=ms, min_ms=ms, max_ms=ms, reps=20,
                        warmup_calls=5)
        peers = {
            "ours": dict(available=True, eager=timed(0.5), graph=timed(0.4),
                         correctness=dict(rel_err=3e-3 if i == 0 else 1e-3, limit=2e-3,
                                          **{"pass": i != 0})),
            "sdpa-flash": dict(available=True, eager=timed(1.0),
                               graph=dict(available=False, reason="RuntimeError: capture"),
                               correctness=dict(rel_err=1e-3, limit=2e-3, **{"pass": True})),
            "sdpa-cudnn": dict(available=False, reason="RuntimeError: No available kernel."),
        }
        r = dict(case=c, flops=bench.case_flops(c), input_copies=4, rotated_bytes=1,
                 l2_bytes=50 << 20, peers=peers)
        for e in peers.values():
            bench.add_metrics(c, e)
        bench.add_ratios(r)
        results.append(r)
    env = dict(gpu="NVIDIA H100 80GB HBM3", sm_clock="1980 MHz", sm_clock_max="1980 MHz",
               driver="570.00", cuda="13.0", torch=torch.__version__, cudnn=91000,
               git_commit="abc123", git_dirty=False, date_utc="2026-01-01T00:00:00+00:00")
    return dict(suite=suite, quick=False, quotable=True, env=env,
                method=dict(headline="eager", timed_region=bench.TIMED_REGION), peers=list(
                    bench.PEERS), other_libraries={"flashinfer": "not installed"},
                results=results)


def test_metrics_and_ratios():
    rep = _fake_report("seed")
    r = rep["results"][0]
    ours = r["peers"]["ours"]["eager"]
    hq = r["case"]["Hq"]
    assert ours["us_per_head"] == pytest.approx(500.0 / hq)
    assert ours["tflops"] == pytest.approx(r["flops"] / 0.5e-3 / 1e12)
    assert ours["speedup_vs"] == {"sdpa-flash": pytest.approx(2.0)}  # cudnn unavailable
    assert r["peers"]["ours"]["graph"]["speedup_vs"] == {}  # flash graph mode unavailable


@pytest.mark.parametrize("suite", ["seed", "long"])
def test_writers(tmp_path, suite, capsys):
    rep = _fake_report(suite)
    base, md, plotted = bench.write_outputs(rep, str(tmp_path / "out"), "20260101-000000")
    assert os.path.basename(base) == f"{suite}-nvidia-h100-80gb-hbm3-20260101-000000"
    data = json.loads(pathlib.Path(base + ".json").read_text())
    assert data["suite"] == suite and data["method"]["headline"] == "eager"
    assert pathlib.Path(base + ".md").read_text() == md
    assert "**CORRECTNESS FAILURES (1)" in md and "**FAIL**" in md
    assert "No available kernel" in md and "graph mode unavailable" in md
    assert "flashinfer: not installed" in md
    n_rows = sum(1 for line in md.splitlines() if line.startswith("| B"))
    assert n_rows == 2 * len(rep["results"])  # cudnn rows are listed as unavailable instead
    if importlib.util.find_spec("matplotlib"):
        assert plotted and pathlib.Path(base + ".png").stat().st_size > 0
    else:
        assert not plotted and "skipping the plot" in capsys.readouterr().out


def test_gpu_slug():
    assert bench.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert bench.gpu_slug("") == "gpu"


# ------------------------------------------------------------------ CLI
def _no_gpu_env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_no_gpu_exit_path_by_file():
    p = subprocess.run([sys.executable, str(BENCH_PY), "--suite", "seed"], capture_output=True,
                       text=True, env=_no_gpu_env(), timeout=300)
    assert p.returncode == 2
    assert "no CUDA GPU: benchmarks need one" in p.stderr
    assert "Traceback" not in p.stderr


def test_no_gpu_exit_path_as_module():
    # The installed package (the source folder has no built extension).
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    probe = subprocess.run([sys.executable, "-c", "import blackwell_sparsek"], env=env,
                           capture_output=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("the blackwell_sparsek package is not installed here (pip install . first)")
    p = subprocess.run([sys.executable, "-m", "blackwell_sparsek.bench", "--suite", "long"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "no CUDA GPU: benchmarks need one" in p.stderr


def test_bad_peer_is_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "seed", "--peers", "ours,fa9"])
    assert bench.parse_args(["--suite", "long", "--peers", "sdpa-cudnn"]).peers == ["sdpa-cudnn"]


# ------------------------------------------------------------------ the whole flow, CUDA faked
class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        import time
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_main_flow_with_cuda_faked_on_cpu(monkeypatch, tmp_path, capsys):
    """main() end to end on CPU tensors: CUDA events/sync faked, graph capture refused."""
    import functools
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(bench, "make_inputs", functools.partial(bench.make_inputs, device="cpu"))
    monkeypatch.setattr(bench, "n_copies", lambda case, l2: (2, 1000))
    monkeypatch.setattr(bench, "gpu_warmup", lambda: None)

    def no_capture(fn, copies):
        raise RuntimeError("graph capture faked off")
    monkeypatch.setattr(bench, "capture_graphs", no_capture)
    monkeypatch.setattr(bench, "capture_env", lambda: dict(gpu="Fake GPU", l2_bytes=None))
    tiny = [bench.make_case("seed", 2, 64, h, h, 64, False, "float16") for h in (2, 4)]
    monkeypatch.setattr(bench, "suite_cases", lambda suite, quick: tiny)
    assert bench.main(["--suite", "seed", "--out", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "QUICK SMOKE RUN" in out
    (js,) = tmp_path.glob("seed-fake-gpu-*.json")
    rep = json.loads(js.read_text())
    assert rep["quotable"] is False and len(rep["results"]) == 2
    for r in rep["results"]:
        ours = r["peers"]["ours"]  # the compiled package is not importable on this CPU box
        if not ours["available"]:
            assert ours["reason"]
        flash = r["peers"]["sdpa-flash"]  # PyTorch's CPU flash kernel stands in for the GPU one
        assert flash["available"] and flash["correctness"]["pass"], flash
        assert flash["eager"]["available"] and flash["eager"]["reps"] == 5
        assert flash["eager"]["tflops"] > 0 and flash["eager"]["speedup_vs"] == {"sdpa-flash": 1.0}
        assert flash["graph"] == dict(available=False,
                                      reason="RuntimeError: graph capture faked off")
        cudnn = r["peers"]["sdpa-cudnn"]  # no cuDNN kernel for CPU tensors: a recorded reason
        assert cudnn["available"] is False and "RuntimeError" in cudnn["reason"]


def test_latency_suite_matches_rulebook_and_renders():
    from blackwell_sparsek import bench_latency as bl

    assert sorted(bl.SHAPES) == [(1, 64), (1, 128), (128, 64), (128, 128)]
    assert (bl.B, bl.H) == (1, 8)
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1
        return 1234  # reports its own host time (ns)

    samples = bl.time_round_robin({"a": a, "b": b}, reps=3) if torch.cuda.is_available() else None
    if samples is not None:
        assert calls == {"a": 23, "b": 23} and samples["b"]["host"] == [1234] * 3
    row = dict(peer="ours", rel_err=1e-4, limit=2e-4, ok=True,
               host=bl.summarize([1000, 2000, 3000]), total=bl.summarize([5000] * 3))
    report = dict(env={"gpu": "X"}, reps=3, results=[dict(
        S=1, D=64, rows=[row, dict(peer="sdpa-cudnn", error="RuntimeError: no kernel")],
        breakdown=[dict(layer="front door", host=bl.summarize([1500]))])])
    md = bl.render(report)
    assert "| 1 | 64 | ours | 2.0 (2.0) | 5.0 (5.0) |" in md
    assert "sdpa-cudnn | - | - | RuntimeError: no kernel" in md
    assert "- front door: 1.5 (1.5)" in md


def test_decode_suite_renders_every_timing_mode():
    from blackwell_sparsek import bench_decode as bd

    ours = dict(peer="ours", B=1, L=131072, eager_ms=0.03, graph_ms=0.0235, layers_ms=0.0193,
                bytes=13_000_000, graph_GBps=553.0, cache_bytes_per_seq_per_layer=15 * 2**20,
                candidates_mean=3900.0)
    for p, ms in (("sdpa-cudnn", 0.18), ("sdpa-flash", 0.2)):
        for mode in ("eager", "graph", "layers"):
            ours[f"speedup_{mode}_vs_{p}"] = ms / ours[f"{mode}_ms"]
    peer = dict(peer="sdpa-cudnn", B=1, L=131072, eager_ms=0.18, graph_ms=0.18, layers_ms=0.18,
                bytes=536_870_912, graph_GBps=2982.6)
    report = dict(env={"gpu": "X"}, copy_GBps=3000.0,
                  check=dict(B=2, L=3000, steps=4, k=256, w=128, rel_err=2e-3,
                             rel_err_rounding=1.6e-3, ok=True),
                  results=[ours, peer, dict(peer="sdpa-flash", B=1, L=131072, error="RuntimeError: x")])
    md = bd.render(report)
    assert "| B | L | peer | eager ms | graph ms | layers ms |" in md
    assert "| 1 | 131072 | ours | 0.0300 | 0.0235 | 0.0193 | 553 | 18% | 6.0x / 7.7x / 9.3x vs sdpa-cudnn" in md
    assert "| 1 | 131072 | sdpa-cudnn | 0.1800 | 0.1800 | 0.1800 | 2983 | 99% |  |" in md
    assert "| 1 | 131072 | sdpa-flash | error: RuntimeError: x | | | | | |" in md
    assert "15.00 MiB per sequence per layer" in md and ": ok" in md
