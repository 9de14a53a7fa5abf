"""benchmarks/bench_network.py's choice of rows (no measurement)."""
import importlib.util
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_network.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_network", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_skip_emulated_bf16_rows():
    """On a CPU without native bf16 (AVX2-only EPYC) the bf16 rows are skipped, each with its reason, unless
    asked for; on a CPU with native bf16, and on accelerators, every row runs."""
    b = _bench()
    names = list(b.VARIANTS)
    bf16 = {n for n in names if b.variant_amp(n, "O0") == "bf16"}
    assert bf16 and len(bf16) < len(names)
    run, skipped = b.plan_variants(names, "O0", "cpu", native_bf16=False, emulated_bf16=False)
    assert set(skipped) == bf16 and set(run) == set(names) - bf16
    assert all("emulated" in why for why in skipped.values())
    for native, emulated, device in ((True, False, "cpu"), (False, True, "cpu"), (False, False, "cuda")):
        assert b.plan_variants(names, "O0", device, native, emulated) == (names, {})
    # --amp bf16 makes every row bf16: all skipped on such a CPU
    run, skipped = b.plan_variants(names, "bf16", "cpu", native_bf16=False, emulated_bf16=False)
    assert run == [] and set(skipped) == set(names)
