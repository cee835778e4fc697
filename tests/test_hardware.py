"""``auto`` precision: bf16 only where the CPU multiplies it natively (emulated bf16 made distillation ~50×
slower on an AVX2-only CPU)."""

import pytest

from minigiant import hardware
from minigiant.context import Context
from minigiant.distill import DistillConfig, distill


@pytest.fixture(autouse=True)
def fresh_detection():
    hardware.native_bf16.cache_clear()
    yield
    hardware.native_bf16.cache_clear()


@pytest.mark.parametrize("flags, native", [
    ({"fpu", "avx", "avx2", "fma"}, False),  # AVX2-only x86 (the AMD EPYC this was found on)
    ({"avx2", "avx512f", "avx512bw"}, False),  # AVX-512 without its BF16 extension (Skylake-SP)
    ({"avx2", "avx512f", "avx512_bf16"}, True),  # Cooper Lake, Zen 4
    ({"avx512f", "amx_tile", "amx_bf16"}, True),  # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, True),  # Arm v8.6 "Features"
])
def test_native_bf16_follows_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.native_bf16() is native
    assert hardware.resolve_precision("auto") == ("bf16" if native else "fp32")
    assert hardware.resolve_precision("fp32") == "fp32" and hardware.resolve_precision("bf16") == "bf16"


def test_without_flags_the_faster_dtype_is_measured(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)
    monkeypatch.setattr(hardware, "_bf16_measured_faster", lambda: True)
    assert hardware.resolve_precision("auto") == "bf16"


def test_cpu_flags_reads_x86_and_arm_lines(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nFeatures\t: fp asimd\n")
    real_path = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert hardware.cpu_flags() == {"fpu", "avx2", "amx_bf16", "fp", "asimd"}


@pytest.mark.parametrize("native", [False, True])
def test_distill_records_the_precision_auto_resolved_to(monkeypatch, tokenizer, native):
    from conftest import make_model
    from minigiant import artifact

    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    teacher, student = make_model(len(tokenizer), seed=0), make_model(len(tokenizer), seed=1)
    distill(student, DistillConfig(max_steps=1, block_size=32, batch_size=2), Context(tokenizer=tokenizer, teacher=teacher))
    metrics = artifact.lineage(student)["stages"][-1]["metrics"]
    want = "bf16" if native else "fp32"
    assert metrics["precision"] == {"teacher": want, "student": want}


def test_describe_cpu_names_the_instruction_set(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx", "avx2", "fma"})
    host = hardware.describe_cpu()
    assert host["isa"] == "AVX2" and host["native_bf16"] is False and host["cores"] >= 1 and host["cpu"]
